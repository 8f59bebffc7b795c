#!/usr/bin/env bash
# Wall seconds of a reduced `make analyses`: examples/lab-analyses.yaml at train.num_train_epochs=2
# with three cells (center, K=2, by_source; sweep.center_only: [baselines, sub_models]), 3 seeds,
# OMP_NUM_THREADS=1 as `make` sets it. Arms, alternating in order round by round, each in a fresh
# output directory: the seed runs one after another (OLD_SRC's code, e.g. a checkout of main
# before side by side; else this tree with DTM_SEEDS_SEQUENTIAL=1) and side by side (NEW_SRC).
# Prints each arm's wall seconds with the load average before and after, then whether every
# weights file, portion and score of the two arms' last rounds is the same (it must be).
#
# usage (repo root):  benchmarks/bench_seeds_side_by_side.sh OUT_DIR [ROUNDS]
#   env: PY (default .venv/bin/python), NEW_SRC (default ./src), OLD_SRC (optional)
set -euo pipefail
OUT=${1:?usage: benchmarks/bench_seeds_side_by_side.sh OUT_DIR [ROUNDS]}
ROUNDS=${2:-1}
PY=${PY:-.venv/bin/python}
NEW_SRC=${NEW_SRC:-$PWD/src}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
"$PY" - "$OUT/reduced.yaml" <<'EOF'
import sys

import yaml

cfg = yaml.safe_load(open("examples/lab-analyses.yaml"))
cfg["train"]["num_train_epochs"] = 2
cfg["sweep"] = {"mode": "one_at_a_time", "center_only": ["baselines", "sub_models"],
                "disperse.k": [2, 4], "disperse": [{"strategy": "random"}, {"strategy": "by_source"}]}
yaml.safe_dump(cfg, open(sys.argv[1], "w"), sort_keys=False)
EOF

arm() {  # arm NAME ENV=VALUE...: one run of the reduced sweep
  local name=$1; shift
  local dir="$OUT/$name-$round"
  rm -rf "$dir"
  local before t0 t1
  before=$(cut -d' ' -f1-3 /proc/loadavg)
  t0=$(date +%s%N)
  env OMP_NUM_THREADS=1 "$@" "$PY" -m dtm.cli run "$OUT/reduced.yaml" "output_dir=$dir" > "$dir.log" 2>&1
  t1=$(date +%s%N)
  echo "$name round $round: $(( (t1 - t0) / 1000000 )) ms wall; load average $before -> $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/times.txt"
}

if [ -n "${OLD_SRC:-}" ]; then OLD=(one-after-another "PYTHONPATH=$OLD_SRC"); else OLD=(one-after-another "PYTHONPATH=$NEW_SRC" DTM_SEEDS_SEQUENTIAL=1); fi
for round in $(seq 1 "$ROUNDS"); do
  if (( round % 2 )); then arm "${OLD[@]}"; arm side-by-side "PYTHONPATH=$NEW_SRC"
  else arm side-by-side "PYTHONPATH=$NEW_SRC"; arm "${OLD[@]}"; fi
done

"$PY" benchmarks/same_outputs.py "$OUT/one-after-another-$ROUNDS" "$OUT/side-by-side-$ROUNDS" | tee -a "$OUT/times.txt"
