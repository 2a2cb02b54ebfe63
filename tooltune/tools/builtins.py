"""Deterministic simulated tools: the tool world's ground truth and the rollouts' executor agree.

Nothing here touches the network or the clock. Values that would be live (weather, stock
prices) come from a hash of the arguments, so the same call always returns the same result.
``UNSEEN_TOOLS`` are kept out of training and validation: the test split measures whether a
model can call a tool it only knows from its schema.
"""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import math
import operator
import re
from typing import Any, Literal

from tooltune.tools import ToolRegistry

UNSEEN_TOOLS = frozenset({"get_stock_price", "translate_word", "timezone_convert"})

MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 1e100
MAX_EXPONENT = 1000
# Bits of an integer power computed before the magnitude check: keeps `9**999` from costing time.
_MAX_POWER_BITS = 400

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}

Unit = Literal[
    "meters", "kilometers", "centimeters", "millimeters", "miles", "feet", "inches",
    "kilograms", "grams", "pounds", "ounces",
    "celsius", "fahrenheit", "kelvin",
]  # fmt: skip
# Factor to the base unit of each dimension (meters, kilograms); temperature is affine, handled apart.
UNIT_FACTORS: dict[str, tuple[str, float]] = {
    "meters": ("length", 1.0),
    "kilometers": ("length", 1000.0),
    "centimeters": ("length", 0.01),
    "millimeters": ("length", 0.001),
    "miles": ("length", 1609.344),
    "feet": ("length", 0.3048),
    "inches": ("length", 0.0254),
    "kilograms": ("mass", 1.0),
    "grams": ("mass", 0.001),
    "pounds": ("mass", 0.45359237),
    "ounces": ("mass", 0.028349523125),
}
TEMPERATURE_UNITS = ("celsius", "fahrenheit", "kelvin")

Currency = Literal["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "INR", "CNY"]
# Units of each currency per US dollar: a fixed table, so answers never drift.
USD_RATES = {
    "USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.0, "CHF": 0.88, "CAD": 1.36, "AUD": 1.52, "INR": 83.0, "CNY": 7.2,
}  # fmt: skip

Attribute = Literal["capital", "population", "currency", "continent", "language"]
FACTS: dict[str, dict[str, Any]] = {
    name: dict(zip(("capital", "population", "currency", "continent", "language"), row))
    for name, row in {
        "France": ("Paris", 68170000, "Euro", "Europe", "French"),
        "Germany": ("Berlin", 84480000, "Euro", "Europe", "German"),
        "Italy": ("Rome", 58850000, "Euro", "Europe", "Italian"),
        "Spain": ("Madrid", 48370000, "Euro", "Europe", "Spanish"),
        "Norway": ("Oslo", 5520000, "Norwegian krone", "Europe", "Norwegian"),
        "Poland": ("Warsaw", 36690000, "Polish zloty", "Europe", "Polish"),
        "Japan": ("Tokyo", 124500000, "Japanese yen", "Asia", "Japanese"),
        "India": ("New Delhi", 1428600000, "Indian rupee", "Asia", "Hindi"),
        "South Korea": ("Seoul", 51710000, "South Korean won", "Asia", "Korean"),
        "Thailand": ("Bangkok", 71800000, "Thai baht", "Asia", "Thai"),
        "Brazil": ("Brasilia", 216400000, "Brazilian real", "South America", "Portuguese"),
        "Argentina": ("Buenos Aires", 46650000, "Argentine peso", "South America", "Spanish"),
        "Peru": ("Lima", 34350000, "Peruvian sol", "South America", "Spanish"),
        "Canada": ("Ottawa", 40100000, "Canadian dollar", "North America", "English"),
        "Mexico": ("Mexico City", 128500000, "Mexican peso", "North America", "Spanish"),
        "Egypt": ("Cairo", 112700000, "Egyptian pound", "Africa", "Arabic"),
        "Kenya": ("Nairobi", 55100000, "Kenyan shilling", "Africa", "Swahili"),
        "Nigeria": ("Abuja", 223800000, "Nigerian naira", "Africa", "English"),
        "Australia": ("Canberra", 26640000, "Australian dollar", "Oceania", "English"),
        "New Zealand": ("Wellington", 5220000, "New Zealand dollar", "Oceania", "English"),
    }.items()
}

WEATHER_CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "stormy")

