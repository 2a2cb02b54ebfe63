"""Berkeley Function Calling Leaderboard (BFCL) adapter: its data as tool tasks, its own AST checker as scorer.

Pinned to ``bfcl-eval==2026.3.23`` (BFCL v4 data files, ``BFCL_v4_<category>.json`` and
``possible_answer/BFCL_v4_<category>.json`` inside the package). Covered: the single-turn, non-live
categories ``simple`` (file ``simple_python``), ``multiple``, ``parallel``, ``parallel_multiple``
(scored by BFCL's AST checker) and ``irrelevance`` (correct iff the model makes no call).

What the adapter maps:

* BFCL function docs -> OpenAI tool schemas. BFCL types that are not JSON Schema are rewritten
  (``dict``->``object``, ``float``->``number``, ``tuple``->``array``, ``any``-> no ``type`` at all,
  i.e. any value), the BFCL-only ``optional`` flag is dropped (``required`` already says it), and
  the text BFCL's own function-calling handlers add is added too (the "Python 3 syntax" hint and
  the float note) so scores stay comparable with the leaderboard's FC-mode numbers.
* Function names: OpenAI tool names may not contain dots (``math.factorial``), so tools get
  ``math_factorial`` and calls are mapped back to the BFCL name before checking.
* Our ``ToolCall`` list -> BFCL's decoded form ``[{name: {arg: value}}]`` for ``ast_checker``.

Only BFCL's pure checker modules are imported (no third-party dependency): importing
``bfcl_eval.constants.model_config`` would import every vendor SDK, see ``_load_checker``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import tempfile
import types
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tooltune.episode import Task, ToolCall

BFCL_EVAL_VERSION = "2026.3.23"
BFCL_DATA_PREFIX = "BFCL_v4"
BFCL_CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple", "irrelevance")
# Our category name -> the suffix of BFCL's file name (BFCL v4 split "simple" by language).
_FILE_CATEGORY = {
    "simple": "simple_python",
    "multiple": "multiple",
    "parallel": "parallel",
    "parallel_multiple": "parallel_multiple",
    "irrelevance": "irrelevance",
}
# A model whose real BFCL config has underscore_to_dot=False: the checker then compares the dotted
# BFCL names as they are, which is right because score_bfcl maps our names back first. Naming a
# real model also keeps the checker correct if the real model_config was imported before us.
_CHECKER_MODEL = "gorilla-openfunctions-v2"
# Same text as bfcl_eval.utils._get_language_specific_hint / model_handler.utils._cast_to_openai_type.
_PYTHON_HINT = " Note that the provided function is in Python 3 syntax."
_FLOAT_NOTE = " This is a float type value."
# BFCL type names -> JSON Schema; None means "no type keyword" (any JSON value is accepted).
_JSON_TYPE: dict[str, str | None] = {
    "dict": "object",
    "object": "object",
    "float": "number",
    "number": "number",
    "double": "number",
    "integer": "integer",
    "long": "integer",
    "short": "integer",
    "byte": "integer",
    "string": "string",
    "char": "string",
    "boolean": "boolean",
    "bool": "boolean",
    "array": "array",
    "list": "array",
    "tuple": "array",
    "any": None,
    "Any": None,
}


@dataclass
class BfclItem:
    """One BFCL test entry, ready for the tool loop (``messages`` + ``tools``) and for scoring."""

    id: str
    category: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    functions: list[dict[str, Any]]
    ground_truth: list[dict[str, Any]] | None
    name_map: dict[str, str]  # tool name as exposed to the model -> BFCL function name

    def to_task(self) -> Task:
        """A ``Task`` for the project's tool loop. Its ``expected_calls`` is one acceptable answer
        only (BFCL accepts several): score with ``score_bfcl``, not with ``Task`` metrics."""
        system = "\n\n".join(m["content"] for m in self.messages if m["role"] == "system")
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        calls = reference_calls(self)
        return Task(
            id=self.id,
            query=users[-1] if users else "",
            tools=self.tools,
            expected_calls=[calls] if calls else [],
            category=f"bfcl_{self.category}",
            system=system,
        )


@dataclass(frozen=True)
class BfclScore:
    """BFCL's verdict on one item. ``schema_violation`` says how an emitted call broke the tool
    schema we offered (unknown tool, or arguments that break it), ``None`` when none did. It is
    reported beside accuracy, not in it: BFCL's checker judges the call as emitted, and a few of
    BFCL's own answers break their schemas (``parallel_multiple_21`` and ``_94``)."""

    correct: bool
    error: str = ""
    schema_violation: str | None = None


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def bfcl_data_dir() -> Path:
    """The ``data`` folder of the installed package, found without importing anything from it."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or spec.origin is None:
        raise ImportError(f"bfcl-eval is not installed (pip install --no-deps bfcl-eval=={BFCL_EVAL_VERSION})")
    return Path(spec.origin).parent / "data"


def bfcl_files(category: str) -> tuple[Path, Path | None]:
    """(questions file, possible-answer file or None) for one of ``BFCL_CATEGORIES``."""
    if category not in _FILE_CATEGORY:
        raise ValueError(f"unknown BFCL category {category!r}; expected one of {BFCL_CATEGORIES}")
    name = f"{BFCL_DATA_PREFIX}_{_FILE_CATEGORY[category]}.json"
    data = bfcl_data_dir()
    answers = data / "possible_answer" / name
    return data / name, (answers if category != "irrelevance" else None)


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    # BFCL's ".json" files are JSON Lines. Read directly: bfcl_eval.utils.load_file takes a file
    # lock and imports eval_config, which creates result/score folders.
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def load_bfcl(categories: Iterable[str] = BFCL_CATEGORIES, limit_per_category: int | None = None) -> list[BfclItem]:
    """Load BFCL items in file order, ``limit_per_category`` first items of each category."""
    items: list[BfclItem] = []
    for category in categories:
        questions_path, answers_path = bfcl_files(category)
        entries = _read_jsonl(questions_path, limit_per_category)
        answers: dict[str, Any] = {}
        if answers_path is not None:
            answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(answers_path)}
        for entry in entries:
            if len(entry["question"]) != 1:
                raise ValueError(f"{entry['id']}: multi-turn entries are not supported")
            functions = entry["function"]
            name_map = _tool_names([f["name"] for f in functions])
            to_tool = {v: k for k, v in name_map.items()}
            items.append(
                BfclItem(
                    id=entry["id"],
                    category=category,
                    messages=[dict(m) for m in entry["question"][0]],
                    tools=[function_to_tool(f, to_tool[f["name"]]) for f in functions],
                    functions=functions,
                    ground_truth=answers[entry["id"]] if answers_path is not None else None,
                    name_map=name_map,
                )
            )
    return items


def _tool_names(bfcl_names: Sequence[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    for bfcl_name in bfcl_names:
        # Same substitution as BFCL's convert_to_tool (OpenAI allows ^[a-zA-Z0-9_-]{1,64}$).
        name = bfcl_name.replace(".", "_")
        if name in names and names[name] != bfcl_name:
            raise ValueError(f"tool names {names[name]!r} and {bfcl_name!r} both map to {name!r}")
        names[name] = bfcl_name
    return names


def function_to_tool(function: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """A BFCL function doc as an OpenAI tool (``{"type": "function", "function": {...}}``)."""
    parameters = _to_json_schema(function.get("parameters") or {})
    parameters["type"] = "object"  # BFCL writes "dict"; a missing one would also be an object
    parameters.setdefault("properties", {})
    return {
        "type": "function",
        "function": {
            "name": name or function["name"].replace(".", "_"),
            "description": function.get("description", "") + _PYTHON_HINT,
            "parameters": parameters,
        },
    }


def _to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "type":
            # BFCL's own conversion falls back to "string" for types it does not know.
            json_type = _JSON_TYPE.get(value, "string") if isinstance(value, str) else "string"
            if json_type is not None:
                out["type"] = json_type
        elif key == "properties" and isinstance(value, dict):
            out["properties"] = {k: _property_schema(v) for k, v in value.items()}
        elif key == "items" and isinstance(value, dict):
            out["items"] = _to_json_schema(value)
        elif key == "optional":
            continue  # BFCL-only flag, written as true, "True", "yes" or a list; not JSON Schema
        elif key == "required" and not isinstance(value, list):
            continue  # draft-3 style boolean would fail the metaschema
        else:
            out[key] = json.loads(json.dumps(value))  # deep copy; the tool must not alias the doc
    return out


def _property_schema(node: dict[str, Any]) -> dict[str, Any]:
    out = _to_json_schema(node)
    if "type" not in node:
        out["type"] = "string"  # as BFCL's convert_to_tool does
    if node.get("type") == "float":
        # JSON has one number type; BFCL tells FC models the value is a float the same way.
        out["description"] = out.get("description", "") + _FLOAT_NOTE
        out["format"] = "float"
    return out


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _load_checker() -> tuple[Callable[..., dict[str, Any]], Any]:
    """Import ``ast_checker`` and ``Language`` without importing BFCL's vendor SDKs."""
    # Nothing on this path writes files, but eval_config (imported by other bfcl modules) creates
    # result/score/lock folders under BFCL_PROJECT_ROOT, by default next to site-packages.
    if not os.environ.get("BFCL_PROJECT_ROOT"):
        os.environ["BFCL_PROJECT_ROOT"] = str(Path(tempfile.gettempdir()) / "tooltune-bfcl")
    config_name = "bfcl_eval.constants.model_config"
    checker_name = "bfcl_eval.eval_checker.ast_eval.ast_checker"
    stubbed = config_name not in sys.modules and checker_name not in sys.modules
    if stubbed:
        # WORKAROUND for the SDK imports: ast_checker.py does `from ...model_config import
        # MODEL_CONFIG_MAPPING` only to read `underscore_to_dot`, but model_config imports every
        # API handler (openai, anthropic, google-genai, mistral, cohere, boto3, ...). A stub module
        # serves that import; it knows our checker model and defers any other key to the real
        # module, so BFCL's own runner keeps working if used later in the same process.
        stub = types.ModuleType(config_name)
        stub.MODEL_CONFIG_MAPPING = _LazyModelConfig({_CHECKER_MODEL: types.SimpleNamespace(underscore_to_dot=False)})
        sys.modules[config_name] = stub
    try:
        checker = importlib.import_module(checker_name)
        enums = importlib.import_module("bfcl_eval.constants.enums")
    finally:
        if stubbed:
            # Drop the stub so that an explicit import later gets the real module.
            sys.modules.pop(config_name, None)
    return checker.ast_checker, enums.Language.PYTHON


