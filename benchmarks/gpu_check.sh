#!/usr/bin/env bash
# The one command to run on the GPU machine (from the repository root, with the wheels in .whl/):
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh [--budget-s 450] [--only gpu_tests ...]
#
# That machine has torch with CUDA and most of our dependencies, but not pydantic (and the
# exact transformers/peft/accelerate/huggingface_hub versions this project is tested with);
# .whl/ carries those as wheels for CPython 3.12 (see docs/architecture.md, "GPU paths").
# They go into /tmp/site, which comes first on PYTHONPATH. Everything lands in $OUT
# (gpu_check.json, gpu_tests.xml, logs/, work/).
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
