#!/usr/bin/env bash
# The one command to run on the GPU machine (from the repository root, with the wheels in .whl/):
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh [--budget-s 450] [--only gpu_tests ...]
#
# That machine has torch with CUDA and most of our dependencies, but not pydantic (and the
# exact transformers/peft/accelerate/huggingface_hub versions this project is tested with);
# .whl/ carries those as wheels for CPython 3.12 (see docs/architecture.md, "GPU paths").
# They go into /tmp/site, which comes first on PYTHONPATH. Everything lands in $OUT
# (gpu_check.json, gpu_tests.xml, logs/, work/). The wheels (about 19 MB, not in git) are made
# on a machine with PyPI access, at the versions of the project's venv:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 huggingface-hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 \
#     anyio==4.16.0 h11==0.16.0 idna==3.20 truststore==0.10.5 click==8.5.1 fsspec==2026.9.0 typing-extensions==4.16.0 \
#     typer==0.29.2 shellingham==1.5.4 annotated-doc==0.0.7
#
# (transformers: the machine's 5.17 lacks TrainingArguments(activation_checkpointing=) and
# Trainer.loss_is_scaled_for_ga, which dtm uses; 5.24 needs huggingface_hub >= 1.31, hence the
# hub and its pure-Python dependencies. datasets, ray, mergekit and lm-eval are not needed here.)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/pip_install.log" 2>&1 \
    || { echo "pip install of .whl/ failed (see $OUT/pip_install.log):"; tail -5 "$OUT/pip_install.log"; }
else
  echo "no .whl/ directory here: using the machine's own packages"
fi
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true
exec python3 benchmarks/gpu_check.py --out "$OUT" --device "${DEVICE:-cuda}" "$@"
