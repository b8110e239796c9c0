# make demo: set up, get Fashion-MNIST, pretrain with the defaults, print the linear-probe accuracy.
# make test: set up, run the whole test suite.
# TORCH_INDEX=URL takes torch from that index (https://download.pytorch.org/whl/cpu, .../cu126),
# and is kept for later calls (.venv/.torch-index); without it pip takes its configured default,
# which on PyPI for Linux is a CUDA build.
PYTHON      ?= python3
TORCH_INDEX ?= $(shell cat .venv/.torch-index 2>/dev/null)
VENV   := .venv
BIN    := $(VENV)/bin
# The set-up is done again, in an emptied .venv, when the dependencies, this file, the Python version
# or TORCH_INDEX change: venv kept the old interpreter's links over a new Python, and pip kept a
# torch of the other build (2.13.0+cpu satisfies torch==2.13.0 from a CUDA index).
KEY    := $(shell { cat pyproject.toml Makefile; echo '$(TORCH_INDEX)'; } | cksum | cut -d' ' -f1)-$(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
RUN    := $(VENV)/.installed-run-$(KEY)
TESTS  := $(VENV)/.installed-test-$(KEY)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data demo test bench clean

setup: $(RUN)

# What the commands need (make demo, make bench); the test tools come with make test.
$(RUN):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fastclr needs Python 3.11 or newer; $(PYTHON) is " + sys.version.split()[0] + ": make PYTHON=python3.12 (or another)")'
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { echo "$(PYTHON) cannot make a virtual environment (no ensurepip): $(SUDO) apt-get install -y python3-venv, then make again" >&2; exit 1; }
	$(PYTHON) -m venv --clear $(VENV)
	echo '$(TORCH_INDEX)' > $(VENV)/.torch-index
	# torch first, alone and exactly pinned, so that nothing pulls a different build.
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e .
	rm -f $(VENV)/.installed-* && touch $@

$(TESTS): $(RUN)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Fashion-MNIST: already present, else the Debian package, else the official download.
data: $(RUN)
	@$(BIN)/fastclr download fashion-mnist --no-download 2>/dev/null \
	  || { command -v apt-get >/dev/null \
	       && { $(SUDO) apt-get install -y -q dataset-fashion-mnist \
	            || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; }; }; } \
	  || $(BIN)/fastclr download fashion-mnist

demo: data
	$(BIN)/fastclr pretrain

test: $(TESTS)
	$(BIN)/ruff check fastclr tests benchmarks
	$(BIN)/mypy
	FASTCLR_REQUIRE_EXTRAS=1 $(BIN)/python -m pytest

bench: $(RUN)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
