# Two set-up commands: `make demo` (the main job on the default data) and `make test`.
# torch is pinned here to the CPU wheel this machine has; pyproject keeps a range.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@# The web page test drives Debian's chromium (Playwright's own browser download is not
	@# reachable here). Without root or apt the browser test skips and says why.
	command -v chromium >/dev/null || { test "$$(id -u)" = 0 && (apt-get install -y -q chromium >/dev/null \
		|| (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)); } \
		|| echo "chromium not installed: the web page test will skip"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/chatforge pipeline

test: $(STAMP)
	$(PY) -m pytest -x -q

test-fast: $(STAMP)
	$(PY) -m pytest -x -q -m "not e2e"

bench: $(STAMP)
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
