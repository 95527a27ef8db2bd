"""The task scores (evaluate --task-score): each scorer on hand-made answers, the user's own scorer (loading,
refusals, a scorer that misbehaves), the standard error, the per-field accuracy of `json`, and the sweep's
recommendation, report and plot by the configured score; one evaluate run on the tiny model with a user scorer."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from pipeline.cache.write import build_cache
from pipeline.cli import main
from pipeline.config import CacheConfig, EvalConfig, SweepConfig, load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.evaluate import evaluate
from pipeline.recommend import recommend, run_figures
from pipeline.report import draw_tradeoff, report_table
from pipeline.scoring import (
    BUILT_IN,
    Scorer,
    fold,
    json_fields,
    load_scorer,
    score_all,
    score_one,
    spec_problem,
    standard_error,
    summary,
)
from pipeline.sweep import _eval_current, write_outputs
from tests.helpers import GENERAL_ROWS, TASK_ROWS, write_jsonl

QUIET = {"log": lambda *_: None}
REF = '{"medication": "metformin", "dose": "500 mg", "frequency": "twice daily"}'


# Each built-in scorer on answers that it must count as a hit (1) and as a miss (0).
CASES = {
    "exact_match": [
        (REF, REF, 1),
        ('{"medication":"metformin","dose":"500 mg","frequency":"twice daily"}', REF, 0),  # spacing counts
        ('{"dose": "500 mg", "medication": "metformin", "frequency": "twice daily"}', REF, 0),  # key order counts
        ("Positive", "positive", 0),
        ("", "", 1),
    ],
    "normalized": [
        ("Positive.", "positive", 1),
        ("  the   Quick\n fox !", "the quick fox", 1),  # case, runs of whitespace, trailing punctuation
        ("陽性。", "陽性", 1),  # full-width punctuation
        ("positive", "negative", 0),
        ('"yes"', "yes", 0),  # quotes are part of the answer
        ("a.b", "ab", 0),  # inner punctuation counts
        (".positive", "positive", 0),  # only trailing punctuation is folded
    ],
    "json": [
        (REF, REF, 1),
        ('{"frequency": "twice daily", "dose": "500 mg",\n "medication": "metformin"}', REF, 1),  # any key order
        ('{"a": 1.0, "b": [1, {"c": null}]}', '{"b": [1, {"c": null}], "a": 1}', 1),  # numbers by value, nested
        ('{"medication": "metformin", "dose": "500mg", "frequency": "twice daily"}', REF, 0),  # a value differs
        ('{"medication": "metformin", "dose": "500 mg"}', REF, 0),  # a key missing
        ('{"medication": "metformin", "dose": "500 mg", "frequency": "twice daily", "x": 1}', REF, 0),  # one more
        ('{"medication": "metformin", "dose": "500 mg", "frequency": "twice daily"', REF, 0),  # unparsable: a miss
        ("```json\n" + REF + "\n```", REF, 0),  # a fenced answer is not JSON
        ('{"ok": true}', '{"ok": 1}', 0),  # true is not 1
        ("[1, 2]", "[2, 1]", 0),  # arrays in order
        ('"500 mg"', '"500 mg"', 1),
    ],
    "contains": [
        ("The dose is 500 mg twice daily.", "500 mg", 1),
        ("500 mg", "500 mg", 1),
        ("The dose is 500mg.", "500 mg", 0),
        ("The dose is 500 MG.", "500 mg", 0),  # case counts
        ("500", "500 mg", 0),  # the reference in the answer, not the other way round
    ],
    "regex": [
        ("500 mg", r"\d+ ?mg", 1),
        ("500mg", r"\d+ ?mg", 1),
        ("y", "yes|y", 1),
        ("about 500 mg", r"\d+ ?mg", 0),  # the whole answer must match
        ("500 mg daily", r"\d+ ?mg", 0),
        ("yes", "no|n", 0),
    ],
}


@pytest.mark.parametrize("name, prediction, reference, expected",
                         [(n, p, r, e) for n, cases in CASES.items() for p, r, e in cases],
                         ids=lambda v: v if isinstance(v, str) and len(v) < 12 else None)
def test_built_in_scorers_on_hits_and_misses(name, prediction, reference, expected):
    scorer = load_scorer(name)
    assert score_one(scorer, prediction, reference, {"id": "x"}) == expected


def test_every_built_in_scorer_has_cases():
    assert set(CASES) == set(BUILT_IN) and all({c[2] for c in cases} == {0, 1} for cases in CASES.values())


def test_fold_by_hand():
    assert fold("  Très   BIEN !! ") == "très bien"
    assert fold("...") == "" and fold("a (b).") == "a (b)"


@pytest.mark.parametrize("name, reference, expected", [
    ("json", "not json", "the reference is not JSON"),
    ("regex", "([a-z]", "the reference is not a valid regular expression"),
])
def test_a_reference_the_score_cannot_read_stops_naming_the_example(name, reference, expected):
    examples = [{"id": "e0"}, {"id": "note-17"}]
    with pytest.raises(PipelineError) as e:
        score_all(load_scorer(name), ['"a"', '"a"'], ['"a"', reference], examples)
    message = str(e.value)
    assert "\n" not in message and f"--task-score {name}: example 'note-17': {expected}" in message


def test_standard_error_by_hand():
    assert standard_error([1, 0, 1, 0]) == pytest.approx(0.25)  # sd 0.5 over n = 4: 0.5 / 2
    assert standard_error([0.5] * 7) == 0.0
    # [0, 0.5, 1]: mean 0.5, mean square deviation (0.25 + 0 + 0.25) / 3 = 1/6, error sqrt(1/6 / 3)
    assert standard_error([0.0, 0.5, 1.0]) == pytest.approx(math.sqrt(1 / 18))
    assert standard_error([]) is None
    # A 0/1 score: exactly the binomial sqrt(p (1 - p) / n) the reports have always shown.
    hits = [1] * 53 + [0] * 47
    assert standard_error(hits) == pytest.approx(math.sqrt(0.53 * 0.47 / 100), rel=1e-12)


def test_summary_keys_per_score():
    em = summary("exact_match", [1.0, 0.0], ["a", "b"], ["a", "c"])
    assert em == {"score_name": "exact_match", "score": 0.5, "score_error": math.sqrt(0.25 / 2), "exact_match": 0.5}
    js = summary("json", [1.0, 0.0], ['{"a": 1}', "x"], ['{"a": 1}', '{"a": 2}'])
    assert "exact_match" not in js and js["fields"] == {"a": {"accuracy": 0.5, "examples": 2}}
    assert set(summary("contains", [1.0], ["a"], ["a"])) == {"score_name", "score", "score_error"}


def test_json_fields_by_hand():
    refs = [REF, REF.replace("500", "250"), '{"medication": "insulin", "route": "sc"}', "[1, 2]"]
    preds = [REF,                                                                         # every field
             '{"frequency": "twice daily", "medication": "metformin", "dose": "250mg"}',  # dose wrong, order free
             '{"medication": "insulin", "route": "iv"}',                                  # route wrong
             "[1, 2]"]                                                                    # not an object: no fields
    fields = json_fields(preds, refs)
    assert list(fields) == ["medication", "dose", "frequency", "route"]  # first appearance
    assert fields["medication"] == {"accuracy": 1.0, "examples": 3}
    assert fields["dose"] == {"accuracy": 0.5, "examples": 2}
    assert fields["frequency"] == {"accuracy": 1.0, "examples": 2}
    assert fields["route"] == {"accuracy": 0.0, "examples": 1}
    # An unparsable answer misses every field; a field absent from the answer is a miss.
    assert json_fields(["{oops", '{"medication": "metformin"}'], [REF, REF])["dose"] == {"accuracy": 0.0,
                                                                                          "examples": 2}


# ---------------------------------------------------------------- the user's own scorer

SCORER = '''
import json


def score(prediction: str, reference: str, example: dict) -> float:
    """Share of the reference's fields the answer got right: partial credit for extraction."""
    try:
        got = json.loads(prediction)
    except ValueError:
        return 0.0
    want = json.loads(reference)
    return sum(got.get(k) == v for k, v in want.items()) / len(want)


