"""Schemas from signatures, the executor's error handling, and the built-in tools on hand-computed values."""

import json
import threading
import time
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tooltune.episode import ToolCall
from tooltune.schema import validate_tool_definition
from tooltune.tools import ToolRegistry, ToolResult, function_schema
from tooltune.tools.builtins import UNSEEN_TOOLS, builtin_registry, calculator

REGISTRY = builtin_registry()
FUZZ = settings(max_examples=150, deadline=1000, database=None, suppress_health_check=[HealthCheck.too_slow])


def book_flight(origin: str, seats: int, cabin: Literal["economy", "business"] = "economy",
                stops: list[str] | None = None, flexible: bool = False) -> dict:  # fmt: skip
    """Book a flight from an airport.

    Extra prose that is not the description.

    Args:
        origin: IATA code of the departure
            airport, for example "CDG".
        seats (int): How many seats.
        cabin: Cabin class.
        stops: Airports to stop at.

    Returns:
        The booking.
    """
    return {"origin": origin, "seats": seats}


def test_schema_from_signature_and_docstring():
    assert function_schema(book_flight) == {
        "type": "function",
        "function": {
            "name": "book_flight",
            "description": "Book a flight from an airport.",
            "parameters": {
                "type": "object",
                "properties": {
                    "origin": {
                        "type": "string",
                        "description": 'IATA code of the departure airport, for example "CDG".',
                    },
                    "seats": {"type": "integer", "description": "How many seats."},
                    "cabin": {"type": "string", "enum": ["economy", "business"], "description": "Cabin class."},
                    "stops": {"type": "array", "items": {"type": "string"}, "description": "Airports to stop at."},
                    "flexible": {"type": "boolean"},
                },
                "required": ["origin", "seats"],
                "additionalProperties": False,
            },
        },
    }


def test_functions_that_cannot_become_tools():
    def untyped(x):
        """Do a thing."""

    def variadic(*xs: int):
        """Do a thing."""

    def undocumented(x: int):
        pass

    with pytest.raises(TypeError, match="argument 'x' needs a type hint"):
        function_schema(untyped)
    with pytest.raises(TypeError, match="argument 'xs' must be a plain keyword argument"):
        function_schema(variadic)
    with pytest.raises(ValueError, match="'description' must be a non-empty string"):
        function_schema(undocumented)


def test_register_as_decorator_and_schemas_in_order():
    registry = ToolRegistry()
    assert registry.register(book_flight) is book_flight
    with pytest.raises(ValueError, match="already registered"):
        registry.register(book_flight)
    names = ["calculator", "get_weather"]
    assert [s["function"]["name"] for s in REGISTRY.schemas(names)] == names
    assert len(REGISTRY.schemas()) == len(REGISTRY) == 10


def test_execute_returns_json_content():
    result = REGISTRY.execute(ToolCall("calculator", {"expression": "2+3*4"}))
    assert result == ToolResult(content='{"result": 14}')


def test_execute_turns_every_problem_into_an_error_result():
    registry = ToolRegistry()
    release = threading.Event()

    @registry.register
    def fails(x: int) -> int:
        """Always fails."""
        raise ValueError(f"bad {x}")

    @registry.register
    def hangs() -> int:
        """Never returns in time."""
        release.wait(10)
        return 1

    @registry.register
    def returns_a_set() -> set:
        """Returns something JSON cannot hold."""
        return {1}

    assert registry.execute(ToolCall("fails", {"x": 3})).error == "ValueError: bad 3"
    assert registry.execute(ToolCall("fails", {"x": "3"})).error.startswith("invalid arguments: fails: argument $.x")
    assert registry.execute(ToolCall("nope", {})).error == "unknown tool 'nope'"
    assert "not JSON" in registry.execute(ToolCall("returns_a_set", {})).error
    start = time.monotonic()
    hung = registry.execute(ToolCall("hangs", {}), timeout_s=0.2)
    release.set()
    assert time.monotonic() - start < 1.5
    assert hung == ToolResult(content='{"error": "timed out after 0.2 s"}', error="timed out after 0.2 s")


