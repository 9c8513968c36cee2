#!/usr/bin/env bash
# Creates .venv in the repository root and installs vlm_prune with its test, plot and lmms extras.
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
"${PIP[@]}" -c constraints.txt -e ".[test,plot,lmms]"   # plot: matplotlib, for the demo's and the eval's plots
# lmms: lmms-eval, for `vlm-prune lmms-eval`. It requires torchvision, and PyPI's is a CUDA build that
# breaks `import transformers` beside the CPU torch ("operator torchvision::nms does not exist"):
# removed where it does not import (lmms-eval's llava_hf does not use it; its Qwen models need a
# torchvision that matches torch).
if .venv/bin/python -m pip show --quiet torchvision 2>/dev/null && ! .venv/bin/python -c "import torchvision" 2>/dev/null; then
    .venv/bin/python -m pip uninstall --quiet --yes torchvision
fi
.venv/bin/python -c "import vlm_prune, torch, transformers; print('vlm_prune ready: torch', torch.__version__, '| transformers', transformers.__version__)"
