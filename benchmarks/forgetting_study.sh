#!/usr/bin/env bash
# The forgetting study: on two tasks, which setting learns the task and keeps the base model?
#
#   benchmarks/forgetting_study.sh             # both tasks, on the built-in model (about 2 h 10 min on 2 CPU cores)
#   STUDY_STEPS=6 STUDY_OUT=runs/study-smoke benchmarks/forgetting_study.sh   # the same commands in minutes
#   STUDY_BUDGETS=0 benchmarks/forgetting_study.sh   # without the four forgetting-budget runs (under 2 hours)
#
# For each task (the medication extraction of data/demo/, the date normalisation of data/dates/): one cache,
# then one sweep from it (configs/study.yaml) in three stages:
#   1. plain QLoRA (lambda 0, no rehearsal), rehearsal alone (lambda 0, 30%), and lambda in {0.25, 0.5, 1}
#      with the KL on all tokens and on rehearsal tokens only (30% rehearsal); the sweep recommends one;
#   2. LoRA rank 4 and 16 at the recommended setting (rank 8 is in stage 1), and a second seed for plain QLoRA
#      and for the recommended setting, so that the run-to-run spread shows; a forgetting budget
#      (--max-forgetting) at the forgetting of stage 1's lambda 1 run with the KL on rehearsal examples, and at
#      half of it;
#   3. the best stage-1 setting with rehearsal, trained for steps / 0.7 steps: as many task examples as plain
#      QLoRA saw, so that the two are compared at equal task exposure, with seeds 0 and 1; then the report over
#      all runs.
# Every run is evaluated on the held-out task rows (exact match) and on held-out general prompts (KL(base ||
# tuned) over the full vocabulary, against the live base). Every step keeps what an earlier run finished, so
# rerunning the script after an interruption continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

P=${PIPELINE:-.venv/bin/pipeline}
PY=${PYTHON:-.venv/bin/python}
OUT=${STUDY_OUT:-runs/study}
CONFIG=configs/study.yaml
EXTRA=() N=1000000
if [[ -n ${STUDY_STEPS:-} ]]; then  # a smoke run of the same commands: a slice of the data, few steps
    EXTRA=(--max-steps "$STUDY_STEPS" --eval-every 2 --eval-limit 8) N=24
fi
mkdir -p "$OUT/data"
t0=$SECONDS
for f in demo/general_prompts_train demo/general_prompts_eval demo/task_train demo/task_eval dates/task_train \
         dates/task_eval; do
    mkdir -p "$OUT/data/$(dirname $f)"
    head -n $N "data/$f.jsonl" >"$OUT/data/$f.jsonl"
done

# General instruction data for rehearsal, shared by both tasks: the base model answers the general prompts
# (sampled at temperature 1), train and held-out parts.
"$P" make-rehearsal --config "$CONFIG" --prompts "$OUT/data/demo/general_prompts_train.jsonl" --out "$OUT/rehearsal_train.jsonl"
"$P" make-rehearsal --config "$CONFIG" --prompts "$OUT/data/demo/general_prompts_eval.jsonl" --out "$OUT/rehearsal_eval.jsonl"

for task in demo dates; do
    T="$OUT/$task"
    "$P" cache-teacher --config "$CONFIG" --task-train "$OUT/data/$task/task_train.jsonl" \
        --task-eval "$OUT/data/$task/task_eval.jsonl" \
        --rehearsal-train "$OUT/rehearsal_train.jsonl" --rehearsal-eval "$OUT/rehearsal_eval.jsonl" --out "$T/cache"

    # Stage 1: the settings of configs/study.yaml.
    "$P" sweep --config "$CONFIG" --cache "$T/cache" --out "$T/sweep" "${EXTRA[@]}"

    # Stage 2: rank and seed at the recommended setting, added to the same sweep (stage 1's runs are kept).
    "$PY" - "$CONFIG" "$T/sweep" "$T/stage2.yaml" "${STUDY_BUDGETS:-1}" <<'PY'
