# Two set-up commands: `make demo` (the main job on the default data) and `make test`.
# torch is pinned here to the CPU wheel this machine has; pyproject keeps a range.
VENV ?= .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.installed-core
STAMP := $(VENV)/.installed
LLAMA_CPP := $(shell grep -o '"llama-cpp-python[^"]*"' pyproject.toml | tr -d '"')
LLAMA_CMAKE_ARGS := -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF
# The dev extra's requirements without llama-cpp-python (for a machine where it does not build).
export DEV_WITHOUT_LLAMA := import tomllib; dev = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]; print(" ".join(r for r in dev if not r.startswith("llama-cpp-python")))

.PHONY: demo demo-round test test-fast bench clean

# The package alone (what `make demo` needs), then the dev extra's test peers (what `make test`
# needs): a demo does not wait for llama.cpp to compile.
$(CORE): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $(CORE)

$(STAMP): $(CORE)
	@# llama-cpp-python (dev extra) compiles llama.cpp from its PyPI source with cmake and the C++
	@# compiler: ~10 CPU-minutes the first time, then pip's cache keeps the wheel. CPU only. If it
	@# does not build, the rest of the dev extra is installed without it and the llama.cpp tests
	@# skip, saying why.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q "$(LLAMA_CPP)" \
		|| echo "llama-cpp-python did not build: the llama.cpp tests will skip"
	if $(PY) -c "import llama_cpp" 2>/dev/null; then $(PY) -m pip install -q -e '.[dev]'; \
	else $(PY) -m pip install -q -e . $$($(PY) -c "$$DEV_WITHOUT_LLAMA"); fi
	@# The web page test drives Debian's chromium (Playwright's own browser download is not
	@# reachable here). Without root or apt the browser test skips and says why.
	command -v chromium >/dev/null || { test "$$(id -u)" = 0 && (apt-get install -y -q chromium >/dev/null \
		|| (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)); } \
		|| echo "chromium not installed: the web page test will skip"
	@# The PostgreSQL tests start a throw-away server from Debian's postgresql package (its
	@# binaries in /usr/lib/postgresql/*/bin, run as its postgres user). Without root or apt
	@# they skip and say why.
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { test "$$(id -u)" = 0 \
		&& (apt-get install -y -q postgresql >/dev/null \
		|| (apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null)); } \
		|| echo "postgresql not installed: the PostgreSQL tests will skip"
	touch $(STAMP)

demo: $(CORE)
	$(VENV)/bin/chatforge pipeline

# One continual-learning round on the demo assistant, on preference pairs generated from its
# Q&A (no users have voted yet): reward model, DPO, evaluation beside the demo model. Apart from
# `make demo` because it does not fit the demo's 30-minute budget on a 2-core CPU (README).
demo-round: $(CORE)
	$(VENV)/bin/chatforge pipeline --generated-prefs

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
