# hbpc: `make demo` and `make test` work on a fresh machine.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
FASHION = /usr/share/datasets/fashion-mnist

.PHONY: install test demo fashion-mnist clean golden fuzz bench reproduce

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The bench extra brings BackPACK and curvlinops, which the tests compare against; the laplace extra
# brings laplace-torch for hbpc.laplace (both installed with --no-deps so torch stays as it is).
test: install $(VENV)/.bench-installed $(VENV)/.laplace-installed
	$(PY) -m pytest

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package; without it the demo falls back to sklearn digits.
fashion-mnist:
	@test -d $(FASHION) || (command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1) || \
	  echo "note: could not install dataset-fashion-mnist; the demo uses sklearn digits instead"

# Tutorial 2 (sigmoid FCNN, HBP Newton-CG vs SGD and Adam): out/demo/curves.png and curves.csv.
demo: install fashion-mnist
	mkdir -p out/demo
	$(VENV)/bin/hbpc compile examples/models/fcnn_fashion_mnist.py -o out/demo/curv_fcnn.py
	$(PY) examples/02_sequential.py --compiled out/demo/curv_fcnn.py --steps 300 --out out/demo

# The HBP paper's four experiments on Fashion-MNIST (~50 min on 2 cores; resumable): results/ figures and RESULTS.md.
reproduce: install fashion-mnist
	$(VENV)/bin/hbpc-experiments all --profile here

golden: install
	$(PY) -m pytest tests/test_golden.py --update-golden

# The long architecture-fuzzing profile (`make test` runs 20 models); FUZZ_SEED=n draws a different sequence.
FUZZ_EXAMPLES ?= 500
fuzz: install
	HBPC_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(if $(FUZZ_SEED),HBPC_FUZZ_SEED=$(FUZZ_SEED)) \
	  $(PY) -m pytest tests/test_fuzz.py -p no:cacheprovider --hypothesis-show-statistics

# Benchmarks against BackPACK, curvlinops and torch.func (~15 min): prints and writes bench/RESULTS.md.
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml bench/install.py
	$(PY) bench/install.py bench
	touch $@

$(VENV)/.laplace-installed: $(VENV)/.installed pyproject.toml bench/install.py
	$(PY) bench/install.py laplace
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m bench

clean:
	rm -rf $(VENV) out .pytest_cache