def test_builtin_schemas_are_valid_and_unseen_tools_registered():
    for schema in REGISTRY.schemas():
        validate_tool_definition(schema)
    assert UNSEEN_TOOLS < set(REGISTRY.names())


@pytest.mark.parametrize(
    ("expression", "value"),
    [("2+3*4", 14), ("(1 + 2) * 3", 9), ("7 // 2", 3), ("7 % 3", 1), ("2 ** 10", 1024), ("-3 + +5", 2),
     ("10 / 4", 2.5), ("10 / 2", 5), ("0.1 + 0.2", 0.3), ("2 ** -2", 0.25), ("1.5 * 4", 6)],
)  # fmt: skip
def test_calculator_values(expression, value):
    assert calculator(expression) == {"result": value}
    assert type(calculator(expression)["result"]) is type(value)


@pytest.mark.parametrize(
    ("expression", "error"),
    [("9**9**9", "exponent larger than 1000"), ("2 ** 999", "result too large"),
     ("10 ** 99 * 100", "larger than 1e+100"), ("1e400", "result too large"), ("1 / 0", "division by zero"),
     ("(-8) ** 0.5", "not a real number"), ("__import__('os')", "not Call"), ("x + 1", "not Name"),
     ("(1).real", "not Attribute"), ("'a' * 3", "not Constant"), ("True + 1", "not Constant"), ("1j", "not Constant"),
     ("1 +", "not an arithmetic expression"), ("9" * 201, "longer than")],
)  # fmt: skip
def test_calculator_errors_are_clean(expression, error):
    start = time.monotonic()
    result = REGISTRY.execute(ToolCall("calculator", {"expression": expression}))
    assert time.monotonic() - start < 1.0
    assert error in result.error


arithmetic = st.recursive(
    st.integers(-10**6, 10**6).map(str) | st.floats(0, 1e6).map(repr) | st.sampled_from(["9", "99", "0"]),
    lambda e: st.tuples(e, st.sampled_from(["+", "-", "*", "/", "//", "%", "**"]), e).map(" ".join)
    | e.map(lambda x: f"({x})") | e.map(lambda x: f"-{x}"),
    max_leaves=10,
)


@FUZZ
@given(st.text(max_size=250) | arithmetic)
def test_fuzz_calculator_never_raises_or_hangs(expression):
    start = time.monotonic()
    result = REGISTRY.execute(ToolCall("calculator", {"expression": expression}), timeout_s=2.0)
    assert time.monotonic() - start < 1.0
    if result.error is None:
        value = json.loads(result.content)["result"]
        assert isinstance(value, (int, float)) and abs(value) <= 1e100


def test_weather_is_deterministic_and_plausible():
    first = REGISTRY.execute(ToolCall("get_weather", {"city": "Paris", "date": "2026-03-14"}))
    assert first == REGISTRY.execute(ToolCall("get_weather", {"city": "Paris", "date": "2026-03-14"}))
    weather = json.loads(first.content)
    assert weather["city"] == "Paris" and weather["date"] == "2026-03-14"
    assert -10 <= weather["temperature_c"] <= 35
    assert weather["condition"] in ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "stormy")
    bad_date = ToolCall("get_weather", {"city": "Paris", "date": "14/03/2026"})
    assert "date must be ISO" in REGISTRY.execute(bad_date).error


