"""The task score: how a greedy answer is compared with the cached reference (`evaluate --task-score`).

Both sides are the answer texts as evaluate decodes them (special tokens dropped, surrounding whitespace trimmed).
Every scorer is a function `(prediction, reference, example) -> float in [0, 1]`; the task score is its mean over
the held-out task rows, with the standard error of that mean.

    exact_match   the same string                       '{"dose":"500 mg"}' vs '{"dose": "500 mg"}'  -> 0
    normalized    the same after folding case, runs of whitespace and trailing punctuation (.,;:!? and their
                  full-width forms)                     'Positive.' vs 'positive'                      -> 1
    json          both parsed as JSON and equal as values (object keys in any order; true is not 1); an
                  unparsable prediction is a miss       '{"b": 2, "a": 1}' vs '{"a": 1, "b": 2}'       -> 1
    contains      the reference appears in the prediction (case counts)
                                                        'The dose is 500 mg.' vs '500 mg'              -> 1
    regex         the reference is a pattern the whole prediction matches (re.fullmatch)
                                                        '500 mg' vs r'\\d+ ?mg'                         -> 1
    python:PATH_OR_MODULE:FUNCTION
                  the user's own function, from a .py file (`python:my_scorer.py:score`) or a module importable
                  from the current directory (`python:my_scorers.medication:score`)

[user code note] A `python:` scorer is the user's own code, imported from the path or module the user gave on the
command line or in the config file, once when the config is loaded (so a missing file or function stops before any
model is loaded). Nothing read from a cache, a checkpoint or an eval.json is ever imported or run: those only
record the spec and the file's sha256.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from pipeline.errors import PipelineError

NONE = "none"  # --task-score none: no generation, no task score
PYTHON = "python:"
SPEC_FORM = "python:PATH_OR_MODULE:FUNCTION"
ScoreFn = Callable[[str, str, dict], float]


def exact_match(prediction: str, reference: str, example: dict) -> float:
    return float(prediction == reference)


# Sentence punctuation that `normalized` drops from the end: ASCII and the full-width (CJK) forms. Not quotes or
# brackets, which are part of an answer such as '"yes"' or '(a)'.
TRAILING_PUNCTUATION = ".,;:!?。、，；：！？…"


def fold(text: str) -> str:
    """`normalized`'s form of an answer: case folded, runs of whitespace made one space, trailing punctuation off."""
    text = " ".join(text.casefold().split())
    while text and text[-1] in TRAILING_PUNCTUATION:
        text = text[:-1].rstrip()
    return text


def normalized(prediction: str, reference: str, example: dict) -> float:
    return float(fold(prediction) == fold(reference))


def same_json(a: object, b: object) -> bool:
    """Equal as JSON values: objects by key (any order), arrays in order, numbers by value, true/false not numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


_MISS = object()  # an unparsable prediction


def _parse_prediction(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return _MISS


def _parse_reference(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"the reference is not JSON ({e}): {text[:60]!r}") from None


def json_match(prediction: str, reference: str, example: dict) -> float:
    ref = _parse_reference(reference)
    pred = _parse_prediction(prediction)
    return float(pred is not _MISS and same_json(pred, ref))


def contains(prediction: str, reference: str, example: dict) -> float:
    return float(reference in prediction)


def regex(prediction: str, reference: str, example: dict) -> float:
    try:
        pattern = re.compile(reference)
    except re.error as e:
        raise ValueError(f"the reference is not a valid regular expression ({e}): {reference[:60]!r}") from None
    return float(pattern.fullmatch(prediction) is not None)


# The one registry of built-in scorers: name -> (function, what it counts as a hit, for the report).
BUILT_IN: dict[str, tuple[ScoreFn, str]] = {
    "exact_match": (exact_match, "greedy answer equals the reference"),
    "normalized": (normalized, "greedy answer equals the reference with case, whitespace and trailing punctuation "
                               "folded"),
    "json": (json_match, "greedy answer and reference, both parsed as JSON, are equal as values (key order free; an "
                         "unparsable answer is a miss)"),
    "contains": (contains, "the reference appears in the greedy answer"),
    "regex": (regex, "the greedy answer matches the reference as a regular expression (whole answer)"),
}
CHOICES = (*BUILT_IN, SPEC_FORM, NONE)


def label(name: str) -> str:
    """How the report names a score: 'exact match', 'json score', 'score python:my.py:f'."""
    return "exact match" if name == "exact_match" else f"{name} score" if name in BUILT_IN else f"score {name}"


def describe(name: str) -> str:
    """What a score counts as a hit, for the report."""
    if name in BUILT_IN:
        return BUILT_IN[name][1]
    return f"the user's function {name.removeprefix(PYTHON)}, a score in [0, 1] per answer"


@dataclass(frozen=True)
class Scorer:
    """A resolved --task-score: its name as given, the function, and for a python: scorer its file's sha256."""

    name: str
    fn: ScoreFn
    sha256: str | None = None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_FILE_MODULES: dict[tuple[str, str], ModuleType] = {}  # (resolved path, sha256) -> module: a file runs once


def _import_file(spec: str, path: Path, digest: str) -> ModuleType:
    key = (str(path.resolve()), digest)
    if key not in _FILE_MODULES:
        name = f"pipeline_user_scorer_{digest[:16]}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise PipelineError(f"--task-score {spec}: {path} cannot be imported as Python")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # (dataclasses and pickling in the user's file look their module up here)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise PipelineError(f"--task-score {spec}: importing {path} failed: {type(e).__name__}: "
                                f"{_one_line(e)}") from None
        _FILE_MODULES[key] = module
    return _FILE_MODULES[key]


