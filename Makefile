# Two commands set everything up on a fresh machine with only Python:
#   make demo   create .venv, install cilab, run the demo on the bundled digits
#   make test   the test suite (installs the ray extra too: the Ray executor is tested)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch/torchvision first, pinned: on this project's machines pip takes these
# from local wheels; override TORCH_SPEC elsewhere (e.g. aarch64, another CUDA).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# One stamp per set of extras: `make demo` stays light (dev), `make test` adds
# Ray so that tests/test_parallel.py runs the Ray executor instead of skipping it.
EXTRAS ?= dev
TEST_EXTRAS ?= dev,ray
STAMP  := $(VENV)/.installed-$(EXTRAS)
TEST_STAMP := $(VENV)/.installed-$(TEST_EXTRAS)

.PHONY: install demo test bench clean

$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[$*]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cilab demo --out runs/demo

# one pytest-xdist worker per core (tests/conftest.py splits torch's threads among them); a
# test file stays on one worker, so its module fixtures (the demo's four runs) are trained once
test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile tests

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py --out runs/bench/throughput.json

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
