#!/usr/bin/env bash
# Submit the whole pipeline with dependencies: prep shards (array) -> merge shards -> train -> merge adapter -> eval.
# Each step starts only if the previous one succeeded (--dependency=afterok). Prints the job ids.
#
#   launch/slurm/pipeline.sh RUN_DIR [--nodes N] [--gpus-per-node G] [--shards K] [--skip-prep] [--cpu]
# RUN_DIR is the trainer's output dir (set it in the training config, or pass EXTRA_ARGS="--set output_dir=...").
# Knobs: PREP_CONFIG, PREP_EXTRA_ARGS (prep's --set overrides; the evaluation reads the same tasks), CONFIG,
# DS_CONFIG, EXTRA_ARGS (the trainer's --set overrides), PYTHON, SBATCH_ARGS (extra flags for every sbatch:
# partition, account, time). Run from the repository root.
set -euo pipefail
usage() { sed -n 2,10p "$0" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
RUN="$1"; shift
NODES=1; GPN=8; SHARDS=4; SKIP_PREP=0; CPU=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) NODES="$2"; shift 2 ;;
        --gpus-per-node) GPN="$2"; shift 2 ;;
        --shards) SHARDS="$2"; shift 2 ;;
        --skip-prep) SKIP_PREP=1; shift ;;
        --cpu) CPU=1; shift ;;
        *) echo "pipeline.sh: unknown argument $1" >&2; usage ;;
    esac
done
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo "$PWD/.venv/bin/python" || echo python3 )}"
mkdir -p "$RUN/logs"
SB=(sbatch --parsable --chdir="$PWD" ${SBATCH_ARGS:-})
CPU_ARGS=()
[[ $CPU -eq 1 ]] && CPU_ARGS=(--cpus-per-task=1)  # CPU mode (tests, laptops): small allocations
dep() { [[ -n "${1:-}" ]] && echo "--dependency=afterok:$1" || true; }

PREP_MERGE=""
if [[ $SKIP_PREP -eq 0 ]]; then
    PREP=$("${SB[@]}" "${CPU_ARGS[@]}" --array=0-$((SHARDS - 1)) --output="$RUN/logs/prep-%A_%a.out" \
        --export=ALL,CONFIG="${PREP_CONFIG:-configs/prep/default.yaml}" "$HERE/prep.sbatch")
    PREP_MERGE=$("${SB[@]}" "${CPU_ARGS[@]}" $(dep "$PREP") --output="$RUN/logs/prep-merge-%j.out" \
        --export=ALL,PREP_STEP=merge,CONFIG="${PREP_CONFIG:-configs/prep/default.yaml}" "$HERE/prep.sbatch")
    PREP_MERGE="${PREP_MERGE%%;*}"
fi
if [[ $CPU -eq 1 ]]; then
    TRAIN_SIZE=(--nodes="$NODES" --ntasks-per-node="$GPN" --gpus-per-node=0)
    TRAIN_ENV="ALL,GPUS_PER_NODE=0"
else
    TRAIN_SIZE=(--nodes="$NODES" --ntasks-per-node="$GPN" --gpus-per-node="$GPN")
    TRAIN_ENV="ALL"
fi
TRAIN=$("${SB[@]}" "${CPU_ARGS[@]}" $(dep "$PREP_MERGE") "${TRAIN_SIZE[@]}" --output="$RUN/logs/train-%j.out" \
    --export="$TRAIN_ENV",LOG_DIR="$RUN/logs" "$HERE/train.sbatch")
TRAIN="${TRAIN%%;*}"
# afterok on a requeued job waits for its final, successful run.
MERGE=$("${SB[@]}" $(dep "$TRAIN") --job-name=more-merge --ntasks=1 --output="$RUN/logs/merge-%j.out" \
    --wrap="$PY launch/merge.py --adapter '$RUN/adapter' --out '$RUN/merged'")
EVAL=$("${SB[@]}" $(dep "$MERGE") --job-name=more-eval --ntasks=1 --output="$RUN/logs/eval-%j.out" \
    --wrap="$PY launch/evaluate.py --model '$RUN/merged' --config '${PREP_CONFIG:-configs/prep/default.yaml}' \
${PREP_EXTRA_ARGS:-} --out '$RUN/eval'")
echo "prep=${PREP:-skipped} prep_merge=${PREP_MERGE:-skipped} train=$TRAIN merge=$MERGE eval=$EVAL"
