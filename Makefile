# Two entry points (see README): `make train` runs the main job, `make test` runs the test suite.
# Each installs what it needs first, at the versions of constraints.txt (the tested stack), and
# only when pyproject.toml, constraints.txt or this file changed since its last install into the
# same Python environment (stamp files in build/; `rm -r build` forces a reinstall).
# `make test-latest` installs the newest releases instead and runs the tests.
PYTHON ?= python3
WORKDIR ?= runs/cifar10
CONFIG ?= experiments/configs/cifar10.py
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
TORCH_CPU ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
# One stamp per Python environment, so that another interpreter or virtual environment installs.
ENV_ID := $(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])')

.PHONY: install install-test data-test lint docs train digits test test-all test-latest

install: build/install-$(ENV_ID).stamp

build/install-$(ENV_ID).stamp: pyproject.toml $(CONSTRAINTS) Makefile
	$(PYTHON) -m pip install -q -c $(CONSTRAINTS) -e '.[experiments]'
	@mkdir -p build && touch $@

# Test dependencies: the package with its extras, the CPU build of torch (benchmark peer and
# cross-check) and the Debian package with the real Fashion-MNIST files.
install-test: build/install-test-$(ENV_ID).stamp

build/install-test-$(ENV_ID).stamp: pyproject.toml $(CONSTRAINTS) Makefile
	$(PYTHON) -m pip install -q -c $(CONSTRAINTS) -e '.[test]' '$(TORCH_CPU)'
	@mkdir -p build && touch $@

data-test:
	@if [ ! -f $(FASHION_MNIST_DIR)/t10k-labels-idx1-ubyte.gz ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; \
	fi

train: install
	$(PYTHON) -m experiments.cifar --workdir=$(WORKDIR) --config=$(CONFIG)

digits: install
	$(PYTHON) -m experiments.cifar --workdir=runs/digits --config=experiments/configs/digits.py

# Lint and format check (ruff) and type check (mypy on empf_jax/); settings in pyproject.toml.
lint: install-test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

# The documentation site (Sphinx, MyST): docs/_build/html/index.html; a warning fails the build.
docs: install-test
	$(PYTHON) -m sphinx -E -W --keep-going -q -b html docs docs/_build/html

test: install-test data-test lint docs
	$(PYTHON) -m pytest -q -m "not slow"

test-all: install-test data-test lint docs
	$(PYTHON) -m pytest -q

# The newest releases of every dependency, then the default suite: shows whether the code still
# works with what a fresh install without constraints gets (`make test-latest PYTHON=python3.12`).
# torch is not installed here (its CPU build exists for the pinned Python only): the tests that
# compare with PyTorch skip.
test-latest: data-test
	$(PYTHON) -m pip install -q -U --upgrade-strategy eager -e '.[test]'
	@rm -f build/install-*.stamp  # the environment no longer holds the constrained versions
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check . && $(PYTHON) -m mypy
	$(PYTHON) -m sphinx -E -W --keep-going -q -b html docs docs/_build/html
	$(PYTHON) -m pytest -q -m "not slow"