NOT_A_FUNCTION = 3
'''


@pytest.fixture
def scorer_file(tmp_path) -> Path:
    path = tmp_path / "my_scorer.py"
    path.write_text(SCORER, encoding="utf-8")
    return path


def test_user_scorer_from_a_file(scorer_file):
    scorer = load_scorer(f"python:{scorer_file}:score")
    assert scorer.name == f"python:{scorer_file}:score"
    assert scorer.sha256 == hashlib.sha256(scorer_file.read_bytes()).hexdigest()
    two_of_three = '{"medication": "metformin", "dose": "250 mg", "frequency": "twice daily"}'
    assert score_all(scorer, [REF, two_of_three, "no"], [REF] * 3, [{"id": i} for i in "abc"]) == [1.0, 2 / 3, 0.0]


def test_the_readme_scorer_works_as_documented(tmp_path):
    """README's "### Task scores" section: every --task-score in its table exists, and its example scorer runs."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Task scores", 1)[1].split("\n## ", 1)[0]
    documented = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")][1:]  # (header)
    assert documented == [*BUILT_IN, "python:PATH_OR_MODULE:FUNCTION"]
    path = tmp_path / "readme_scorer.py"
    path.write_text(section.split("```python\n", 1)[1].split("```", 1)[0], encoding="utf-8")
    scorer = load_scorer(f"python:{path}:score")
    two_of_three = '{"medication": "metformin", "dose": "250 mg", "frequency": "twice daily"}'
    assert score_all(scorer, [REF, two_of_three, "[1]", "no"], [REF] * 4, [{"id": i} for i in "abcd"]) == [
        1.0, 2 / 3, 0.0, 0.0]


def test_user_scorer_from_a_module_in_the_current_directory(tmp_path, monkeypatch):
    package = tmp_path / "scorers_for_test_scoring"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "medication.py").write_text(SCORER, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    try:
        scorer = load_scorer("python:scorers_for_test_scoring.medication:score")
        assert scorer.fn(REF, REF, {}) == 1.0 and scorer.sha256 is not None
        assert str(tmp_path) not in sys.path  # the current directory was on the path only while importing
        # ... and relative file paths start there too.
        assert load_scorer("python:scorers_for_test_scoring/medication.py:score").fn("x", REF, {}) == 0.0
    finally:
        for name in ("scorers_for_test_scoring", "scorers_for_test_scoring.medication"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize("spec, expected", [
    ("python:{dir}/missing.py:score", "no file {dir}/missing.py"),
    ("python:{dir}/my_scorer.py:scroe", "{dir}/my_scorer.py has no function 'scroe'"),
    ("python:{dir}/my_scorer.py:NOT_A_FUNCTION", "my_scorer.py.NOT_A_FUNCTION is a int, not a function"),
    ("python:{dir}/broken.py:score", "importing {dir}/broken.py failed: SyntaxError"),
    ("python:no_module_called_this_xyz:score", "no module 'no_module_called_this_xyz' importable from"),
    ("python:my_scorer.py", "expected python:PATH_OR_MODULE:FUNCTION"),
    ("python:a-b:score", "'a-b' is neither a .py file nor a module name"),
    ("exact", "not one of exact_match, normalized, json, contains, regex, python:PATH_OR_MODULE:FUNCTION, none"),
])
def test_a_scorer_that_cannot_be_loaded_is_refused_in_one_line(scorer_file, spec, expected):
    d = scorer_file.parent
    (d / "broken.py").write_text("def score(p, r, e)\n    return 1.0\n")
    spec, expected = spec.format(dir=d), expected.format(dir=d)
    with pytest.raises(PipelineError) as e:
        load_scorer(spec)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"--task-score {spec}: ") and expected in str(e.value)
    assert spec_problem(spec) == str(e.value).removeprefix("--task-score ")


def test_a_missing_scorer_stops_when_the_config_is_loaded(tmp_path):
    """Checked by load_config (before any model or cache is opened), for evaluate and for sweep."""
    spec = f"python:{tmp_path}/nowhere.py:score"
    with pytest.raises(ConfigError) as e:
        load_config(EvalConfig, None, {"cache": "c", "task_score": spec})
    assert e.value.problems == [f"task_score: {spec}: no file {tmp_path}/nowhere.py (relative paths start at "
                                f"{Path.cwd()})"]
    with pytest.raises(ConfigError):
        load_config(SweepConfig, None, {"cache": "c", "out": "o", "lambdas": "0", "task_score": spec})
    config = tmp_path / "c.yaml"
    config.write_text(f"# test\nevaluate:\n  task_score: {spec}\n")
    result = CliRunner().invoke(main, ["evaluate", "--config", str(config), "--cache", str(tmp_path / "no-cache")])
    assert result.exit_code == 2 and result.output.count("error:") == 1 and "nowhere.py" in result.output
    assert "Traceback" not in result.output and "no-cache" not in result.output  # stopped before the cache
    assert load_config(EvalConfig, None, {"cache": "c", "task_score": "none"}).task_score == "none"


def _user_scorer(tmp_path: Path, body: str) -> Scorer:
    path = tmp_path / f"s{hashlib.sha1(body.encode()).hexdigest()[:8]}.py"
    path.write_text(f"def score(prediction, reference, example):\n    {body}\n")
    return load_scorer(f"python:{path}:score")


@pytest.mark.parametrize("body, expected", [
    ("return {'e0': 1.0}[example['id']]", "raised KeyError: 'e1'"),
    ("return 1 / 0 if example['id'] == 'e1' else 1.0", "raised ZeroDivisionError: division by zero"),
    ("return 1.5 if example['id'] == 'e1' else 1.0", "returned 1.5, not a number in [0, 1]"),
    ("return -0.1 if example['id'] == 'e1' else 0.0", "returned -0.1, not a number in [0, 1]"),
    ("return float('nan') if example['id'] == 'e1' else 0.0", "returned nan, not a number in [0, 1]"),
    ("return '1' if example['id'] == 'e1' else 0.0", "returned '1', not a number in [0, 1]"),
    ("return None if example['id'] == 'e1' else 0.0", "returned None, not a number in [0, 1]"),
])
def test_a_scorer_that_raises_or_leaves_0_1_stops_naming_the_example(tmp_path, body, expected):
    scorer = _user_scorer(tmp_path, body)
    with pytest.raises(PipelineError) as e:
        score_all(scorer, ["a", "b", "c"], ["a", "b", "c"], [{"id": "e0"}, {"id": "e1"}, {"id": "e2"}])
    message = str(e.value)
    assert "\n" not in message and message == f"--task-score {scorer.name}: example 'e1': {expected}"


def test_a_scorer_may_return_bools_and_ints(tmp_path):
    scorer = _user_scorer(tmp_path, "return prediction == reference if example['id'] == 'e0' else 1")
    assert score_all(scorer, ["a", "b"], ["a", "c"], [{"id": "e0"}, {"id": "e1"}]) == [1.0, 1.0]


# ---------------------------------------------------------------- the sweep, by the configured score

USER = "python:my_scorer.py:score"


def row(name: str, score: float | None, kl: float, *, by: str = USER, error: float | None = 0.01, ce: float = 0.5,
        seconds: float = 100.0) -> dict:
    """A sweep row whose evaluate report was scored by `by` (no exact_match key unless that is the score)."""
    task = {"examples": 50, "ce": ce, "score_name": by, "score": score, "score_error": error}
    if by == "exact_match":
        task["exact_match"] = score
    return {"name": name, "kd_lambda": 0.0, "rehearsal_ratio": 0.3, "kd_on": "all", "train_seconds": seconds,
            "curve": [], "eval": {"task": task, "forgetting": {"kl": kl, "top1_agreement": 0.9, "kl_topk": kl / 2,
                                                                 "ce": 2.4, "base_ce": 2.3}}}


# Scored by partial credit, plain QLoRA and rehearsal+KD are equally good and KD forgets less; "all" learned less.
USER_ROWS = [row("base", 0.1, 0.0, seconds=0), row("plain", 0.90, 0.30), row("rehearsal-kd", 0.89, 0.05),
             row("all", 0.60, 0.01)]


def test_the_recommendation_picks_by_a_user_scorer(tmp_path):
    rec = recommend(USER_ROWS, 0.02)
    assert (rec.name, rec.rule, rec.score_name, rec.candidates) == ("rehearsal-kd", "task_score", USER,
                                                                     ["rehearsal-kd", "plain"])
    assert f"task score {USER} is within 0.02 of the best (0.900, plain)" in rec.reason
    assert "Left out as learning less of the task: all." in rec.reason and "exact match" not in rec.reason
    assert rec.figures["task_score"] == 0.89 and rec.figures["task_score_name"] == USER
    assert rec.figures["task_score_error"] == 0.01 and "task_exact_match" not in rec.figures
    # The recorded error is the one used (not sqrt(p (1 - p) / n) = 0.042, which would warn at 0.02).
    assert rec.warning is None
    assert run_figures(USER_ROWS[2]).score_error == 0.01
    # With a looser tolerance "all" joins and, forgetting least, is picked: the score decides who is a candidate.
    assert recommend(USER_ROWS, 0.31).name == "all"


def test_the_report_and_the_plot_name_the_configured_score(tmp_path):
    rec = write_outputs(tmp_path, USER_ROWS, 0.02, command="pipeline sweep --task-score " + USER, log=lambda *_: None)
    assert rec.name == "rehearsal-kd"
    report = (tmp_path / "report.md").read_text()
    assert f"task score {USER} ± error" in report.split("\n| base")[0]  # the table's column
    assert f"(here: score {USER}, `--task-score {USER}`)" in report
    assert f"* task score {USER} (`--task-score {USER}`): the user's function my_scorer.py:score" in report
    assert "exact match" not in report
    assert json.loads((tmp_path / "recommendation.json").read_text())["score_name"] == USER
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    try:
        draw_tradeoff(ax, USER_ROWS, rec)
        assert ax.get_ylabel().startswith(f"task score {USER} ± sampling error")
        errors = [c for c in ax.containers if hasattr(c, "lines")]
        assert len(errors) == 4  # one error bar per run, from the recorded errors
    finally:
        plt.close(fig)


def test_json_report_lists_the_fields_of_the_pick(tmp_path):
    rows = [row(n, s, kl, by="json") for n, s, kl in (("base", 0.0, 0.0), ("a", 0.8, 0.2), ("b", 0.5, 0.01))]
    rows[1]["eval"]["task"]["fields"] = {"dose": {"accuracy": 0.75, "examples": 4},
                                         "medication": {"accuracy": 1.0, "examples": 4}}
    write_outputs(tmp_path, rows, 0.02, command="c", log=lambda *_: None)
    report = (tmp_path / "report.md").read_text()
    assert "task json score ± error" in report and "* per field, `a`: `dose` 0.750, `medication` 1.000" in report


def test_reports_written_before_read_as_exact_match():
    old = {"name": "old", "train_seconds": 1, "eval": {"task": {"exact_match": 0.53, "examples": 100, "ce": 0.1}}}
    r = run_figures(old)
    assert (r.score, r.score_name, r.score_error) == (0.53, "exact_match", pytest.approx(math.sqrt(.53 * .47 / 100)))
    assert "task exact match ± error" in report_table([old])
    rec = recommend([old], 0.02)
    assert rec.score_name == "exact_match" and rec.figures["task_exact_match"] == 0.53


def test_runs_scored_by_different_scores_are_not_compared_by_score():
    rows = [row("a", 0.9, 0.3, ce=0.50), row("b", 0.2, 0.01, by="exact_match", ce=0.505)]
    rec = recommend(rows, 0.02)
    assert rec.rule == "task_ce" and rec.name == "b"
    assert "scored by different task scores: exact_match, python:my_scorer.py:score" in rec.fallback


def test_a_kept_eval_is_rescored_when_the_user_scorer_changed(tmp_path):
    cfg = EvalConfig(cache="c", task_score=USER)
    path = tmp_path / "eval.json"
    settings = {"max_new_tokens": 64, "task_score": USER, "limit": None, "task_score_sha256": "aaa"}
    made_from = {"cache": SimpleNamespace(fingerprint="c0"), "model": SimpleNamespace(fingerprint="m0")}
    fingerprints = {"cache_fingerprint": "c0", "model_fingerprint": "m0"}
    path.write_text(json.dumps({"settings": settings, **fingerprints}))
    assert _eval_current(path, cfg, "aaa", **made_from) is not None
    assert _eval_current(path, cfg, "bbb", **made_from) is None  # the scorer file was edited since
    del settings["task_score_sha256"]  # an eval.json from before there were user scorers: exact match only
    path.write_text(json.dumps({"settings": {**settings, "task_score": "exact_match"}, **fingerprints}))
    assert _eval_current(path, EvalConfig(cache="c"), None, **made_from) is not None


# ---------------------------------------------------------------- evaluate on the tiny model


@pytest.fixture(scope="module")
def task_cache(tmp_path_factory, tiny_model_dir) -> Path:
    """4 held-out task rows e0..e3, and the small general files given (so nothing is generated for rehearsal)."""
    d = tmp_path_factory.mktemp("scoring-cache")
    rows = TASK_ROWS + [{**r, "output": r["output"].replace("twice", "once")} for r in TASK_ROWS]
    out = d / "cache"
    build_cache(CacheConfig(model=str(tiny_model_dir), out=str(out), task_train=str(write_jsonl(d / "t.jsonl", rows)),
                            task_eval=str(write_jsonl(d / "e.jsonl", [{**r, "id": f"e{i}"}
                                                                      for i, r in enumerate(rows[:4])])),
                            rehearsal_train=str(write_jsonl(d / "g.jsonl", GENERAL_ROWS[:3])),
                            rehearsal_eval=str(write_jsonl(d / "ge.jsonl", GENERAL_ROWS[3:])),
                            top_k=8, max_length=256), **QUIET)
    return out


PROMPT_SCORER = '''
def score(prediction, reference, example):
    """1 for e0 and e1, 0.25 otherwise; checks what evaluate hands over."""
    assert isinstance(prediction, str) and reference.startswith('{"medication"'), reference
    assert "Extract the medication." in example["prompt"] and "metformin" in example["prompt"], example
    return 1.0 if example["id"] in ("e0", "e1") else 0.25