import json, sys, yaml
config, sweep, out, budgets = sys.argv[1:]
doc = yaml.safe_load(open(config))
pick = json.load(open(f"{sweep}/recommendation.json"))["name"]
best = yaml.safe_load(open(f"{sweep}/{pick}/run.yaml"))["config"]
setting = {k: best[k] for k in ("kd_lambda", "kd_on", "rehearsal_ratio")}
doc["sweep"]["runs"] += [
    {"name": f"{pick},lora_r=4", **setting, "lora_r": 4},
    {"name": f"{pick},lora_r=16", **setting, "lora_r": 16},
    {"name": f"{pick},seed=1", **setting, "seed": 1},
    {"name": "plain-qlora,seed=1", "kd_lambda": 0, "rehearsal_ratio": 0, "seed": 1},
]
# The forgetting budget (--max-forgetting) at two levels: the held-out forgetting of the fixed
# lambda 1 run with the KL on rehearsal examples, and half of it; lambda starts at 0 and training finds it.
rows = {r["name"]: r for r in json.load(open(f"{sweep}/rows.json"))}
kl = rows["rehearsal-kd,lambda=1"]["eval"]["forgetting"]["kl"]
for eps in (kl, kl / 2) if budgets != "0" else ():
    eps = float(f"{eps:.2g}")
    doc["sweep"]["runs"].append({"name": f"budget={eps:g}", "max_forgetting": eps, "kd_lambda": 0,
                                 "kd_on": "rehearsal", "rehearsal_ratio": 0.3})
doc["sweep"]["runs"] = [r for i, r in enumerate(doc["sweep"]["runs"])
                        if r["name"] not in {x["name"] for x in doc["sweep"]["runs"][:i]}]
yaml.safe_dump(doc, open(out, "w"), sort_keys=False, allow_unicode=True)
print(f"stage 2 at the recommended setting {pick}: {setting}")
PY
    "$P" sweep --config "$T/stage2.yaml" --cache "$T/cache" --out "$T/sweep" "${EXTRA[@]}"

    # Stage 3: equal task exposure. A run with 30% rehearsal sees 70% as many task examples in the same steps as
    # plain QLoRA, so at one step count it may score less for that reason alone. The best of stage 1's runs with
    # rehearsal (the recommendation among them) is trained again for steps / 0.7 steps, as many task examples as
    # plain QLoRA saw: does it then reach plain QLoRA's task score, and what does it forget?
    "$PY" - "$T/stage2.yaml" "$CONFIG" "$T/sweep" "$T/stage3.yaml" <<'PY'
import json, math, sys, yaml
from pipeline.report import recommend
stage2, config, sweep, out = sys.argv[1:]
doc = yaml.safe_load(open(stage2))
stage1 = {r["name"] for r in yaml.safe_load(open(config))["sweep"]["runs"]}
rows = [r for r in json.load(open(f"{sweep}/rows.json")) if r["name"] in stage1 and r.get("rehearsal_ratio")]
pick = recommend(rows, tolerance=doc["sweep"].get("task_tolerance", 0.02)).name
best = yaml.safe_load(open(f"{sweep}/{pick}/run.yaml"))["config"]
steps = math.ceil(best["max_steps"] / (1 - best["rehearsal_ratio"]))
setting = {k: best[k] for k in ("kd_lambda", "kd_on", "rehearsal_ratio")}
doc["sweep"]["runs"] += [{"name": f"{pick},steps={steps}", **setting, "max_steps": steps},
                         {"name": f"{pick},steps={steps},seed=1", **setting, "max_steps": steps, "seed": 1}]
yaml.safe_dump(doc, open(out, "w"), sort_keys=False, allow_unicode=True)
print(f"stage 3: {pick} for {steps} steps (the task examples of plain QLoRA's {best['max_steps']}), seeds 0 and 1")
PY
    "$P" sweep --config "$T/stage3.yaml" --cache "$T/cache" --out "$T/sweep" "${EXTRA[@]}"
done

echo "study done in $((SECONDS - t0)) s: $OUT/demo/sweep/report.md, $OUT/dates/sweep/report.md"