@pytest.mark.parametrize(
    ("name", "arguments", "expected"),
    [
        ("convert_units", {"value": 5, "from_unit": "kilometers", "to_unit": "miles"},
         {"value": 3.11, "unit": "miles"}),
        ("convert_units", {"value": 100, "from_unit": "celsius", "to_unit": "fahrenheit"},
         {"value": 212, "unit": "fahrenheit"}),
        ("convert_units", {"value": 0, "from_unit": "celsius", "to_unit": "kelvin"},
         {"value": 273.15, "unit": "kelvin"}),
        ("convert_units", {"value": 1, "from_unit": "pounds", "to_unit": "grams"},
         {"value": 453.59, "unit": "grams"}),
        ("convert_currency", {"amount": 100, "from_currency": "USD", "to_currency": "EUR"},
         {"amount": 92, "currency": "EUR"}),
        ("convert_currency", {"amount": 151, "from_currency": "JPY", "to_currency": "USD"},
         {"amount": 1, "currency": "USD"}),
        ("date_add", {"date": "2026-03-14", "days": 20}, {"date": "2026-04-03"}),
        ("date_add", {"date": "2024-02-28", "days": 1}, {"date": "2024-02-29"}),
        ("days_between", {"start": "2026-01-01", "end": "2026-03-01"}, {"days": 59}),
        ("lookup_fact", {"entity": "france", "attribute": "capital"},
         {"entity": "France", "attribute": "capital", "value": "Paris"}),
        ("translate_word", {"word": "water", "target_language": "German"},
         {"word": "water", "language": "German", "translation": "Wasser"}),
        ("timezone_convert", {"time": "23:30", "from_tz": "UTC", "to_tz": "JST"},
         {"time": "08:30", "timezone": "JST", "day_shift": 1}),
        ("timezone_convert", {"time": "01:00", "from_tz": "UTC", "to_tz": "PST"},
         {"time": "17:00", "timezone": "PST", "day_shift": -1}),
    ],
)  # fmt: skip
def test_builtin_values(name, arguments, expected):
    assert json.loads(REGISTRY.execute(ToolCall(name, arguments)).content) == expected


@pytest.mark.parametrize(
    ("name", "arguments", "error"),
    [
        ("convert_units", {"value": 1, "from_unit": "kilograms", "to_unit": "meters"}, "cannot convert mass"),
        ("convert_units", {"value": 1, "from_unit": "kilograms", "to_unit": "kelvin"}, "cannot convert kilograms"),
        ("convert_currency", {"amount": 1, "from_currency": "USD", "to_currency": "XYZ"}, "argument $.to_currency"),
        ("lookup_fact", {"entity": "Atlantis", "attribute": "capital"}, "no facts about 'Atlantis'"),
        ("get_stock_price", {"symbol": "acme"}, "not a ticker symbol"),
        ("translate_word", {"word": "spaceship", "target_language": "French"}, "no translation"),
        ("timezone_convert", {"time": "25:00", "from_tz": "UTC", "to_tz": "CET"}, "HH:MM"),
        ("date_add", {"date": "2026-03-14", "days": 10**9}, "days must be between"),
    ],
)  # fmt: skip
def test_builtin_errors(name, arguments, error):
    assert error in REGISTRY.execute(ToolCall(name, arguments)).error


def test_stock_price_is_deterministic():
    price = json.loads(REGISTRY.execute(ToolCall("get_stock_price", {"symbol": "ACME"})).content)
    assert price == json.loads(REGISTRY.execute(ToolCall("get_stock_price", {"symbol": "ACME"})).content)
    assert 10 <= price["price_usd"] <= 500


def test_add_registers_a_schema_defined_tool_and_checks_it():
    from tooltune.schema import ToolSchemaError
    from tooltune.tools import ToolRegistry

    registry = ToolRegistry()
    params = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    registry.add("double", "Double a number.", params, lambda n: {"value": 2 * n})
    assert registry.execute(ToolCall("double", {"n": 21})).content == '{"value": 42}'
    assert "invalid arguments" in registry.execute(ToolCall("double", {"n": "x"})).error
    with pytest.raises(ValueError, match="already registered"):
        registry.add("double", "Again.", params, lambda n: n)
    with pytest.raises(ToolSchemaError, match="description"):
        registry.add("blank", "", params, lambda n: n)