Language = Literal["Spanish", "French", "German", "Italian"]
TRANSLATIONS: dict[str, tuple[str, str, str, str]] = {
    "water": ("agua", "eau", "Wasser", "acqua"),
    "house": ("casa", "maison", "Haus", "casa"),
    "cat": ("gato", "chat", "Katze", "gatto"),
    "dog": ("perro", "chien", "Hund", "cane"),
    "book": ("libro", "livre", "Buch", "libro"),
    "friend": ("amigo", "ami", "Freund", "amico"),
    "sun": ("sol", "soleil", "Sonne", "sole"),
    "moon": ("luna", "lune", "Mond", "luna"),
    "bread": ("pan", "pain", "Brot", "pane"),
    "apple": ("manzana", "pomme", "Apfel", "mela"),
    "tree": ("árbol", "arbre", "Baum", "albero"),
    "city": ("ciudad", "ville", "Stadt", "città"),
    "school": ("escuela", "école", "Schule", "scuola"),
    "milk": ("leche", "lait", "Milch", "latte"),
    "fish": ("pez", "poisson", "Fisch", "pesce"),
    "flower": ("flor", "fleur", "Blume", "fiore"),
    "night": ("noche", "nuit", "Nacht", "notte"),
    "day": ("día", "jour", "Tag", "giorno"),
}
_LANGUAGES = ("Spanish", "French", "German", "Italian")

TimeZone = Literal["UTC", "CET", "EET", "IST", "JST", "AEST", "EST", "CST", "MST", "PST"]
# Fixed offsets in minutes (no daylight saving): a simulation must not depend on the date.
TZ_OFFSETS = {
    "UTC": 0, "CET": 60, "EET": 120, "IST": 330, "JST": 540, "AEST": 600,
    "EST": -300, "CST": -360, "MST": -420, "PST": -480,
}  # fmt: skip


