#!/usr/bin/env bash
# The defaults, judged again on three tasks (docs/study.md, "The defaults, judged again"):
#
#   benchmarks/defaults_study.sh                 # all three tasks on the built-in model (hours on 2 CPU cores)
#   STUDY_STEPS=4 STUDY_OUT=runs/defaults-smoke benchmarks/defaults_study.sh   # the same commands in minutes
#
# Tasks: the medication extraction (data/demo/), the date normalisation (data/dates/) and a third task of another
# kind that the earlier choice of defaults never saw (STUDY_TASKS, default "demo dates tickets"). Per task, one
# cache (the forgetting study's, reused when it exists) and one sweep (configs/defaults_study.yaml), every run at
# the default length (480 task rows, so every run sees the same task exposure):
#   1. plain QLoRA, and lambda 1 (the default), 2, 5 and 10 with the KL on the rehearsal examples;
#   2. at the lambda with the least forgetting among those within 2 points of plain QLoRA's task score (the
#      study's bar; `defaults_summary.py stage2`): a second seed; the same exposure in half the steps (batch 16:
#      half as many optimiser updates, the lever the forgetting study pointed at, since forgetting grew with the
#      number of steps); and a forgetting budget (--max-forgetting at lambda 1's held-out forgetting) started
#      from lambda 1, as a candidate default.
# Stage 1 runs for every task before any stage 2, so that an interrupted study has the main comparison first.
# Every step keeps what an earlier run finished: rerun the script to continue.
set -euo pipefail
cd "$(dirname "$0")/.."

P=${PIPELINE:-.venv/bin/pipeline}
PY=${PYTHON:-.venv/bin/python}
OUT=${STUDY_OUT:-runs/study}
CONFIG=configs/defaults_study.yaml
TASKS=${STUDY_TASKS:-demo dates tickets}
EXTRA=() N=1000000
if [[ -n ${STUDY_STEPS:-} ]]; then  # a smoke run of the same commands: a slice of the data, few steps
    EXTRA=(--max-steps "$STUDY_STEPS" --eval-every 2 --eval-limit 8) N=24
fi
t0=$SECONDS
mkdir -p "$OUT/data/demo"
for f in general_prompts_train general_prompts_eval; do
    head -n $N "data/demo/$f.jsonl" >"$OUT/data/demo/$f.jsonl"
done
"$P" make-rehearsal --config "$CONFIG" --prompts "$OUT/data/demo/general_prompts_train.jsonl" --out "$OUT/rehearsal_train.jsonl"
"$P" make-rehearsal --config "$CONFIG" --prompts "$OUT/data/demo/general_prompts_eval.jsonl" --out "$OUT/rehearsal_eval.jsonl"

for task in $TASKS; do
    T="$OUT/$task"
    mkdir -p "$OUT/data/$task"
    for split in train eval; do
        head -n $N "data/$task/task_$split.jsonl" >"$OUT/data/$task/task_$split.jsonl"
    done
    "$P" cache-teacher --config "$CONFIG" --task-train "$OUT/data/$task/task_train.jsonl" \
        --task-eval "$OUT/data/$task/task_eval.jsonl" \
        --rehearsal-train "$OUT/rehearsal_train.jsonl" --rehearsal-eval "$OUT/rehearsal_eval.jsonl" --out "$T/cache"
    "$P" sweep --config "$CONFIG" --cache "$T/cache" --out "$T/defaults" "${EXTRA[@]}"
done

for task in $TASKS; do
    T="$OUT/$task"
    "$PY" benchmarks/defaults_summary.py stage2 "$CONFIG" "$T/defaults" "$T/defaults-stage2.yaml"
    "$P" sweep --config "$T/defaults-stage2.yaml" --cache "$T/cache" --out "$T/defaults" "${EXTRA[@]}"
done

echo "defaults study done in $((SECONDS - t0)) s: $(for t in $TASKS; do printf '%s ' "$OUT/$t/defaults/report.md"; done)"
