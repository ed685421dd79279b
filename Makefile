# The README's commands. Every pip call goes through constraints.txt (torch==2.13.0
# takes the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
STAMP  := $(VENV)/.flgengine-installed
NATIVE := CMakeLists.txt pyproject.toml constraints.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: setup build test demo bench clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Installs the project editable with its test dependencies and builds flgengine._C
# (C++ CPU ops always; CUDA ops too when nvcc is found).
$(STAMP): $(PY) $(NATIVE)
	$(PIP) --upgrade pip
	$(PIP) "torch==2.13.0" "scikit-build-core>=0.10" "pybind11>=2.12" ninja
	$(PIP) --no-build-isolation -e ".[dev]"
	@touch $(STAMP)

build: $(STAMP)
	$(PY) -c "import flgengine.ops.native as n; print(n.build_info())"

test: $(STAMP)
	$(PY) -m pytest -q

# Until the shapes-world models ship, the demo builds a tiny random Wan bundle (umT5 +
# Wan VAE + DiT, all random) and generates a video end to end: the video is noise-like.
demo: $(STAMP)
	$(PY) -m flgengine.testing tiny-wan-bundle demo-out/tiny-wan
	$(PY) -m flgengine generate "a red circle moving left" --model demo-out/tiny-wan -o demo-out/tiny-wan.mp4
	$(PY) -m flgengine info demo-out/tiny-wan
	@echo "demo video: $(CURDIR)/demo-out/tiny-wan.mp4"

bench: $(STAMP)
	$(PY) -m pytest bench -q

clean:
	rm -rf build demo-out .pytest_cache
