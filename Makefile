# The two commands of the README: `make demo` and `make test`. Both create or reuse .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test test-fast

setup:
	@tools/setup_venv.sh $(VENV) dev

demo: setup
	$(PY) -m rntp_megatron.cli demo

test: setup
	$(PY) -m pytest -q -rs

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not sglang and not slurm and not nemo_run and not learning"