def calculator(expression: str) -> dict[str, int | float]:
    """Evaluate an arithmetic expression with + - * / // % ** and parentheses.

    Args:
        expression: The expression to evaluate, for example "(12 + 3) * 4".
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from e
    return {"result": _tidy(_evaluate(tree.body))}


def get_weather(city: str, date: str) -> dict[str, Any]:
    """Get the weather forecast for a city on a given date.

    Args:
        city: City name, for example "Paris".
        date: Day in ISO format YYYY-MM-DD.
    """
    day = _parse_date(date)
    if not city.strip():
        raise ValueError("city must not be empty")
    digest = _digest("weather", city.strip().lower(), day.isoformat())
    return {
        "city": city,
        "date": day.isoformat(),
        "temperature_c": digest % 46 - 10,
        "condition": WEATHER_CONDITIONS[(digest >> 8) % len(WEATHER_CONDITIONS)],
    }


def convert_units(value: float, from_unit: Unit, to_unit: Unit) -> dict[str, Any]:
    """Convert a length, mass or temperature value from one unit to another.

    Args:
        value: The amount to convert.
        from_unit: The unit of the value.
        to_unit: The unit to convert to.
    """
    if from_unit in TEMPERATURE_UNITS or to_unit in TEMPERATURE_UNITS:
        if from_unit not in TEMPERATURE_UNITS or to_unit not in TEMPERATURE_UNITS:
            raise ValueError(f"cannot convert {from_unit} to {to_unit}")
        celsius = {"celsius": value, "fahrenheit": (value - 32) * 5 / 9, "kelvin": value - 273.15}[from_unit]
        converted = {"celsius": celsius, "fahrenheit": celsius * 9 / 5 + 32, "kelvin": celsius + 273.15}[to_unit]
    else:
        (from_kind, from_factor), (to_kind, to_factor) = UNIT_FACTORS[from_unit], UNIT_FACTORS[to_unit]
        if from_kind != to_kind:
            raise ValueError(f"cannot convert {from_kind} ({from_unit}) to {to_kind} ({to_unit})")
        converted = value * from_factor / to_factor
    return {"value": _tidy(round(converted, 2)), "unit": to_unit}


def convert_currency(amount: float, from_currency: Currency, to_currency: Currency) -> dict[str, Any]:
    """Convert an amount of money between currencies at a fixed exchange rate.

    Args:
        amount: The amount of money to convert.
        from_currency: ISO code of the currency the amount is in.
        to_currency: ISO code of the currency to convert to.
    """
    converted = amount / USD_RATES[from_currency] * USD_RATES[to_currency]
    return {"amount": _tidy(round(converted, 2)), "currency": to_currency}


def date_add(date: str, days: int) -> dict[str, str]:
    """Add a number of days to a date (negative to go back).

    Args:
        date: Start day in ISO format YYYY-MM-DD.
        days: How many days to add.
    """
    if abs(days) > 100_000:
        raise ValueError("days must be between -100000 and 100000")
    return {"date": (_parse_date(date) + dt.timedelta(days=days)).isoformat()}


def days_between(start: str, end: str) -> dict[str, int]:
    """Count the days from one date to another.

    Args:
        start: First day in ISO format YYYY-MM-DD.
        end: Last day in ISO format YYYY-MM-DD.
    """
    return {"days": (_parse_date(end) - _parse_date(start)).days}


def lookup_fact(entity: str, attribute: Attribute) -> dict[str, Any]:
    """Look up a fact about a country: its capital, population, currency, continent or language.

    Args:
        entity: The country name, for example "France".
        attribute: Which fact to return.
    """
    key = next((name for name in FACTS if name.lower() == entity.strip().lower()), None)
    if key is None:
        raise ValueError(f"no facts about {entity!r}")
    return {"entity": key, "attribute": attribute, "value": FACTS[key][attribute]}


def get_stock_price(symbol: str) -> dict[str, Any]:
    """Get the latest stock price of a company by its ticker symbol.

    Args:
        symbol: Ticker symbol of 1 to 5 capital letters, for example "ACME".
    """
    if not re.fullmatch(r"[A-Z]{1,5}", symbol):
        raise ValueError(f"not a ticker symbol: {symbol!r}")
    return {"symbol": symbol, "price_usd": (_digest("stock", symbol) % 49000 + 1000) / 100}


def translate_word(word: str, target_language: Language) -> dict[str, str]:
    """Translate a single English word into another language.

    Args:
        word: The English word, for example "water".
        target_language: The language to translate into.
    """
    row = TRANSLATIONS.get(word.strip().lower())
    if row is None:
        raise ValueError(f"no translation for {word!r}")
    return {"word": word, "language": target_language, "translation": row[_LANGUAGES.index(target_language)]}


def timezone_convert(time: str, from_tz: TimeZone, to_tz: TimeZone) -> dict[str, Any]:
    """Convert a clock time from one time zone to another.

    Args:
        time: Time of day as HH:MM (24-hour clock).
        from_tz: The time zone of the given time.
        to_tz: The time zone to convert to.
    """
    match = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", time)
    if match is None:
        raise ValueError(f"time must be HH:MM on a 24-hour clock, got {time!r}")
    minutes = int(match.group(1)) * 60 + int(match.group(2)) - TZ_OFFSETS[from_tz] + TZ_OFFSETS[to_tz]
    day_shift, minutes = divmod(minutes, 24 * 60)
    return {"time": f"{minutes // 60:02d}:{minutes % 60:02d}", "timezone": to_tz, "day_shift": day_shift}


def builtin_registry() -> ToolRegistry:
    """A fresh registry of every built-in tool, the ``UNSEEN_TOOLS`` included."""
    registry = ToolRegistry()
    for fn in (
        calculator, get_weather, convert_units, convert_currency, date_add, days_between, lookup_fact,
        get_stock_price, translate_word, timezone_convert,
    ):  # fmt: skip
        registry.register(fn)
    return registry


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("result too large") from None
        if isinstance(value, complex):
            raise ValueError("the result is not a real number")
        return _bounded(value)
    raise ValueError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")


def _check_power(base: int | float, exponent: int | float) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"exponent larger than {MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1:
        if abs(base).bit_length() * exponent > _MAX_POWER_BITS:
            raise ValueError("result too large")


def _bounded(value: int | float) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("result too large")
    if abs(value) > MAX_MAGNITUDE:
        raise ValueError(f"result larger than {MAX_MAGNITUDE:g}")
    return value


def _tidy(value: int | float) -> int | float:
    """Drop binary noise (0.1 + 0.2 -> 0.3) and write whole floats as integers (10 / 2 -> 5)."""
    if isinstance(value, int):
        return value
    value = float(f"{value:.12g}")
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _parse_date(text: str) -> dt.date:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise ValueError(f"date must be ISO YYYY-MM-DD, got {text!r}")
    return dt.date.fromisoformat(text)


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest()[:8], "big")
