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

# The demo runs the built-in default model (shapes-4step, the FastLightGen student shipped
# in flgengine/assets: 4 steps, no CFG) and, for comparison, its 50-step + CFG teacher:
# nothing is downloaded.
demo: $(STAMP)
	$(PY) -m flgengine generate "a red circle moving left" -o demo-out/red-circle-left.mp4
	$(PY) -m flgengine generate "a yellow triangle moving up" -o demo-out/yellow-triangle-up.gif
	$(PY) -m flgengine generate "a red circle moving left" --model shapes-teacher -o demo-out/red-circle-left-teacher.mp4
	$(PY) -m flgengine info shapes-4step
	@echo "demo videos: $(CURDIR)/demo-out/red-circle-left.mp4 $(CURDIR)/demo-out/yellow-triangle-up.gif $(CURDIR)/demo-out/red-circle-left-teacher.mp4"

bench: $(STAMP)
	$(PY) -m pytest bench -q

clean:
	rm -rf build demo-out .pytest_cache
