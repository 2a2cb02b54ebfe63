"""The response-based distillation filter on hand-made episodes."""

from tooltune.episode import EndReason, Episode, FailureReason, Task, ToolCall, Turn
from tooltune.response_filter import REASONS, filter_episodes, rejection

CALC = [{"type": "function", "function": {"name": "calculator", "description": "", "parameters": {"type": "object"}}}]
CALL = ToolCall("calculator", {"expression": "4821 * 977"})
NEEDS = Task(id="a", query="What is 4821 * 977?", tools=CALC, expected_calls=[[CALL]], expected_answer="4710117")
TRIVIAL = Task(id="b", query="What is 3 + 4?", tools=CALC, expected_calls=[], expected_answer="7")
CHAT = Task(id="c", query="Hi!", tools=CALC, expected_calls=[], expected_answer="")


def episode(*turns, answer="4710117", end=EndReason.FINAL_ANSWER):
    return Episode("x", turns=list(turns), final_answer=answer, end_reason=end,
                   messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": answer or ""}])  # fmt: skip


def test_each_reason_by_hand():
    good = episode(Turn("<tool_call>", calls=[CALL]), Turn("4710117"))
    assert rejection(NEEDS, good) is None
    assert rejection(NEEDS, episode(Turn("{", failure=FailureReason.MALFORMED_JSON), Turn("x"))) == "format_error"
    assert rejection(NEEDS, episode(Turn("", failure=FailureReason.EMPTY_OUTPUT))) == "format_error"
    assert rejection(NEEDS, episode(Turn("c", failure=FailureReason.UNKNOWN_TOOL))) == "hallucinated_tool"
    assert rejection(NEEDS, episode(Turn("c", failure=FailureReason.INVALID_ARGUMENTS))) == "schema_violation"
    # A format error outranks a hallucinated tool in the same episode.
    both = episode(Turn("c", failure=FailureReason.UNKNOWN_TOOL), Turn("{", failure=FailureReason.MALFORMED_JSON))
    assert rejection(NEEDS, both) == "format_error"
    assert rejection(NEEDS, episode(Turn("<tool_call>", calls=[CALL]), answer=None, end=EndReason.TURN_LIMIT)) == "no_final_answer"
    other = ToolCall("calculator", {"expression": "4821 + 977"})
    assert rejection(NEEDS, episode(Turn("<tool_call>", calls=[other]), Turn("5798"))) == "wrong_calls"
    assert rejection(NEEDS, episode(Turn("4710117"))) == "wrong_calls"  # answered without the needed call
    assert rejection(NEEDS, episode(Turn("<tool_call>", calls=[CALL]), Turn("4710000"), answer="4710000")) == "wrong_answer"
    # A call where none is needed is a wrong call; a direct right answer is kept.
    assert rejection(TRIVIAL, episode(Turn("<tool_call>", calls=[ToolCall("calculator", {"expression": "3 + 4"})]), Turn("7"), answer="7")) == "wrong_calls"
    assert rejection(TRIVIAL, episode(Turn("7"), answer="It is 7.")) is None
    assert rejection(TRIVIAL, episode(Turn("8"), answer="8")) == "wrong_answer"
    # The expected number as a whole, not inside another one.
    assert rejection(TRIVIAL, episode(Turn("47"), answer="The result is 47.")) == "wrong_answer"
    assert rejection(TRIVIAL, episode(Turn("7.5"), answer="7.5")) == "wrong_answer"
    assert rejection(TRIVIAL, episode(Turn("7"), answer="3 + 4 = 7.")) is None
    # No ground-truth answer (small talk): any final answer goes.
    assert rejection(CHAT, episode(Turn("Hello!"), answer="Hello!")) is None
    assert rejection(NEEDS, episode(Turn("4710117")), check_calls=False) is None


def test_filter_counts_and_keeps_conversations():
    eps = [
        episode(Turn("<tool_call>", calls=[CALL]), Turn("4710117")),
        episode(Turn("{", failure=FailureReason.MALFORMED_JSON)),
        episode(Turn("7"), answer="7"),
        episode(Turn("9"), answer="9"),
    ]
    kept, counts = filter_episodes([NEEDS, NEEDS, TRIVIAL, TRIVIAL], eps)
    assert counts == {"episodes": 4, "kept": 2, "format_error": 1, "hallucinated_tool": 0, "schema_violation": 0,
                      "no_final_answer": 0, "wrong_calls": 0, "wrong_answer": 1}  # fmt: skip
    assert set(counts) == {"episodes", "kept", *REASONS}
    assert kept == [(eps[0].messages, CALC), (eps[2].messages, CALC)]
