# hbpc: `make demo` and `make test` work on a fresh machine.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
FASHION = /usr/share/datasets/fashion-mnist

.PHONY: install test demo fashion-mnist clean golden

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package; without it the demo falls back to sklearn digits.
fashion-mnist:
	@test -d $(FASHION) || (command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1) || \
	  echo "note: could not install dataset-fashion-mnist; the demo uses sklearn digits instead"

demo: install fashion-mnist
	$(VENV)/bin/hbpc compile examples/models/fcnn_fashion_mnist.py -o examples/generated/fcnn_fashion_mnist.py
	$(PY) examples/02_sequential.py --steps 300 --out out/demo

golden: install
	$(PY) -m pytest tests/test_golden.py --update-golden

clean:
	rm -rf $(VENV) out .pytest_cache
