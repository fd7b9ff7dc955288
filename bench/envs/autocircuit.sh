#!/usr/bin/env bash
# Bench-only venv for the auto-circuit 1.0.1 comparison (bench/bench_circuits.py).
# auto-circuit builds on TransformerLens' HookedTransformer (removed in TransformerLens 4.x): pin a 2.x release.
# Neither is ever a dependency of pypattern: they live only in .bench-venvs/autocircuit (git-ignored).
# torch is pinned to 2.13.0: any other torch resolves to a multi-GB CUDA build.
# auto-circuit is installed without its declared dependencies (tracr/jax, kaleido, word2word are only used by
# parts of it the benchmark does not import); the ones its patching and pruning modules import are listed here.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="$ROOT/.bench-venvs/autocircuit"
PY="${PY:-python3}"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip "setuptools>=70" wheel
"$VENV/bin/pip" install -q torch==2.13.0 numpy scipy tqdm ninja pytest pytest-benchmark pandas matplotlib
# The torch pin is repeated so the resolver cannot swap it for another build.
"$VENV/bin/pip" install -q torch==2.13.0 "transformer-lens==${TL_VERSION:-2.16.1}"
"$VENV/bin/pip" install -q --no-deps auto-circuit==1.0.1
# TransformerLens 2.x keeps numpy < 2; the newest datasets and pyarrow need numpy 2.
"$VENV/bin/pip" install -q torch==2.13.0 einops ordered-set plotly blobfile vscode-tqdm "pyarrow<19" "datasets<3"
# pypattern itself, editable, built against the venv's torch (the C++ extension compiles under a lock).
flock /tmp/pypattern-build.lock env MAX_JOBS=2 "$VENV/bin/pip" install -q --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c "import torch, transformer_lens, auto_circuit.prune, pypattern; print('autocircuit venv ok: torch', torch.__version__, 'transformer_lens', transformer_lens.__version__ if hasattr(transformer_lens, '__version__') else '?')"
echo "run: $VENV/bin/python -m pytest -q $ROOT/bench/bench_circuits.py --benchmark-only -s"