'''


def test_evaluate_with_a_user_scorer_on_the_tiny_model(tiny_model_dir, task_cache, tmp_path, monkeypatch):
    scorer = tmp_path / "prompt_scorer.py"
    scorer.write_text(PROMPT_SCORER)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_model_dir), "--cache", str(task_cache),
                                       "--task-score", "python:prompt_scorer.py:score", "--max-new-tokens", "4",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    task = report["task"]
    assert task["score_name"] == "python:prompt_scorer.py:score" and task["examples"] == 4
    assert task["score"] == pytest.approx(0.625)  # (1 + 1 + 0.25 + 0.25) / 4
    assert task["score_error"] == pytest.approx(0.375 / 2)  # sd 0.375 over sqrt(4)
    assert "exact_match" not in task and "fields" not in task
    assert {s["id"]: s["score"] for s in task["samples"]} == {"e0": 1.0, "e1": 1.0, "e2": 0.25, "e3": 0.25}
    assert report["settings"]["task_score"] == "python:prompt_scorer.py:score"
    assert report["settings"]["task_score_sha256"] == hashlib.sha256(scorer.read_bytes()).hexdigest()


def test_evaluate_scores_json_with_fields(tiny_model_dir, task_cache, monkeypatch):
    """Generation replaced by the references with their keys reversed: json 1.0 (exact match would be 0); then
    with every dose altered: 0.0, and per field only the dose is missed."""
    import pipeline.evaluate

    def generate_with(edit):
        def fake(model, tokenizer, prompts, **_):
            refs = {tuple(p): tokenizer.decode(r, skip_special_tokens=True).strip()
                    for p, r in map(pipeline.evaluate.split_prompt, rows)}
            end = tokenizer.convert_tokens_to_ids("<|im_end|>")
            return [[*tokenizer.encode(edit(refs[tuple(p)]), add_special_tokens=False), end] for p in prompts]
        return fake

    from pipeline.cache.read import open_cache

    rows = list(open_cache(task_cache).iter_rows("task", "eval"))

    def reversed_keys(text: str) -> str:
        return json.dumps(dict(reversed(list(json.loads(text).items()))))

    cfg = EvalConfig(model=str(tiny_model_dir), cache=str(task_cache), task_score="json")
    monkeypatch.setattr(pipeline.evaluate, "generate_all", generate_with(reversed_keys))
    task = evaluate(cfg, **QUIET)["task"]
    assert (task["score_name"], task["score"], task["score_error"]) == ("json", 1.0, 0.0)
    assert task["fields"] == {k: {"accuracy": 1.0, "examples": 4} for k in ("medication", "dose", "frequency")}
    assert all(s["prediction"] != s["reference"] for s in task["samples"])  # not an exact match
    monkeypatch.setattr(pipeline.evaluate, "generate_all",
                        generate_with(lambda t: reversed_keys(t).replace(" mg", "mg")))
    task = evaluate(cfg, **QUIET)["task"]
    assert task["score"] == 0.0 and task["fields"]["dose"]["accuracy"] == 0.0
    assert task["fields"]["medication"]["accuracy"] == task["fields"]["frequency"]["accuracy"] == 1.0
