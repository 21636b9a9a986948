# hbpc: `make demo` and `make test` work on a fresh machine.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
FASHION = /usr/share/datasets/fashion-mnist

.PHONY: install test demo fashion-mnist clean golden fuzz bench bench-ttt reproduce

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
	$(PY) -m pytest -n auto --maxprocesses 4

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package. Nothing is installed here: without it the
# demo says how to get it and falls back to scikit-learn's digits.
fashion-mnist:
	@test -d $(FASHION) || echo "note: Fashion-MNIST not found in $(FASHION); get it with" \
	  "'sudo apt-get install dataset-fashion-mnist' (the demo now uses scikit-learn's digits instead)"

# Tutorial 2 (sigmoid FCNN, HBP Newton-CG (its defaults, step(closure)) vs SGD and Adam, 200 steps of batch 500; a few minutes on 2 cores):
# out/demo/curves.png (loss and accuracy against steps and seconds), curves.csv and a summary table.
demo: install fashion-mnist
	mkdir -p out/demo
	$(VENV)/bin/hbpc compile examples/models/fcnn_fashion_mnist.py -o out/demo/curv_fcnn.py
	$(PY) examples/02_sequential.py --compiled out/demo/curv_fcnn.py --out out/demo

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

# Time to a target test accuracy: Newton-CG, KFAC, SGD, Adam on the sigmoid FCNN and a ReLU CNN (about 15 min idle):
# prints and writes bench/RESULTS-time-to-target.md.
bench-ttt: install fashion-mnist
	$(PY) -m bench.time_to_target

clean:
	rm -rf $(VENV) out .pytest_cache
