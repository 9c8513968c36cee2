#!/usr/bin/env bash
# Creates .venv in the repository root and installs vlm_prune with its test extras.
# torch is installed first and pinned: any resolver that sees an unpinned torch pulls a
# multi-GB CUDA build, while torch==2.13.0 takes the local CPU wheel on the CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" -c constraints.txt torch==2.13.0
"${PIP[@]}" -c constraints.txt -e ".[test]"
.venv/bin/python -c "import vlm_prune, torch, transformers; print('vlm_prune ready: torch', torch.__version__, '| transformers', transformers.__version__)"
