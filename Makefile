# make demo: set up, get Fashion-MNIST, pretrain with the defaults, print the linear-probe accuracy.
# make test: set up, run the whole test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, alone and exactly pinned, so that nothing pulls a different build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

# Fashion-MNIST: already present, else the Debian package, else the official download.
data: $(STAMP)
	@$(BIN)/fastclr download fashion-mnist --no-download 2>/dev/null \
	  || { command -v apt-get >/dev/null \
	       && { $(SUDO) apt-get install -y -q dataset-fashion-mnist \
	            || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; }; }; } \
	  || $(BIN)/fastclr download fashion-mnist

demo: data
	$(BIN)/fastclr pretrain

test: $(STAMP)
	$(BIN)/ruff check fastclr tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
