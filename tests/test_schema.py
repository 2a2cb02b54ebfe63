"""Tool definitions and argument checks: each message names the tool, the argument and the rule."""

import copy

import pytest

from tooltune.schema import ToolSchemaError, tools_by_name, validate_arguments, validate_tool_definition

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather forecast for a city on a given date.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "date": {"type": "string", "format": "date"},
                "unit": {"type": "string", "enum": ["C", "F"]},
            },
            "required": ["city", "date"],
            "additionalProperties": False,
        },
    },
}


def broken(path: str, value):
    tool = copy.deepcopy(WEATHER)
    *parents, last = path.split(".")
    node = tool
    for key in parents:
        node = node[key]
    node[last] = value
    return tool


def test_valid_definition_passes():
    validate_tool_definition(WEATHER)


@pytest.mark.parametrize(
    ("tool", "rule"),
    [
        (broken("type", "tool"), "'type' must be 'function'"),
        (broken("function.name", "get weather!"), "'name' must match"),
        (broken("function.description", "  "), "'description' must be a non-empty string"),
        (broken("function.parameters", {"type": "array"}), "'parameters' must be a JSON Schema with type 'object'"),
        (broken("function.parameters.properties.city", {"type": "strng"}), "not a valid JSON Schema at properties"),
        (broken("function.parameters.required", ["city", "country"]), "not in 'properties': ['country']"),
    ],
)
def test_broken_definition_names_tool_and_rule(tool, rule):
    with pytest.raises(ToolSchemaError) as error:
        validate_tool_definition(tool)
    assert rule in str(error.value)
    assert str(error.value).startswith("tool '")


def test_valid_arguments_have_no_errors():
    assert validate_arguments(WEATHER, {"city": "Paris", "date": "2026-03-14"}) == []
    assert validate_arguments(WEATHER, {"city": "Paris", "date": "2026-03-14", "unit": "C"}) == []


def test_missing_arguments_are_named_by_path():
    assert validate_arguments(WEATHER, {}) == [
        "get_weather: argument $.city: 'city' is a required property [rule: required]",
        "get_weather: argument $.date: 'date' is a required property [rule: required]",
    ]


def test_wrong_type_enum_format_and_extra_argument():
    errors = validate_arguments(WEATHER, {"city": 3, "date": "14/03/2026", "unit": "K", "country": "FR"})
    assert errors == [
        "get_weather: argument $.country: Additional properties are not allowed ('country' was unexpected)"
        " [rule: additionalProperties]",
        "get_weather: argument $.city: 3 is not of type 'string' [rule: type]",
        "get_weather: argument $.date: '14/03/2026' is not a 'date' [rule: format]",
        "get_weather: argument $.unit: 'K' is not one of ['C', 'F'] [rule: enum]",
    ]


def test_arguments_that_are_not_an_object():
    assert validate_arguments(WEATHER, ["Paris"]) == [
        "get_weather: argument $: arguments must be a JSON object, got list [rule: type]"
    ]


def test_tools_by_name_indexes_and_rejects_duplicates():
    assert tools_by_name([WEATHER]) == {"get_weather": WEATHER}
    with pytest.raises(ToolSchemaError, match="'get_weather': defined twice"):
        tools_by_name([WEATHER, WEATHER])
