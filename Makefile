# The two commands of the README: `make demo` and `make test`. Each creates or reuses what it needs first.
VENV ?= .venv
SGLANG_VENV ?= sglang-venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup setup-integration demo test test-fast

setup:
	@tools/setup_venv.sh $(VENV) dev

# The integration tests run against real components: an SGLang server in its own virtualenv, a local
# Slurm with accounting, NeMo-Run.
setup-integration: setup
	@tools/install_sglang.sh $(SGLANG_VENV)
	@tools/install_launch.sh $(VENV)

# the demo is one process: let it use both cores
demo: OMP_NUM_THREADS = 2
demo: setup
	$(PY) -m rntp_megatron.cli demo

test: setup-integration
	$(PY) -m pytest -q -rs --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not distributed and not sglang and not slurm and not nemo_run and not learning"
