"""A user's eval file as tasks: both row shapes, bad rows named by file and row, and the loop
feeding a row's recorded results back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tooltune.data import DataError
from tooltune.episode import ToolCall
from tooltune.eval_data import load_eval_tasks

EXAMPLE = Path(__file__).parents[1] / "configs" / "examples" / "eval_tasks.jsonl"


def test_the_example_file_as_tasks():
    tasks, errors = load_eval_tasks(EXAMPLE)
    assert errors == []
    by_id = {t.id: t for t in tasks}
    assert list(by_id) == ["stock-1", "stock-2", "flight-1", "flight-2", "no-tool-1"]
    aapl = ToolCall("get_stock_price", {"symbol": "AAPL"})
    stock = by_id["stock-1"]
    assert (stock.query, stock.system, stock.category, stock.expected_answer) == ("What is Apple (AAPL) trading at?", "", "single", "187.3")
    assert stock.expected_calls == [[aapl]]
    assert stock.tool_results == {aapl.key(): '{"symbol": "AAPL", "price": 187.3}'}
    assert [t["function"]["name"] for t in stock.tools] == ["get_stock_price", "search_flights"]
    pair = by_id["stock-2"]
    assert pair.system == "You are a finance assistant." and pair.category == "parallel" and len(pair.expected_calls[0]) == 2
    assert pair.tool_results[ToolCall("get_stock_price", {"symbol": "NVDA"}).key()] == '{"price": 122.9}'
    flight = by_id["flight-1"]
    call = ToolCall("search_flights", {"origin": "FRA", "destination": "JFK", "date": "2026-12-24"})
    assert flight.expected_calls == [[call]] and flight.tool_results == {call.key(): '{"flights": ["LH123"]}'}
    # A flat list of calls is one step; no recorded result: the loop simulates one.
    assert by_id["flight-2"].category == "single" and by_id["flight-2"].tool_results == {}
    assert by_id["no-tool-1"].expected_calls == [] and not by_id["no-tool-1"].needs_tool


BAD_ROWS = [
    ("not json", "invalid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [], "expected_calls": [{"name": "nope", "arguments": {}}]}, "'nope', which is not among the tools"),
    (
        {"messages": [{"role": "user", "content": "hi"}], "tools": json.loads(EXAMPLE.read_text().splitlines()[0])["tools"],
         "expected_calls": [{"name": "get_stock_price", "arguments": {"symbol": 3}}]},
        "symbol",
    ),
    ({"messages": [{"role": "assistant", "content": "hi"}], "expected_calls": []}, "cannot come first"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}, None),
    ({"messages": [{"role": "user", "content": "x"}], "expected_calls": [], "expected_answer": 4}, "'expected_answer' must be a string"),
]


@pytest.mark.parametrize("row, reason", BAD_ROWS)
def test_a_bad_row_is_one_line_naming_file_and_row(tmp_path, row, reason):
    path = tmp_path / "mine.jsonl"
    good = EXAMPLE.read_text().splitlines()[0]
    path.write_text(good + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
    if reason is None:  # a multi-turn history is a valid task: its prompt is the first user turn
        tasks, _ = load_eval_tasks(path)
        assert tasks[1].query == "a" and tasks[1].expected_calls == []
        return
    with pytest.raises(DataError, match=rf"^{path}:2: .*{reason}") as e:
        load_eval_tasks(path)
    assert "\n" not in str(e.value)
    tasks, errors = load_eval_tasks(path, on_error="skip")
    assert [t.id for t in tasks] == ["stock-1"] and [(Path(e.file).name, e.row) for e in errors] == [("mine.jsonl", 2)]


def test_duplicate_ids_are_a_row_error(tmp_path):
    path = tmp_path / "dup.jsonl"
    line = EXAMPLE.read_text().splitlines()[0]
    path.write_text(line + "\n" + line + "\n")
    with pytest.raises(DataError, match=r"dup.jsonl:2: id 'stock-1' is used by an earlier row"):
        load_eval_tasks(path)


def test_the_loop_feeds_back_the_rows_results(tiny_model_dir):
    """A scripted model makes the row's calls: the row's results come back as the tool messages,
    a call it has no result for gets the simulated one, and the metrics score the episodes."""
    from transformers import AutoTokenizer

    from rollout.agent_loop import LoopConfig, run_episodes
    from rollout.vllm_worker import Generation, PromptResult
    from tooltune.metrics import compute_metrics
    from tooltune.parser import format_tool_calls

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tasks = [t for t in load_eval_tasks(EXAMPLE)[0] if t.id in ("stock-1", "flight-2", "no-tool-1")]
    scripts = {
        "stock-1": [format_tool_calls([ToolCall("get_stock_price", {"symbol": "AAPL"})]), "AAPL is at 187.3."],
        "flight-2": [format_tool_calls(tasks[1].expected_calls[0]), "Checked."],
        "no-tool-1": [format_tool_calls([ToolCall("get_stock_price", {"symbol": "FR"})]), "Lyon"],
    }
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def generate(prompts, sampling):
        out = []
        for prompt in prompts:
            text = tokenizer.decode(prompt)
            task = next(t for t in tasks if t.query in text)
            turn = text.count("<|im_start|>assistant\n") - 1
            ids = tokenizer(scripts[task.id][turn], add_special_tokens=False)["input_ids"] + [end]
            out.append(PromptResult(list(prompt), [Generation(ids, [0.0] * len(ids), tokenizer.decode(ids), "stop")]))
        return out

    loop = LoopConfig(max_turns=3, max_new_tokens=256, max_total_tokens=2048, sampling={"temperature": 0.0})
    runs = {r.task.id: r for r in run_episodes(tasks, generate, tokenizer, loop)}
    tool_messages = {k: [m["content"] for m in r.episode.messages if m["role"] == "tool"] for k, r in runs.items()}
    assert tool_messages == {
        "stock-1": ['{"symbol": "AAPL", "price": 187.3}'],
        "flight-2": [loop.simulated_tool_result],
        "no-tool-1": [loop.simulated_tool_result],
    }
    # Exact calls 2/2; over-call 1/1; answers: 187.3 found, any (flight-2), Paris missing.
    m = compute_metrics(tasks, [r.episode for r in runs.values()])
    assert m["argument_accuracy"] == 1.0 and m["over_call_rate"] == 1.0 and m["final_answer_accuracy"] == pytest.approx(2 / 3)