class _LazyModelConfig(dict):
    def __missing__(self, key: str) -> Any:
        return importlib.import_module("bfcl_eval.constants.model_config").MODEL_CONFIG_MAPPING[key]


def to_bfcl_output(item: BfclItem, calls: Sequence[ToolCall]) -> list[dict[str, dict[str, Any]]]:
    """Our calls in BFCL's decoded form, with tool names mapped back to the BFCL names."""
    return [{item.name_map.get(c.name, c.name): dict(c.arguments)} for c in calls]


def score_bfcl(item: BfclItem, calls: Sequence[ToolCall]) -> BfclScore:
    """Score the calls a model made for ``item`` the way BFCL does (AST match or irrelevance)."""
    if item.category == "irrelevance":
        if calls:
            return BfclScore(False, f"expected no call, got {len(calls)} ({', '.join(c.name for c in calls)})")
        return BfclScore(True)
    if item.ground_truth is None:
        raise ValueError(f"{item.id}: no ground truth for category {item.category!r}")
    for call in calls:
        # BFCL counts output that is not {name: {arg: value}} as a decode failure.
        if not isinstance(call.arguments, dict):
            return BfclScore(False, f"arguments of {call.name!r} are not an object")
    ast_checker, python = _load_checker()
    try:
        result = ast_checker(
            item.functions,
            to_bfcl_output(item, calls),
            item.ground_truth,
            python,
            _FILE_CATEGORY[item.category],
            _CHECKER_MODEL,
        )
    except Exception as exc:  # noqa: BLE001 - the checker indexes model output without guards
        return BfclScore(False, f"checker error: {type(exc).__name__}: {exc}")
    if result["valid"]:
        return BfclScore(True)
    errors = result.get("error") or []
    message = "; ".join(e if isinstance(e, str) else json.dumps(e, default=str) for e in errors)
    return BfclScore(False, f"{result.get('error_type', 'invalid')}: {message}")


