# Every target does its own set-up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo lint test test-fast bench docs clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,export]'
	touch $(STAMP)

install: $(STAMP)

# Synthetic data -> label files -> train -> evaluate with pictures (under 5 minutes on 2 cores).
demo: $(STAMP)
	$(PY) bin/make_synthetic.py --out_dir=data/synthetic --num_images=12 --num_test=4 --seed=0
	$(PY) bin/preprocess.py --dataset=synthetic --data_dir=data/synthetic --out_dir=data/synthetic_labels
	$(PY) bin/train.py --flagfile=configs/demo.cfg
	$(PY) bin/evaluate.py --flagfile=configs/demo.cfg --visualize

# ruff's rules are in pyproject.toml; pytest also runs the docstrings' >>> examples.
lint: $(STAMP)
	$(PY) -m ruff check retina_tf bin tests bench

# One pytest worker per core (pytest-xdist), each test file in one worker so that its
# module-scoped fixtures (a trained run, an export) are made once: 1.6x faster on 2 cores.
# TEST_WORKERS=0 runs the tests one after another in this process.
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: lint
	$(PYTEST)

test-fast: lint
	$(PYTEST) -m "not slow"

# docs/cli.md, the flag reference, from the flag definitions (tests/test_docs.py checks it).
docs: $(STAMP)
	$(PY) -m retina_tf.flags docs/cli.md

bench: $(STAMP)
	$(PY) bench/pipeline_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
