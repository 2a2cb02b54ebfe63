"""The seeded tool world: tasks with ground truth, computed by running the built-in tools.

Every query is filled from templates, and every argument value of a first call appears in it
verbatim (dates ISO, numbers as JSON writes them), so even a tiny model trained from scratch
can learn to copy. The training split is mostly tasks that need a tool (``no_tool_fraction``
0.1): SFT on it teaches a model to over-call, which the PPO stage then corrects. The test split
also holds tasks whose tools (``UNSEEN_TOOLS``) never appear in train or validation. With
``synthetic_tools``, train also calls (and offers as distractors) procedurally generated tools
(``world_synthetic``), so a model learns to read schemas; validation and test never hold them.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, NonNegativeInt, model_validator

from tooltune.config import StrictModel
from tooltune.episode import Task, ToolCall
from tooltune.tools import ToolRegistry
from tooltune.tools.builtins import UNSEEN_TOOLS, builtin_registry
from tooltune.world_queries import (
    ANSWER_TEMPLATE,
    GENERATORS,
    NO_TOOL_KINDS,
    SMALL_TALK,
    SMALL_TALK_DEFAULT_REPLY,
    Generator,
    Run,
    _calculator_trivial_phrasing,
    _Draft,
)
from tooltune.world_synthetic import SyntheticTool, add_synthetic_tools, synthetic_call, synthetic_tools

SPLITS = ("train", "validation", "test")
CATEGORIES = ("single", "parallel", "multi_step", "no_tool")


class WorldConfig(StrictModel):
    """How many tasks of which kind each split holds; the same config and seed give the same files."""

    seed: int = 0
    n_train: NonNegativeInt = 2000
    n_validation: NonNegativeInt = 200
    n_test: NonNegativeInt = 400
    no_tool_fraction: float = Field(0.1, ge=0, le=1)
    # The kinds of no-tool task the training split draws (validation and test draw every kind).
    # Without trivial_math, the few no-tool examples are chit-chat and general knowledge, as in
    # common function-calling data: none shows an offered tool that is not needed.
    train_no_tool_kinds: list[Literal[NO_TOOL_KINDS]] = list(NO_TOOL_KINDS)  # type: ignore[valid-type]
    eval_no_tool_fraction: float = Field(0.3, ge=0, le=1)
    # The share of the training split's single-call tasks that ask the calculator in the trivial
    # no-tool phrasings ("What is 4821 times 977?", world_queries.TRIVIAL_FORMS) with large
    # operands: the phrasing alone then does not decide the call (the operands do). Other
    # phrasings of the calculator use the calculator templates. 0 leaves the world as it was.
    trivial_phrased_calculator_share: float = Field(0.0, ge=0, le=1)
    single_share: float = Field(0.5, ge=0, le=1)
    parallel_share: float = Field(0.25, ge=0, le=1)
    multi_step_share: float = Field(0.25, ge=0, le=1)
    distractor_tools: NonNegativeInt = 2
    unseen_test_fraction: float = Field(0.1, ge=0, le=1)
    # Procedurally generated tools (train only; see world_synthetic): this many
    # tools, called by this share of the needed-tool tasks; they are distractors there too.
    synthetic_tools: NonNegativeInt = 0
    synthetic_share: float = Field(0.0, ge=0, le=1)
    # With generated tools, the odds that a distractor is a built-in tool; None draws uniformly.
    # Uniform draws from ~200 generated tools and a few built-ins almost never offer a built-in
    # beside another built-in, as every test task does: a model can learn "call the familiar
    # tool" and pick a familiar wrong one over an unseen right one.
    builtin_distractor_share: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _check_fractions(self) -> WorldConfig:
        shares = self.single_share + self.parallel_share + self.multi_step_share
        if abs(shares - 1) > 1e-6:
            raise ValueError(f"single_share + parallel_share + multi_step_share must be 1, got {shares:g}")
        if self.eval_no_tool_fraction + self.unseen_test_fraction > 1:
            raise ValueError("eval_no_tool_fraction + unseen_test_fraction must be at most 1")
        if self.synthetic_share > 0 and not self.synthetic_tools:
            raise ValueError("synthetic_share > 0 needs synthetic_tools > 0")
        if self.no_tool_fraction > 0 and not self.train_no_tool_kinds:
            raise ValueError("train_no_tool_kinds is empty, but no_tool_fraction > 0 asks for no-tool training tasks")
        return self


_MAX_DRAWS = 200


def world_synthetic_tools(cfg: WorldConfig) -> list[SyntheticTool]:
    return synthetic_tools(cfg.synthetic_tools, cfg.seed)


def world_registry(cfg: WorldConfig | None = None) -> ToolRegistry:
    """Every tool a world of ``cfg`` can call: the built-ins and its generated tools."""
    registry = builtin_registry()
    return add_synthetic_tools(registry, world_synthetic_tools(cfg)) if cfg and cfg.synthetic_tools else registry


def generate_world(cfg: WorldConfig) -> dict[str, list[Task]]:
    """Train, validation and test tasks; no query text appears twice in the whole world.

    Each split draws from its own seeded stream, and the evaluation splits are drawn first and
    from built-in tools only: a training knob (``n_train``, ``no_tool_fraction``, generated tools,
    their share and distractor odds) leaves validation and test byte-identical, so runs that differ
    in it are compared on the same tasks. Test comes first: it never depends on validation's size.
    """
    synthetic = world_synthetic_tools(cfg) if cfg.synthetic_tools else []
    registry = add_synthetic_tools(builtin_registry(), synthetic)
    run = _ground_truth_runner(registry)
    seen_queries: set[str] = set()
    world = {}
    generated = {t.name for t in synthetic}
    sizes = {"train": cfg.n_train, "validation": cfg.n_validation, "test": cfg.n_test}
    for split in ("test", "validation", "train"):
        rng = random.Random(f"tooltune-world:{cfg.seed}:{split}")
        tasks = []
        # Generated tools are for learning; validation and test measure the fixed built-in benchmark.
        exclude = generated if split != "train" else set()
        for index, kind in enumerate(_plan(split, sizes[split], cfg, rng)):
            if kind == "synthetic":
                draft = _draw_synthetic(rng, synthetic, run, seen_queries)
            elif split == "train" and kind == "single" and _draws_below(rng, cfg.trivial_phrased_calculator_share):
                draft = _draw(kind, rng, run, seen_queries, generators=(_calculator_trivial_phrasing,))
            else:
                kinds = cfg.train_no_tool_kinds if split == "train" and kind == "no_tool" else None
                draft = _draw(kind, rng, run, seen_queries, kinds)
            tasks.append(_to_task(f"{split}-{index:05d}", draft, kind == "unseen", rng, registry, cfg, exclude, generated))
        world[split] = tasks
    return {split: world[split] for split in SPLITS}


def _draws_below(rng: random.Random, share: float) -> bool:
    """A draw with odds ``share``; no draw at all (the stream unchanged) when it is 0."""
    return share > 0 and rng.random() < share


def _plan(split: str, size: int, cfg: WorldConfig, rng: random.Random) -> list[str]:
    """The kind of every task in a split: exact counts (not sampled), in a seeded random order."""
    no_tool = round(size * (cfg.no_tool_fraction if split == "train" else cfg.eval_no_tool_fraction))
    unseen = min(round(size * cfg.unseen_test_fraction), size - no_tool) if split == "test" else 0
    rest = size - no_tool - unseen
    synthetic = round(rest * cfg.synthetic_share) if split == "train" and cfg.synthetic_tools else 0
    rest -= synthetic
    shares = {"single": cfg.single_share, "parallel": cfg.parallel_share, "multi_step": cfg.multi_step_share}
    counts = {k: int(rest * s) for k, s in shares.items()}
    # Largest remainder: the counts add up to `rest` exactly and follow the shares as closely as possible.
    for k in sorted(shares, key=lambda k: rest * shares[k] - counts[k], reverse=True)[: rest - sum(counts.values())]:
        counts[k] += 1
    plan = ["no_tool"] * no_tool + ["unseen"] * unseen + ["synthetic"] * synthetic + [k for k, n in counts.items() for _ in range(n)]
    rng.shuffle(plan)
    return plan


def _draw(
    kind: str,
    rng: random.Random,
    run: Run,
    seen_queries: set[str],
    no_tool_kinds: list[str] | None = None,
    generators: tuple[Generator, ...] | None = None,
) -> _Draft:
    generators = generators or GENERATORS[kind]
    if no_tool_kinds is not None:
        # In NO_TOOL_KINDS' order: with every kind allowed, the draws are the unrestricted ones.
        generators = tuple(g for name, g in zip(NO_TOOL_KINDS, generators) if name in no_tool_kinds)
    for _ in range(_MAX_DRAWS):
        draft = rng.choice(generators)(rng, run)
        if draft.query and draft.query not in seen_queries:
            seen_queries.add(draft.query)
            return draft
    raise ValueError(f"no new {kind!r} query in {_MAX_DRAWS} draws: the world is too large for its templates")


def _draw_synthetic(rng: random.Random, tools: list[SyntheticTool], run: Run, seen_queries: set[str]) -> _Draft:
    for _ in range(_MAX_DRAWS):
        query, call = synthetic_call(rng, rng.choice(tools))
        if query not in seen_queries:
            seen_queries.add(query)
            return _Draft(query, [[call]], run(call)["reference"])
    raise ValueError(f"no new synthetic query in {_MAX_DRAWS} draws")


def pick_distractors(
    rng: random.Random, pool: list[str], k: int, generated: set[str], builtin_share: float | None
) -> list[str]:
    """``k`` (at most ``len(pool)``) tools of ``pool``; where it holds built-in and generated
    tools, each pick is a built-in with odds ``builtin_share`` (see ``WorldConfig``)."""
    builtins, others = [n for n in pool if n not in generated], [n for n in pool if n in generated]
    if builtin_share is None or not builtins or not others:
        return rng.sample(pool, k)
    picked = []
    for _ in range(k):
        side = builtins if builtins and (not others or rng.random() < builtin_share) else others
        picked.append(side.pop(rng.randrange(len(side))))
    return picked


def _to_task(
    task_id: str,
    draft: _Draft,
    unseen: bool,
    rng: random.Random,
    registry: ToolRegistry,
    cfg: WorldConfig,
    exclude: set[str] = frozenset(),
    generated: set[str] = frozenset(),
) -> Task:
    needed = list(dict.fromkeys([c.name for step in draft.steps for c in step] + list(draft.bait)))
    pool = [n for n in registry.names() if n not in needed and n not in exclude and (unseen or n not in UNSEEN_TOOLS)]
    # A no-tool task gets one more tool, so it is offered as many as a single-call task.
    picks = min(len(pool), cfg.distractor_tools + (0 if needed else 1))
    offered = needed + pick_distractors(rng, pool, picks, generated, cfg.builtin_distractor_share)
    rng.shuffle(offered)
    if not draft.steps:
        category = "no_tool"
    elif len(draft.steps) > 1:
        category = "multi_step"
    else:
        category = "parallel" if len(draft.steps[0]) > 1 else "single"
    return Task(
        id=task_id,
        query=draft.query,
        tools=registry.schemas(offered),
        expected_calls=draft.steps,
        expected_answer=draft.answer,
        category=category,
        unseen_tools=unseen,
    )


def _ground_truth_runner(registry: ToolRegistry) -> Run:
    def run(call: ToolCall) -> dict[str, Any]:
        # In the caller's thread: the built-ins are bounded, and a thread per call costs more than the call.
        result = registry.execute(call, timeout_s=None)
        if result.error is not None:
            raise RuntimeError(f"ground-truth call {call} failed: {result.error}")
        return json.loads(result.content)

    return run


def gold_final_answer(task: Task) -> str:
    """The ideal last assistant message: always contains ``task.expected_answer``."""
    if task.expected_answer:
        return ANSWER_TEMPLATE.format(answer=task.expected_answer)
    return next((reply for body, reply in SMALL_TALK.items() if task.query.endswith(body)), SMALL_TALK_DEFAULT_REPLY)


def gold_messages(task: Task, registry: ToolRegistry) -> list[dict[str, Any]]:
    """The ideal OpenAI-format conversation for ``task``: the SFT target.

    One assistant message per step carries that step's ``tool_calls`` (ids ``call_0``, ``call_1``...
    across the conversation, content ``""``), each followed by its ``role: "tool"`` result as the
    executor returns it; a last assistant message gives ``gold_final_answer``.
    """
    messages: list[dict[str, Any]] = [{"role": "system", "content": task.system}] if task.system else []
    messages.append({"role": "user", "content": task.query})
    call_index = 0
    for step in task.expected_calls:
        ids = [f"call_{call_index + i}" for i in range(len(step))]
        call_index += len(step)
        messages.append({"role": "assistant", "content": "", "tool_calls": [c.to_openai(i) for c, i in zip(step, ids)]})
        for call, call_id in zip(step, ids):
            result = registry.execute(call, timeout_s=None)
            if result.error is not None:
                raise RuntimeError(f"task {task.id}: gold call {call} failed: {result.error}")
            messages.append({"role": "tool", "tool_call_id": call_id, "name": call.name, "content": result.content})
    messages.append({"role": "assistant", "content": gold_final_answer(task)})
    return messages


def write_world(splits: dict[str, list[Task]], out_dir: str | Path) -> dict[str, Path]:
    """Write ``{split}.parquet`` per split through ``datasets``; returns the paths."""
    import datasets

    features = datasets.Features({
        "id": datasets.Value("string"), "query": datasets.Value("string"), "tools": datasets.Value("string"),
        "expected_calls": datasets.Value("string"), "expected_answer": datasets.Value("string"),
        "category": datasets.Value("string"), "unseen_tools": datasets.Value("bool"),
        "needs_tool": datasets.Value("bool"), "system": datasets.Value("string"),
    })  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, tasks in splits.items():
        paths[split] = out / f"{split}.parquet"
        datasets.Dataset.from_list([t.to_row() for t in tasks], features=features).to_parquet(str(paths[split]))
    return paths


def load_tasks(path: str | Path) -> list[Task]:
    """Tasks from a ``.parquet`` file or a ``.jsonl`` file of ``Task.to_row`` rows; a file that
    cannot be read, or a bad row, is a ``DataError`` naming the file (and row)."""
    from tooltune.data import DataError, _rows

    path = Path(path)
    if path.suffix not in (".parquet", ".jsonl", ".json"):
        raise DataError(f"{path}: expected a .parquet or .jsonl file of tasks")
    tasks = []
    for file, number, row in _rows(path, None):
        try:
            if isinstance(row, Exception):
                raise row
            tasks.append(Task.from_row(row))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            reason = f"missing field {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
            raise DataError(f"{file}:{number}: not a task row: {reason}") from None
    return tasks


def world_stats(splits: dict[str, list[Task]]) -> dict[str, dict[str, Any]]:
    """Per split: count, share needing a tool, tasks per category, tasks on unseen tools."""
    stats = {}
    for split, tasks in splits.items():
        categories = Counter(t.category for t in tasks)
        stats[split] = {
            "count": len(tasks),
            "needs_tool_share": sum(t.needs_tool for t in tasks) / len(tasks) if tasks else 0.0,
            "categories": {c: categories.get(c, 0) for c in CATEGORIES},
            "unseen": sum(t.unseen_tools for t in tasks),
        }
    return stats


def format_world_stats(stats: dict[str, dict[str, Any]]) -> str:
    header = f"{'split':<12}{'count':>7}{'needs_tool':>12}" + "".join(f"{c:>12}" for c in CATEGORIES) + f"{'unseen':>8}"
    lines = [header]
    for split, s in stats.items():
        cells = "".join(f"{s['categories'][c]:>12}" for c in CATEGORIES)
        lines.append(f"{split:<12}{s['count']:>7}{s['needs_tool_share']:>12.2f}{cells}{s['unseen']:>8}")
    return "\n".join(lines)


def run_world(out_dir: str | Path, cfg: WorldConfig | None = None) -> dict[str, dict[str, Any]]:
    """Generate the world for ``cfg`` (defaults when ``None``), write it to ``out_dir``, return its stats."""
    splits = generate_world(cfg or WorldConfig())
    write_world(splits, out_dir)
    return world_stats(splits)
