# Two commands set everything up on a fresh machine with only Python:
#   make demo   create .venv, install cilab, run the demo on the bundled digits
#   make test   the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch/torchvision first, pinned: on this project's machines pip takes these
# from local wheels; override TORCH_SPEC elsewhere (e.g. aarch64, another CUDA).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev
STAMP  := $(VENV)/.installed-$(EXTRAS)

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cilab demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py --out runs/bench/throughput.json

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
