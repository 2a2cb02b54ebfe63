"""The Hermes wire format: exact strings both ways, every failure kind, and a fuzz that it never raises."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tooltune.episode import FailureReason, ToolCall
from tooltune.parser import ParseResult, decode_tool_calls, format_tool_calls, parse_assistant_text
from tooltune.schema import validate_arguments
from tooltune.tools.builtins import builtin_registry

TOOLS = builtin_registry().schemas(["get_weather", "calculator"])
PARIS = ToolCall("get_weather", {"city": "Paris", "date": "2026-03-14"})
SUM = ToolCall("calculator", {"expression": "2+3*4"})
PARIS_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "date": "2026-03-14"}}\n</tool_call>'
SUM_TEXT = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3*4"}}\n</tool_call>'
FUZZ = settings(max_examples=100, deadline=1000, database=None, suppress_health_check=[HealthCheck.too_slow])


def test_format_is_the_exact_hermes_text():
    assert format_tool_calls([PARIS]) == PARIS_TEXT
    assert format_tool_calls([PARIS, SUM]) == PARIS_TEXT + "\n" + SUM_TEXT
    assert format_tool_calls([ToolCall("get_weather", {"city": "Zürich", "date": "2026-03-14"})]) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "date": "2026-03-14"}}\n</tool_call>'
    )


def test_parallel_calls_parse_back():
    assert parse_assistant_text(PARIS_TEXT + "\n" + SUM_TEXT, TOOLS) == ParseResult(calls=[PARIS, SUM])


def test_text_without_tags_is_the_final_answer():
    result = parse_assistant_text("  The answer is 14.\n", TOOLS)
    assert result == ParseResult(content="The answer is 14.")
    assert result.is_final_answer


def test_empty_text_is_empty_output():
    for text in ("", " \n\t "):
        assert parse_assistant_text(text, TOOLS).failure is FailureReason.EMPTY_OUTPUT


def test_text_around_the_calls_is_content():
    result = parse_assistant_text("Let me check.\n" + PARIS_TEXT + "\nOne moment.", TOOLS)
    assert result.calls == [PARIS]
    assert result.content == "Let me check.\n\nOne moment."
    assert result.failure is None


def test_unclosed_last_tag_is_parsed():
    # Generation stops at the `</tool_call>` stop string, which vLLM leaves out of the text.
    text = PARIS_TEXT + '\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3*4"}}\n'
    assert parse_assistant_text(text, TOOLS).calls == [PARIS, SUM]


def test_arguments_may_be_a_json_string():
    text = '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"2+3*4\\"}"}</tool_call>'
    assert parse_assistant_text(text, TOOLS).calls == [SUM]


def test_closing_tag_inside_an_argument_round_trips():
    call = ToolCall("calculator", {"expression": "</tool_call><tool_call>"})
    assert parse_assistant_text(format_tool_calls([call]), TOOLS).calls == [call]


def test_malformed_json():
    text = '<tool_call>\n{"name": "calculator", "arguments": {"expression": }\n</tool_call>'
    result = parse_assistant_text(text, TOOLS)
    assert result.failure is FailureReason.MALFORMED_JSON
    assert result.detail.startswith("call 1: malformed JSON: Expecting value")
    assert result.calls == []


def test_not_a_call_object_nan_and_deep_nesting_are_malformed():
    for body in ('["calculator"]', '{"arguments": {}}', '{"name": "calculator", "arguments": NaN}', "[" * 100_000):
        result = parse_assistant_text(f"<tool_call>{body}</tool_call>", TOOLS)
        assert result.failure is FailureReason.MALFORMED_JSON, body[:40]


def test_unknown_tool_is_named():
    result = parse_assistant_text('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', TOOLS)
    assert result.failure is FailureReason.UNKNOWN_TOOL
    assert result.detail == "call 1: unknown tool 'get_time'; offered: ['calculator', 'get_weather']"


def test_invalid_arguments_name_the_argument():
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    result = parse_assistant_text(text, TOOLS)
    assert result.failure is FailureReason.INVALID_ARGUMENTS
    assert result.detail == "call 1: get_weather: argument $.date: 'date' is a required property [rule: required]"


def test_first_failure_is_reported_and_valid_calls_are_kept():
    bad_args = '<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>'
    unknown = '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
    result = parse_assistant_text("\n".join([PARIS_TEXT, bad_args, unknown, SUM_TEXT]), TOOLS)
    assert result.calls == [PARIS, SUM]
    assert result.failure is FailureReason.INVALID_ARGUMENTS
    assert result.detail.startswith("call 2: calculator: argument $.expr")


def test_decode_keeps_the_calls_the_parser_rejects():
    bad_args = '<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>'
    unknown = '<tool_call>{"name": "nope", "arguments": "{}"}</tool_call>'
    text = "Let me see.\n" + "\n".join([PARIS_TEXT, bad_args, unknown, SUM_TEXT])
    assert decode_tool_calls(text) == ([PARIS, ToolCall("calculator", {"expr": "1"}), ToolCall("nope", {}), SUM], "")


def test_decode_reports_the_first_malformed_call_as_the_parser_does():
    not_a_call = '<tool_call>["calculator"]</tool_call>'
    bad_string = '<tool_call>{"name": "calculator", "arguments": "{"}</tool_call>'
    text = "\n".join([PARIS_TEXT, not_a_call, bad_string, SUM_TEXT])
    assert decode_tool_calls(text) == ([PARIS, SUM], 'call 2: malformed JSON: expected an object with a string "name"')
    assert parse_assistant_text(text, TOOLS).detail == decode_tool_calls(text)[1]
    for text in ("", "The answer is 14.", None):
        assert decode_tool_calls(text) == ([], "")


def check_invariants(text: str, result: ParseResult) -> None:
    assert isinstance(result, ParseResult)
    assert isinstance(result.content, str)
    if result.failure is not None:
        assert result.detail
    by_name = {t["function"]["name"]: t for t in TOOLS}
    for call in result.calls:
        assert validate_arguments(by_name[call.name], call.arguments) == []
    if "<tool_call>" not in text:
        assert result.calls == []
    # The unchecked decode of the same text: a superset of the parser's calls, in the same order.
    decoded, malformed = decode_tool_calls(text)
    remaining = iter(decoded)
    assert all(call in remaining for call in result.calls)
    if result.failure is None:
        assert (decoded, malformed) == (result.calls, "")
    if result.failure is FailureReason.MALFORMED_JSON:
        assert malformed == result.detail


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
weather_arguments = st.fixed_dictionaries({"city": st.text(), "date": st.text()})
call_like = st.fixed_dictionaries(
    {"name": st.sampled_from(["get_weather", "calculator", "nope"]), "arguments": json_values}
) | st.fixed_dictionaries({"name": st.just("get_weather"), "arguments": weather_arguments})
fragments = st.sampled_from(["<tool_call>", "</tool_call>", "\n", "{", "}", '"name"', ":", '"arguments"', ",", " "])


@FUZZ
@given(st.text())
def test_fuzz_random_text(text):
    check_invariants(text, parse_assistant_text(text, TOOLS))


@FUZZ
@given(st.lists(fragments | st.text(max_size=5), max_size=30).map("".join))
def test_fuzz_tag_fragments(text):
    check_invariants(text, parse_assistant_text(text, TOOLS))


@FUZZ
@given(st.lists(call_like | json_values, min_size=1, max_size=3), st.booleans())
def test_fuzz_random_json_inside_tags(payloads, close_last):
    text = "\n".join(f"<tool_call>\n{json.dumps(p, ensure_ascii=False)}\n</tool_call>" for p in payloads)
    if not close_last:
        text = text.removesuffix("\n</tool_call>")
    result = parse_assistant_text(text, TOOLS)
    check_invariants(text, result)
    assert len(result.calls) + (result.failure is not None) <= len(payloads)
    if result.failure is None:
        assert len(result.calls) == len(payloads)


@FUZZ
@given(st.lists(st.text(), min_size=1, max_size=3))
def test_fuzz_format_then_parse_is_identity(expressions):
    calls = [ToolCall("calculator", {"expression": e}) for e in expressions]
    assert parse_assistant_text(format_tool_calls(calls), TOOLS) == ParseResult(calls=calls)
