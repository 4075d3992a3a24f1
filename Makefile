# The two commands of the README: `make demo` and `make test`. Each creates or reuses what it needs first.
VENV ?= .venv
SGLANG_VENV ?= sglang-venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup setup-integration corpus ablate demo test test-fast bench

setup:
	@tools/setup_venv.sh $(VENV) dev

# The integration tests run against real components: an SGLang server in its own virtualenv, a local
# Slurm with accounting, NeMo-Run.
setup-integration: setup
	@tools/install_sglang.sh $(SGLANG_VENV)
	@tools/install_launch.sh $(VENV)

# Real English prose offline: FOLDOC + the Jargon File (Debian dictd databases, unpacked into data/dictd), split
# by document into data/encyclopedia/{train,heldout} (rntp_megatron/data/corpora.py).
corpus: setup
	@tools/install_corpus.sh data/dictd
	@[ -s data/encyclopedia/train_answers.idx ] || $(PY) -m rntp_megatron.cli prepare-data --recipe encyclopedia \
		--output data/encyclopedia --no-progress

# RNTP branches vs next-token training at equal FLOPs on that corpus (rntp_megatron/ablate.py; ~50 min on 2 cores:
# 13 branch runs, 14 evaluations of 2,000 held-out sites; BENCHMARKS.md)
ablate: corpus
	$(PY) -m rntp_megatron.cli ablate --config recipes/configs/ablate_text.yaml --run-dir runs/ablate

# the demo is one process: let it use both cores
demo: OMP_NUM_THREADS = 2
demo: setup
	$(PY) -m rntp_megatron.cli demo

# The headline benchmarks side by side (tools/bench_all.py, ~15 min on 2 cores): runs/bench/summary.md and .json.
# BENCH_ARGS=--full for the sizes BENCHMARKS.md quotes, --smoke for seconds per tool.
bench: setup-integration
	$(PY) tools/bench_all.py $(BENCH_ARGS)

test: setup-integration corpus
	$(PY) -m pytest -q -rs --durations=40

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not distributed and not sglang and not slurm and not nemo_run and not learning"
