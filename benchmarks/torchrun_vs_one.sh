#!/usr/bin/env bash
# Both stages on the built-in model, 1 process against 2 under torchrun, on 64 demo examples:
# wall times, whether the two caches hold the same rows, and the loss at the last step of each.
#   benchmarks/torchrun_vs_one.sh [WORK_DIR]      (default: a new temporary directory)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY="$REPO/.venv/bin/python"
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK" && cd "$WORK" && rm -rf c1 c2 t1 t2
head -n 48 "$REPO/data/demo/task_train.jsonl" >task.jsonl
general="$REPO/runs/demo/rehearsal_train.jsonl"  # the demo's general answers, if ./run_all.sh made them
[[ -f $general ]] || general="$REPO/data/templates/instruction_input_output.jsonl"
head -n 16 "$general" >rehearsal.jsonl

cache_args=(--task-train task.jsonl --rehearsal-train rehearsal.jsonl --top-k 32 --max-length 256 --shard-size 8
            --batch-size 8)
train_args=(--cache c1 --max-steps 4 --warmup-steps 1 --log-every 1 --gradient-checkpointing)
timed() { local s=$SECONDS; "$@" >"$log" 2>&1; echo "$label: $((SECONDS - s)) s"; }
label="cache-teacher, 1 process " log=c1.log timed "$PY" -m pipeline cache-teacher "${cache_args[@]}" --out c1
label="cache-teacher, 2 processes" log=c2.log timed "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
    -m pipeline cache-teacher "${cache_args[@]}" --out c2
label="train 4 steps, 1 process x batch 8 " log=t1.log timed "$PY" -m pipeline train "${train_args[@]}" \
    --batch-size 8 --out t1
label="train 4 steps, 2 processes x batch 4" log=t2.log timed "$PY" -m torch.distributed.run --standalone \
    --nproc-per-node 2 -m pipeline train "${train_args[@]}" --batch-size 4 --out t2
"$PY" - <<'PY'
import glob, json
import pyarrow.parquet as pq

def rows(d):
    return {r["example_id"]: r for f in glob.glob(f"{d}/shard-*.parquet") for r in pq.read_table(f).to_pylist()}

a, b = rows("c1"), rows("c2")
print(f"cache rows: {len(a)} and {len(b)}, identical: {a == b}")
for d in ("t1", "t2"):
    last = json.loads(open(f"{d}/metrics.jsonl").read().splitlines()[-1])
    print(f"{d}: step {last['step']} loss {last['loss']:.4f}")
PY
