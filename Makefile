# Two commands on a fresh machine: `make demo` and `make test`. Each bootstraps .venv
# by itself; the stamp file makes that idempotent (re-done only when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.dtm-installed

.PHONY: demo test venv clean browser
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

test: $(STAMP) browser
	$(PY) -m pytest -q -m "not slow" tests

# The report test opens report.html in a real headless Chromium. Installed from Debian's
# packages where we are root with apt; elsewhere that one test is skipped with a reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "note: chromium not installed; the browser test will be skipped"

clean:
	rm -rf $(VENV) build src/*.egg-info
