"""Where LoRA training's memory goes on the real model, per `train.gradient_checkpointing` mode (#14 item 7).

    .venv/bin/python benchmarks/profile_train_memory.py                       # 8 examples, batch 4: 2 steps per mode
    .venv/bin/python benchmarks/profile_train_memory.py --examples 16 --batch 8 --modes false selective

The runs of `bench_train_trl.py`'s dtm modes (SmolLM2-135M fp32 on CPU, one thread, LoRA r=16 on
gate/up/down_proj, the chunked loss, the same examples and settings), one process per mode.
Records, from inside the training loop:

  * resident memory (VmRSS of /proc/self/status): after the imports, when training begins (model
    loaded and wrapped, Trainer built), at the end of each step's decoder forward (before the loss
    head and backward), and each step's peak (VmHWM, reset at the step's start);
  * where the resident pages are at the end of the first decoder forward (/proc/self/smaps: the
    model file's mapping, the malloc heap, other anonymous memory, libraries) and what glibc's
    malloc holds then and after the step (mallinfo2: in use, free but kept);
  * without checkpointing: what autograd keeps for backward at the end of the first forward (the
    saved tensors of every node of the graph, each storage counted once, the weights apart), by
    operation, in floats per token (padding included) and layer.

Timings here are not measurements (the hooks read /proc); `bench_train_trl.py` measures speed.
Results: stdout and benchmarks/results/profile_train_memory.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench_train_common import RESULTS, machine
from bench_train_trl import GC_ARG, child_env, config, conversations, real_model_dir

from dtm.io import atomic_write_json

MiB = 2**20


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: resident now; VmHWM: its peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def smaps_mib() -> dict[str, float]:
    """Resident MiB of this process by kind of mapping."""
    out: Counter = Counter()
    kind = "anonymous"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:  # a mapping's header line
            path = parts[5] if len(parts) > 5 else ""
            kind = ("model file (.safetensors)" if path.endswith(".safetensors") else "malloc heap" if path == "[heap]"
                    else "anonymous" if not path else "libraries (.so)" if ".so" in path else "other files" if path.startswith("/")
                    else path)
        elif parts[0] == "Rss:":
            out[kind] += int(parts[1]) / 1024
    return {k: round(v) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_mib() -> dict[str, float] | None:
    """glibc's malloc: MiB in use (heap chunks + mmapped chunks) and MiB free but kept in its arenas."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return None  # not glibc >= 2.33
    m = libc.mallinfo2()
    return {"in_use": round((m.uordblks + m.hblkhd) / MiB), "free_kept": round(m.fordblks / MiB), "mmapped": round(m.hblkhd / MiB)}


def saved_by_op(root, params: set[int]) -> dict[str, int]:
    """Bytes of the tensors autograd saved for backward in the graph under `root`, by node type
    (each storage once, the first node that holds it; the model's weights apart)."""
    out: Counter = Counter()
    seen_nodes, seen = set(), set(params)
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except RuntimeError:  # freed or not a tensor
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(t, "untyped_storage"):
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        out[node.name()] += storage.nbytes()
        stack.extend(f for f, _ in node.next_functions)
    return dict(out)


def child(args: argparse.Namespace) -> dict:
    """Two training steps in this process with the hooks that record memory."""
    import torch
    from transformers import TrainerCallback

    from dtm.training import train_model

    rec: dict = {"mode": args.gc, "after_imports_mib": round(status_kb("VmRSS") / 1024)}
    steps: list[dict] = []

    def decoder_done(module, inputs, output) -> None:
        row = steps[-1]
        if "forward_end_rss_mib" in row:  # a recompute of the decoder (none here) or an evaluation
            return
        row["forward_end_rss_mib"] = round(status_kb("VmRSS") / 1024)
        hidden = output.last_hidden_state
        row["tokens"] = int(hidden.shape[0] * hidden.shape[1])
        if len(steps) == 1:
            rec["first_forward_end"] = {"smaps_mib": smaps_mib(), "malloc_mib": malloc_mib()}
            if args.gc == "false":
                params = {p.untyped_storage().data_ptr() for p in module.parameters()}
                layers = module.config.num_hidden_layers
                by_op = saved_by_op(hidden.grad_fn, params)
                per = row["tokens"] * layers * 4  # floats per token and layer
                rec["saved_for_backward"] = {
                    "total_mib": round(sum(by_op.values()) / MiB),
                    "floats_per_token_and_layer": round(sum(by_op.values()) / per),
                    "by_op_floats_per_token_and_layer": {k: round(v / per, 1) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
                }

    class Probe(TrainerCallback):
        def on_train_begin(self, a, state, control, model=None, **kw):
            rec["train_begin_rss_mib"] = round(status_kb("VmRSS") / 1024)
            decoder = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
            decoder.register_forward_hook(decoder_done)

        def on_step_begin(self, a, state, control, **kw):
            reset_peak()
            steps.append({"step": state.global_step + 1, "start_rss_mib": round(status_kb("VmRSS") / 1024), "t": time.perf_counter(),
                          "usage": resource.getrusage(resource.RUSAGE_SELF)})

        def on_step_end(self, a, state, control, **kw):
            row = steps[-1]
            row["peak_rss_mib"] = round(status_kb("VmHWM") / 1024)
            row["end_rss_mib"] = round(status_kb("VmRSS") / 1024)
            row["seconds"] = round(time.perf_counter() - row.pop("t"), 1)
            before, now = row.pop("usage"), resource.getrusage(resource.RUSAGE_SELF)
            # CPU time (less moved by other jobs than wall time) and page faults: what the allocator's choices cost
            row |= {"user_s": round(now.ru_utime - before.ru_utime, 1), "sys_s": round(now.ru_stime - before.ru_stime, 1),
                    "minor_faults": now.ru_minflt - before.ru_minflt}
            row["malloc_after_mib"] = malloc_mib()

    torch.set_num_threads(1)
    n_steps = args.examples // args.batch
    with tempfile.TemporaryDirectory(prefix="profile_train_memory_") as tmp:
        train_model(args.model, conversations(args.examples), Path(tmp) / "dtm", config(args, n_steps), progress=False,
                    callbacks=[Probe()])
    rec["steps"] = steps
    # ru_maxrss is the kernel's high-water mark, which each step's reset (clear_refs) resets too: the steps' peaks hold it
    rec["peak_rss_mib"] = max([round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)] + [s["peak_rss_mib"] for s in steps])
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--cutoff", type=int, default=512)
    ap.add_argument("--modes", nargs="+", choices=list(GC_ARG), default=list(GC_ARG), help="train.gradient_checkpointing values")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "profile_train_memory.json")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gc", choices=list(GC_ARG), default="false", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model or real_model_dir()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--child", "--gc", mode, "--model", str(args.model), "--examples", str(args.examples),
               "--batch", str(args.batch), "--cutoff", str(args.cutoff)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env("dtm-chunked"))
        if proc.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-4000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]) | {"loadavg_after": round(os.getloadavg()[0], 2)})
        print(json.dumps(runs[-1]), flush=True)
    result = {"profile": "where LoRA training's memory goes, by train.gradient_checkpointing (dtm, chunked loss)",
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "model": args.model.name,
              "examples": args.examples, "batch": args.batch, "cutoff": args.cutoff, "runs": runs, "machine": machine()}
    if not args.no_save:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
