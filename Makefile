# The README's commands. Every target sets up .venv first (idempotent; a stamp file skips the work when
# nothing it depends on changed).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP_DEPS := $(VENV)/.deps-stamp
STAMP_BUILD := $(VENV)/.build-stamp
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu) setup.py pyproject.toml
PYFILES := pypattern tests bench setup.py
# Two OpenMP/BLAS threads per process by default (override with OMP_NUM_THREADS=...); fewer threads than cores
# keep timings and tests steady when other processes share the CPU.
export OMP_NUM_THREADS ?= 2

.PHONY: setup build test lint demo bench bench-peers test-peers check-cuda clean

setup: $(STAMP_BUILD)

$(STAMP_DEPS): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=70" wheel
	# torch==2.13.0 is the CPU build on local disk; any other version downloads a multi-GB CUDA build. The other
	# tools are pinned to the releases the suite passes with, so that a new release of one (a formatter's style, a
	# model library's internals) cannot turn the tests red on its own; raise a pin together with a passing run.
	$(PIP) install -q torch==2.13.0 numpy==2.4.6 scipy==1.17.1 tqdm==4.70.1 matplotlib==3.11.2 triton==3.7.1 \
		pytest==9.2.0 pytest-benchmark==5.3.1 pytest-xdist==3.8.0 hypothesis==6.170.27 ninja==1.13.2 ruff==0.17.6 \
		transformers==5.25.0 pandas==3.1.1
	touch $@

$(STAMP_BUILD): $(STAMP_DEPS) $(CSRC)
	flock /tmp/pypattern-build.lock env MAX_JOBS=2 $(PIP) install -q --no-build-isolation -e .
	touch $@

build: $(STAMP_BUILD)

lint: $(STAMP_DEPS)
	$(VENV)/bin/ruff check $(PYFILES)
	$(VENV)/bin/ruff format --check $(PYFILES)

# The tests run in TEST_WORKERS processes (pytest-xdist; a test file stays in one process), one thread each.
TEST_WORKERS ?= 2

# Bytecode is written even where PYTHONDONTWRITEBYTECODE is set: the tests start Python processes that import the
# library, and each would compile it again.
test: setup lint
	env -u PYTHONDONTWRITEBYTECODE OMP_NUM_THREADS=1 $(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: setup
	$(VPY) -m pypattern.cli demo

# Our kernels and estimators against their references (the peer comparisons skip in .venv: peers live in bench venvs).
bench: setup
	$(VPY) -m pytest -q bench --benchmark-columns=min,median,rounds

# The peer comparisons, each in its bench-only venv (TransformerLens 4.3.0; devinterp 1.3.2 and 2.0.1; pytorch-cka;
# repsim 0.1.5 and scikit-learn; auto-circuit 1.0.1).
bench-peers: setup
	bash bench/envs/tl.sh
	.bench-venvs/tl/bin/python -m pytest -q bench/bench_patching.py -s --benchmark-columns=min,median,rounds
	bash bench/envs/devinterp.sh
	.bench-venvs/devinterp13/bin/python -m pytest -q bench/bench_llc.py -s --benchmark-columns=min,median,rounds
	.bench-venvs/devinterp20/bin/python -m pytest -q bench/bench_llc.py bench/bench_susceptibility.py -s \
		--benchmark-columns=min,median,rounds
	bash bench/envs/cka.sh
	.bench-venvs/cka/bin/python -m pytest -q bench/bench_equivalence.py -s --benchmark-columns=min,median,rounds
	bash bench/envs/repsim.sh
	.bench-venvs/repsim/bin/python -m pytest -q bench/bench_cca.py bench/bench_ridge.py -s --benchmark-columns=min,median,rounds
	bash bench/envs/autocircuit.sh
	.bench-venvs/autocircuit/bin/python -m pytest -q bench/bench_circuits.py -s --benchmark-columns=min,median,rounds

# The tests that need a peer library, each in the bench venv that has it: the TransformerLens 4.3.0 bridge
# conversions, and TransformerLens 2.16.1's HookedTransformer conversions (skipped in .venv).
test-peers: setup
	bash bench/envs/tl.sh
	OMP_NUM_THREADS=1 PYTHONPATH=. .bench-venvs/tl/bin/python -m pytest -q tests/test_convert.py tests/test_tl_models_audit.py -k "transformer_lens or bridge or tl" -p no:cacheprovider
	OMP_NUM_THREADS=1 PYTHONPATH=. .bench-venvs/tl/bin/python -m pytest -q tests/test_hook_api_parity_audit.py -p no:cacheprovider
	bash bench/envs/autocircuit.sh
	OMP_NUM_THREADS=1 PYTHONPATH=. .bench-venvs/autocircuit/bin/python -m pytest -q tests/test_hooked_transformer.py tests/test_hooked_transformer_configs.py tests/test_readme_names_and_tl_walkthrough.py -p no:cacheprovider

check-cuda:
	bash .ci/check_cuda.sh

clean:
	rm -rf build $(VENV) pypattern/*.so *.egg-info
