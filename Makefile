# Two entry points (see README): `make train` runs the main job, `make test` runs the test suite.
# Each installs what it needs first.
PYTHON ?= python3
WORKDIR ?= runs/cifar10
CONFIG ?= experiments/configs/cifar10.py
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
TORCH_CPU ?= torch==2.13.0

.PHONY: install install-test data-test train digits test test-all

install:
	$(PYTHON) -m pip install -q -e '.[experiments]'

# Test dependencies: the package with its extras, the CPU build of torch (benchmark peer and
# cross-check) and the Debian package with the real Fashion-MNIST files.
install-test:
	$(PYTHON) -m pip install -q -e '.[test]' '$(TORCH_CPU)'

data-test:
	@if [ ! -f $(FASHION_MNIST_DIR)/t10k-labels-idx1-ubyte.gz ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; \
	fi

train: install
	$(PYTHON) -m experiments.cifar --workdir=$(WORKDIR) --config=$(CONFIG)

digits: install
	$(PYTHON) -m experiments.cifar --workdir=runs/digits --config=experiments/configs/digits.py

test: install-test data-test
	$(PYTHON) -m pytest -q -m "not slow"

test-all: install-test data-test
	$(PYTHON) -m pytest -q