def _import_module(spec: str, dotted: str) -> ModuleType:
    if not all(part.isidentifier() for part in dotted.split(".")):
        raise PipelineError(f"--task-score {spec}: {dotted!r} is neither a .py file nor a module name; expected "
                            f"{SPEC_FORM}, e.g. python:my_scorer.py:score")
    cwd = os.getcwd()
    sys.path.insert(0, cwd)  # importable from the current directory, as with `python -m`
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as e:
        if e.name and dotted.startswith(e.name):
            raise PipelineError(f"--task-score {spec}: no module {dotted!r} importable from {cwd} (for a file, give "
                                f"its path: python:{dotted.replace('.', '/')}.py:...)") from None
        raise PipelineError(f"--task-score {spec}: importing {dotted} failed: {_one_line(e)}") from None
    except Exception as e:
        raise PipelineError(f"--task-score {spec}: importing {dotted} failed: {type(e).__name__}: "
                            f"{_one_line(e)}") from None
    finally:
        sys.path.remove(cwd)


def load_scorer(spec: str) -> Scorer:
    """The scorer a --task-score names (see the module docstring; not `none`).

    Raises:
        PipelineError: one line, when the name is unknown or a python: file, module or function is missing.
    """
    if spec in BUILT_IN:
        return Scorer(spec, BUILT_IN[spec][0])
    if not spec.startswith(PYTHON):
        raise PipelineError(f"--task-score {spec}: not one of {', '.join(CHOICES)}")
    target, sep, function = spec[len(PYTHON):].rpartition(":")
    if not sep or not target or not function:
        raise PipelineError(f"--task-score {spec}: expected {SPEC_FORM}, e.g. python:my_scorer.py:score")
    digest = None
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise PipelineError(f"--task-score {spec}: no file {path} (relative paths start at {os.getcwd()})")
        digest = _sha256(path)
        module = _import_file(spec, path, digest)
    else:
        module = _import_module(spec, target)
        if getattr(module, "__file__", None):
            digest = _sha256(Path(module.__file__))
    fn = getattr(module, function, None)
    if fn is None:
        raise PipelineError(f"--task-score {spec}: {target} has no function {function!r}")
    if not callable(fn):
        raise PipelineError(f"--task-score {spec}: {target}.{function} is a {type(fn).__name__}, not a function")
    return Scorer(spec, fn, digest)


def spec_problem(spec: str) -> str | None:
    """Why a --task-score cannot be used (one line), or None: for the config check, before any model is loaded."""
    if spec == NONE:
        return None
    try:
        load_scorer(spec)
    except PipelineError as e:
        return str(e).removeprefix("--task-score ")
    return None


def score_one(scorer: Scorer, prediction: str, reference: str, example: dict) -> float:
    """One answer's score; a scorer that raises or returns anything but a number in [0, 1] stops with one line
    naming the example."""
    where = f"--task-score {scorer.name}: example {example.get('id')!r}"
    try:
        value = scorer.fn(prediction, reference, example)
    except Exception as e:
        kind = "" if scorer.name in BUILT_IN else f"raised {type(e).__name__}: "
        raise PipelineError(f"{where}: {kind}{_one_line(e)}") from None
    if not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:  # (NaN fails both comparisons)
        raise PipelineError(f"{where}: returned {_one_line(repr(value))[:80]}, not a number in [0, 1]")
    return float(value)


def standard_error(values: Sequence[float]) -> float | None:
    """Standard error of the mean of per-example scores in [0, 1]: sqrt(mean((s - mean)^2) / n).

    [binomial note] The spread is taken over the n scores themselves (divided by n, not n - 1), so that for 0/1
    scores the error is exactly the binomial sqrt(p (1 - p) / n) the sweep reports have always shown.
    """
    n = len(values)
    if not n:
        return None
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n / n)


def json_fields(predictions: Sequence[str], references: Sequence[str]) -> dict[str, dict]:
    """Per-field accuracy of the `json` score: for each key of the references that are JSON objects, the share of
    those examples whose answer parses to an object holding the same value under that key (an unparsable answer
    misses every field). Keys in order of first appearance."""
    hits: dict[str, list[int]] = {}
    for prediction, reference in zip(predictions, references, strict=True):
        ref = json.loads(reference)  # (already parsed once by json_match: it is JSON)
        if not isinstance(ref, dict):
            continue
        pred = _parse_prediction(prediction)
        for key, value in ref.items():
            hit = isinstance(pred, dict) and key in pred and same_json(pred[key], value)
            hits.setdefault(key, []).append(int(hit))
    return {key: {"accuracy": sum(h) / len(h), "examples": len(h)} for key, h in hits.items()}


def score_all(scorer: Scorer, predictions: Sequence[str], references: Sequence[str],
              examples: Sequence[dict]) -> list[float]:
    """Each answer's score (score_one), in order."""
    return [score_one(scorer, p, r, e) for p, r, e in zip(predictions, references, examples, strict=True)]


def summary(name: str, scores: Sequence[float], predictions: Sequence[str], references: Sequence[str]) -> dict:
    """The task score of evaluate's report: `score` (the mean), `score_name`, `score_error` (standard_error),
    `exact_match` (the same mean, when that is the score) and `fields` (json only)."""
    mean = math.fsum(scores) / len(scores) if scores else 0.0
    result: dict = {"score_name": name, "score": mean, "score_error": standard_error(scores)}
    if name == "exact_match":
        result["exact_match"] = mean  # the published figures and older readers use this key
    if name == "json":
        result["fields"] = json_fields(predictions, references)
    return result
