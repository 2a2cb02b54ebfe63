"""Loading users' data: each format converts to the same OpenAI conversation; bad rows are named."""

from __future__ import annotations

import json
import logging

import pytest

from tooltune.data import DataError, RowError, convert_row, load_conversations, validate_conversation

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


GOOD_MESSAGES = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [call("c1", "get_weather", '{"city": "Paris"}')]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "assistant", "content": "Sunny."},
]
EXPECTED = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call("c1", "get_weather", {"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny", "name": "get_weather"},
        {"role": "assistant", "content": "Sunny."},
    ],
    "tools": [WEATHER],
}


def with_messages(**changes):
    messages = [dict(m) for m in GOOD_MESSAGES]
    for index, message in changes.items():
        messages[int(index[1:])] = message
    return {"messages": messages, "tools": [WEATHER]}


def test_openai_row_is_normalized():
    assert convert_row({"messages": GOOD_MESSAGES, "tools": [WEATHER]}) == EXPECTED
    # Nested fields may be JSON strings (the Parquet-friendly form).
    assert convert_row({"messages": json.dumps(GOOD_MESSAGES), "tools": json.dumps([WEATHER])}) == EXPECTED


def test_jsonl_bad_rows_are_named_by_line(tmp_path, caplog):
    lines = [
        json.dumps({"messages": GOOD_MESSAGES, "tools": [WEATHER]}),
        "",
        '{"messages": [',
        json.dumps(
            with_messages(m1={"role": "assistant", "content": "", "tool_calls": [call("c1", "get_time", "{}")]})
        ),
        json.dumps(with_messages(m2={"role": "tool", "tool_call_id": "zz", "content": "sunny"})),
        json.dumps({"messages": GOOD_MESSAGES[:3], "tools": [WEATHER]}),
        json.dumps({"messages": GOOD_MESSAGES[:2] + GOOD_MESSAGES[3:], "tools": [WEATHER]}),
        json.dumps({"messages": [GOOD_MESSAGES[3]], "tools": []}),
        json.dumps(
            with_messages(
                m1={"role": "assistant", "content": "", "tool_calls": [call("c1", "get_weather", '{"town": "Paris"}')]}
            )
        ),
        json.dumps({"text": "hello"}),
        json.dumps({"messages": GOOD_MESSAGES, "tools": [WEATHER]}),
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="tooltune.data"):
        result = load_conversations(path)
    assert result.conversations == [EXPECTED, EXPECTED]
    f = str(path)
    assert [str(e) for e in result.errors] == [
        f"{f}:3: invalid JSON: Expecting value (column 15)",
        f"{f}:4: message 2: call to 'get_time', which is not among the tools ['get_weather']",
        f"{f}:5: message 3: tool_call_id 'zz' answers no pending call ['c1']",
        f"{f}:6: the conversation ends with a 'tool' message, not an assistant reply",
        f"{f}:7: message 3: calls ['c1'] have no tool result before this 'assistant' message",
        f"{f}:8: message 1: role 'assistant' cannot come first (expected one of ['system', 'user'])",
        f"{f}:9: message 2: get_weather: argument $.city: 'city' is a required property [rule: required]",
        f"{f}:10: unknown row format with keys ['text']: expected messages, conversations, query+answers or chat",
    ]
    assert result.errors[0] == RowError(f, 3, "invalid JSON: Expecting value (column 15)")
    assert "skipped 8 of 10 rows" in caplog.text and f"{f}:4: message 2" in caplog.text
    with pytest.raises(DataError) as e:
        load_conversations(path, on_error="fail")
    assert str(e.value) == f"{f}:3: invalid JSON: Expecting value (column 15)"


def test_tool_message_without_id_answers_the_pending_call():
    row = with_messages(m2={"role": "tool", "content": "sunny"})
    assert convert_row(row) == EXPECTED


def test_bare_function_tools_are_wrapped_and_checked():
    bare = WEATHER["function"]
    assert validate_conversation(GOOD_MESSAGES, [bare])["tools"] == [WEATHER]
    with pytest.raises(ValueError, match="defined twice"):
        validate_conversation(GOOD_MESSAGES, [bare, WEATHER])


HERMES_ROW = {
    "id": "h1",
    "conversations": [
        {
            "from": "system",
            "value": "You are a function calling AI model. You are provided with function signatures within "
            "<tools> </tools> XML tags. You may call one or more functions.\n<tools>\n"
            "[{'type': 'function', 'function': {'name': 'get_weather', 'description': 'Current weather for a city', "
            "'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}, 'required': ['city']}}}]\n"
            "</tools>\nFor each function call return a json object within <tool_call> </tool_call> tags:\n"
            "<tool_call>\n{'arguments': <args-dict>, 'name': <function-name>}\n</tool_call>\n",
        },
        {"from": "human", "value": "Weather in Paris and Oslo?"},
        {
            "from": "gpt",
            "value": "<tool_call>\n{'arguments': {'city': 'Paris'}, 'name': 'get_weather'}\n</tool_call>\n"
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
        },
        {
            "from": "tool",
            "value": '<tool_response>\n{"name": "get_weather", "content": "sunny"}\n</tool_response>\n'
            '<tool_response>\n{"name": "get_weather", "content": "snow"}\n</tool_response>',
        },
        {"from": "gpt", "value": "Paris is sunny, Oslo has snow."},
    ],
}