def reference_calls(item: BfclItem) -> list[ToolCall]:
    """One acceptable answer built from the ground truth: the first possible value of every
    argument, leaving out those BFCL marks as omissible (``""`` among the options) unless the
    function requires them (a few ground-truth rows list ``""`` first for a required argument)."""
    if not item.ground_truth:
        return []
    to_tool = {v: k for k, v in item.name_map.items()}
    required = {f["name"]: set(f.get("parameters", {}).get("required") or ()) for f in item.functions}
    calls = []
    for entry in item.ground_truth:
        ((bfcl_name, options),) = entry.items()
        args = _first_values(options, required.get(bfcl_name, set()))
        calls.append(ToolCall(to_tool.get(bfcl_name, bfcl_name), args))
    return calls


def _first_values(options: dict[str, list[Any]], required: set[str] = frozenset()) -> dict[str, Any]:
    out = {}
    for key, possible in options.items():
        present = [v for v in possible if v != ""]
        if not present or ("" in possible and key not in required):
            continue
        value = present[0]
        if isinstance(value, dict):  # nested dict answers hold option lists again
            value = _first_values(value)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            value = [_first_values(v) for v in value]
        out[key] = value
    return out


def bfcl_summary(items: Sequence[BfclItem], scores: Sequence[BfclScore]) -> dict[str, Any]:
    """Accuracy per category and overall, each with its count of schema-violating outputs.

    ``overall`` is micro-averaged (correct / total over all items); ``macro`` is the mean of the
    category accuracies, closer to how BFCL averages categories. ``schema_violations`` counts items
    whose output broke the offered schema, correct or not (see ``BfclScore``).
    """
    if len(items) != len(scores):
        raise ValueError(f"{len(items)} items but {len(scores)} scores")
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for item, score in zip(items, scores):
        totals[item.category][0] += int(score.correct)
        totals[item.category][1] += 1
        totals[item.category][2] += int(score.schema_violation is not None)
    categories = {
        c: {"accuracy": ok / n, "correct": ok, "total": n, "schema_violations": bad}
        for c, (ok, n, bad) in sorted(totals.items(), key=lambda kv: _category_order(kv[0]))
    }
    correct = sum(v["correct"] for v in categories.values())
    total = sum(v["total"] for v in categories.values())
    violations = sum(v["schema_violations"] for v in categories.values())
    return {
        "bfcl_eval_version": BFCL_EVAL_VERSION,
        "categories": categories,
        "overall": {
            "accuracy": correct / total if total else 0.0,
            "correct": correct,
            "total": total,
            "schema_violations": violations,
        },
        "macro_accuracy": (sum(v["accuracy"] for v in categories.values()) / len(categories) if categories else 0.0),
    }


def _category_order(category: str) -> tuple[int, str]:
    return (BFCL_CATEGORIES.index(category) if category in BFCL_CATEGORIES else len(BFCL_CATEGORIES), category)
