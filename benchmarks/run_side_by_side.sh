#!/usr/bin/env bash
# The committed side-by-side table: each method at its shipped setting on the same model, records and evaluation,
# one process per method (so each row's peak memory is its own), appended to one results file; then the report.
#
#   EASYEDIT_PATH=<EasyEdit GitHub-main checkout> PY=<python of the venv made by benchmarks/easyedit_main_env.sh> \
#     benchmarks/run_side_by_side.sh zsre 0 100 crispedit ft easyedit-memit easyedit-alphaedit
#
# Arguments: dataset start count method... Results: benchmarks/results/side-by-side/<dataset>-<start>-<count>.jsonl
# and its report folder beside it. Run from the repository root (the data is read from $CRISPEDIT_DATA_DIR or
# ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
dataset=$1 start=$2 count=$3
shift 3
PY=${PY:-python}
# EasyEdit's checkout on the path for every method, so that EasyEdit's own evaluator measures every row alike
: "${EASYEDIT_PATH:?set EASYEDIT_PATH to an EasyEdit GitHub-main checkout}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD:$EASYEDIT_PATH
results=benchmarks/results/side-by-side/${dataset}-${start}-${count}.jsonl
for method in "$@"; do
    "$PY" -m crispedit_easyedit.bench.hydra_app method="$method" dataset="$dataset" dataset.start="$start" \
        dataset.count="$count" results_file="$results" progress=false
done
"$PY" -m crispedit_easyedit.bench.report "$results" --out "${results%.jsonl}"