def test_hermes_sharegpt():
    conv = convert_row(HERMES_ROW)
    assert conv["tools"] == [WEATHER]
    assert conv["messages"] == [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                call("call_0", "get_weather", {"city": "Paris"}),
                call("call_1", "get_weather", {"city": "Oslo"}),
            ],
        },
        {
            "role": "tool",
            "content": '{"name": "get_weather", "content": "sunny"}',
            "tool_call_id": "call_0",
            "name": "get_weather",
        },
        {
            "role": "tool",
            "content": '{"name": "get_weather", "content": "snow"}',
            "tool_call_id": "call_1",
            "name": "get_weather",
        },
        {"role": "assistant", "content": "Paris is sunny, Oslo has snow."},
    ]


def test_llamafactory_sharegpt_with_tools_column():
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "Sunny."},
        ],
        "tools": json.dumps([WEATHER["function"]]),
    }
    conv = convert_row(row)
    assert conv["messages"][1]["tool_calls"] == [call("call_0", "get_weather", {"city": "Paris"})]
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "tool", "assistant"]


XLAM_ROW = {
    "id": 7,
    "query": "Where can I find live giveaways for beta access and games?",
    "answers": '[{"name": "live_giveaways_by_type", "arguments": {"type": "beta"}}, '
    '{"name": "live_giveaways_by_type", "arguments": {"type": "game"}}]',
    "tools": '[{"name": "live_giveaways_by_type", "description": "Retrieve live giveaways from the GamerPower API.", '
    '"parameters": {"type": {"description": "The type of giveaways to retrieve (e.g., game, loot, beta).", '
    '"type": "str", "default": "game"}, "limit": {"description": "How many.", "type": "int, optional"}, '
    '"platform": {"description": "Platform.", "type": "str"}}}]',
}


def test_xlam():
    conv = convert_row(
        {
            **XLAM_ROW,
            "answers": XLAM_ROW["answers"]
            .replace('{"type": "beta"}', '{"type": "beta", "platform": "pc"}')
            .replace('{"type": "game"}', '{"type": "game", "platform": "pc"}'),
        }
    )
    assert conv["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "live_giveaways_by_type",
                "description": "Retrieve live giveaways from the GamerPower API.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "type": {
                            "type": "string",
                            "description": "The type of giveaways to retrieve (e.g., game, loot, beta).",
                            "default": "game",
                        },
                        "limit": {"type": "integer", "description": "How many."},
                        "platform": {"type": "string", "description": "Platform."},
                    },
                    "required": ["platform"],
                },
            },
        }
    ]
    assert conv["messages"] == [
        {"role": "user", "content": XLAM_ROW["query"]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                call("call_0", "live_giveaways_by_type", {"type": "beta", "platform": "pc"}),
                call("call_1", "live_giveaways_by_type", {"type": "game", "platform": "pc"}),
            ],
        },
    ]
    # The untouched row lacks the required 'platform': the schema check names it.
    with pytest.raises(ValueError, match="'platform' is a required property"):
        convert_row(XLAM_ROW)


GLAIVE_ROW = {
    "system": "SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n"
    '{\n    "name": "get_weather",\n    "description": "Current weather for a city",\n    "parameters": {\n'
    '        "type": "object",\n        "properties": {\n            "city": {\n                "type": "string"\n'
    '            }\n        },\n        "required": [\n            "city"\n        ]\n    }\n}\n',
    "chat": "USER: Weather in Paris? \n\n\nASSISTANT: <functioncall> "
    '{"name": "get_weather", "arguments": \'{"city": "Paris"}\'} <|endoftext|>\n\n\n'
    'FUNCTION RESPONSE: {"weather": "sunny"}\n\n\nASSISTANT: It is sunny in Paris. <|endoftext|>\n\n\n'
    "USER: Thanks!\n\n\nASSISTANT: You're welcome! <|endoftext|>\n",
}


def test_glaive():
    conv = convert_row(GLAIVE_ROW)
    assert conv["tools"] == [WEATHER]
    assert conv["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call("call_0", "get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": '{"weather": "sunny"}', "tool_call_id": "call_0", "name": "get_weather"},
        {"role": "assistant", "content": "It is sunny in Paris."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome!"},
    ]


def test_glaive_without_functions_keeps_its_system_text():
    row = {
        "system": "SYSTEM: You are a helpful assistant, with no access to external functions.",
        "chat": "USER: Hi\n\n\nASSISTANT: Hello! <|endoftext|>",
    }
    assert convert_row(row)["messages"] == [
        {"role": "system", "content": "You are a helpful assistant, with no access to external functions."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]


def test_explicit_format_reports_missing_fields():
    with pytest.raises(ValueError, match="malformed xlam row: KeyError"):
        convert_row({"query": "q"}, fmt="xlam")


def test_parquet_json_array_and_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": json.dumps(GOOD_MESSAGES), "tools": json.dumps([WEATHER])}, {"messages": "[]", "tools": "[]"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    (tmp_path / "b.json").write_text(json.dumps([HERMES_ROW, GLAIVE_ROW], indent=2))
    (tmp_path / "notes.txt").write_text("ignored")
    result = load_conversations(tmp_path)
    assert len(result.conversations) == 3 and result.conversations[0] == EXPECTED
    assert [str(e) for e in result.errors] == [f"{tmp_path / 'a.parquet'}:2: no messages"]


def test_saved_hf_dataset(tmp_path):
    import datasets

    rows = [
        {
            "query": XLAM_ROW["query"],
            "tools": XLAM_ROW["tools"].replace('"type": "str"}', '"type": "str, optional"}'),
            "answers": XLAM_ROW["answers"],
        }
    ]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    result = load_conversations(tmp_path / "ds", fmt="xlam")
    assert result.errors == [] and len(result.conversations) == 1


def test_unreadable_inputs_raise(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_conversations(tmp_path / "x.csv")
    (tmp_path / "broken.json").write_text('[{"messages": ]')
    with pytest.raises(DataError, match="broken.json:1: the JSON array is malformed"):
        load_conversations(tmp_path / "broken.json")
