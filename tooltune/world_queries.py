"""Query generators of the tool world: templates, data tables and one generator per kind of task.

Each generator draws the values of a task, phrases the query from a template (argument values
verbatim), and computes the ground truth by running the built-in tools (``run``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from collections.abc import Callable
from typing import Any, NamedTuple

from tooltune.episode import ToolCall
from tooltune.tools.builtins import (
    FACTS, TEMPERATURE_UNITS, TRANSLATIONS, TZ_OFFSETS, UNIT_FACTORS, USD_RATES,
)  # fmt: skip

ANSWER_TEMPLATE = "The answer is {answer}."
SMALL_TALK_DEFAULT_REPLY = "Happy to chat! How can I help you today?"


class _Draft(NamedTuple):
    query: str
    steps: list[list[ToolCall]]
    answer: str
    bait: tuple[str, ...] = ()  # tools always offered to tempt a wrong call (the calculator for "1+1")


Run = Callable[[ToolCall], dict[str, Any]]
Generator = Callable[[random.Random, Run], _Draft]

CITIES = (
    "Paris", "London", "Tokyo", "New York", "Berlin", "Sydney", "Cairo", "Toronto", "Mumbai", "Madrid",
    "Rome", "Oslo", "Nairobi", "Lima", "Seoul", "Zürich", "Buenos Aires", "Chicago", "Dubai", "Singapore",
    "Istanbul", "Lisbon", "Vienna", "Prague", "Dublin", "Bangkok", "Mexico City", "Cape Town", "Helsinki", "São Paulo",
)  # fmt: skip
SYMBOLS = ("ACME", "GLOBX", "INITK", "UMBRL", "WAYNE", "STARK", "OSCRP", "TYRLL", "CYBDN", "HOOLI", "PIEDP", "VNDLY")
NAMES = (
    "Alice", "Bob", "Carol", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam", "Maya",
    "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wei", "Xenia", "Yusuf", "Zoe",
)  # fmt: skip
GREETINGS = ("Hi", "Hello", "Hey", "Hey there", "Good morning", "Good afternoon", "Good evening", "Greetings")
SMALL_TALK = {
    "How are you today?": "I'm doing well, thank you for asking! How can I help you today?",
    "Thanks for your help earlier.": "You're welcome! Let me know if there is anything else I can do.",
    "What's your name?": "I'm a helpful assistant. What can I do for you?",
    "Tell me a joke.": "Why did the scarecrow win an award? Because he was outstanding in his field!",
    "Nice to meet you.": "Nice to meet you too! How can I help?",
    "I hope you have a great day.": "Thank you, you too! Is there anything I can help with?",
    "I'm bored.": "Let's fix that! I can tell you a joke, or we can chat about anything you like.",
    "Have a good night.": "Thank you, good night! Come back any time.",
}
GENERAL_FACTS = (
    ("How many days are there in a week?", "7"), ("How many legs does a spider have?", "8"),
    ("How many continents are there?", "7"), ("What color is the sky on a clear day?", "blue"),
    ("How many hours are in a day?", "24"), ("How many minutes are in an hour?", "60"),
    ("What is the opposite of hot?", "cold"), ("How many months are in a year?", "12"),
    ("What do bees make?", "honey"), ("What is frozen water called?", "ice"),
    ("How many sides does a triangle have?", "3"), ("How many wheels does a bicycle have?", "2"),
    ("What color are ripe bananas?", "yellow"), ("How many sides does a square have?", "4"),
    ("What is the largest ocean on Earth?", "Pacific"), ("How many planets are in the solar system?", "8"),
    ("How many seconds are in a minute?", "60"), ("What season comes after winter?", "spring"),
    ("How many letters are in the English alphabet?", "26"), ("What is the plural of mouse?", "mice"),
    ("How many strings does a standard guitar have?", "6"), ("What do you get by mixing blue and yellow?", "green"),
    ("Which planet is known as the Red Planet?", "Mars"), ("What does a caterpillar turn into?", "butterfly"),
    ("How many days are in a leap year?", "366"), ("What is the tallest animal in the world?", "giraffe"),
    ("What shape has three sides?", "triangle"), ("What is the opposite of up?", "down"),
    ("How many zeros are in one thousand?", "3"), ("Which animal has black and white stripes?", "zebra"),
)  # fmt: skip
FACT_PREFIXES = ("", "Quick question: ", "Just curious: ", "Simple one: ", "Here is an easy one. ")


# Several phrasings per kind of task; the placeholders hold argument values, copied verbatim.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "calculator": ("What is {e}?", "Calculate {e}.", "Compute {e}, please.", "Can you work out {e}?"),
    "weather": ("What's the weather in {city} on {date}?", "What is the forecast for {city} on {date}?",
                "How warm will it be in {city} on {date}?", "Tell me the weather for {city} on {date}."),
    "units": ("Convert {v} {s} to {d}.", "How many {d} is {v} {s}?", "What is {v} {s} in {d}?"),
    "currency": ("Convert {a} {s} to {d}.", "How much is {a} {s} in {d}?", "I have {a} {s}. How many {d} is that?",
                 "What is {a} {s} worth in {d}?"),
    "date_add": ("What date is {days} days after {date}?", "Add {days} days to {date}.",
                 "If today is {date}, what will the date be in {days} days?"),
    "days_between": ("How many days are there between {start} and {end}?", "Count the days from {start} to {end}.",
                     "How many days is it from {start} until {end}?"),
    "fact": ("Look up the {attribute} of {entity}.", "Check the facts: what is the {attribute} of {entity}?",
             "Find the {attribute} of {entity} for me."),
    "warmer": ("Which is warmer on {date}: {a} or {b}?", "On {date}, will it be warmer in {a} or in {b}?",
               "Compare the weather in {a} and {b} on {date}. Which city is warmer?"),
    "population": ("Which country has the larger population: {a} or {b}?", "Does {a} or {b} have a bigger population?",
                   "Compare the population of {a} and {b}. Which is bigger?"),
    "worth_more": ("Which is worth more in USD: {a1} {c1} or {a2} {c2}?",
                   "Convert {a1} {c1} and {a2} {c2} to USD. Which amount is larger?"),
    "split_money": ("Convert {a} {s} to {d}, then split it equally among {n} people. How much does each person get?",
                    "I have {a} {s} to share between {n} friends. How many {d} does each friend get?"),
    "distance": ("I walk {v} {s} every day. How many {d} is that in {n} days?",
                 "A robot moves {v} {s} per day. In {d}, how far does it go in {n} days?"),
    "weather_later": ("What will the weather be in {c} {n} days after {d}?",
                      "I arrive in {c} {n} days after {d}. What weather should I expect?"),
    "capital_weather": ("What is the weather in the capital of {c} on {d}?",
                        "How warm will the capital of {c} be on {d}?"),
    "stock": ("What is the stock price of {symbol}?", "How much does one share of {symbol} cost?",
              "Get me the latest price for {symbol} stock."),
    "pricier_stock": ("Which stock is more expensive, {a} or {b}?", "Is {a} or {b} trading at a higher price?"),
    "translate": ("How do you say '{word}' in {target_language}?", "Translate '{word}' into {target_language}.",
                  "What is the {target_language} word for '{word}'?"),
    "timezone": ("What time is {time} {from_tz} in {to_tz}?", "Convert {time} from {from_tz} to {to_tz}.",
                 "If it is {time} in {from_tz}, what time is it in {to_tz}?"),
}  # fmt: skip


def _ask(rng: random.Random, kind: str, **values: Any) -> str:
    return rng.choice(TEMPLATES[kind]).format(**values)


def _num(x: float) -> str:
    """A number exactly as the JSON of a call writes it, so the query and the arguments match."""
    return json.dumps(x)


def _date(rng: random.Random) -> str:
    return (dt.date(2025, 1, 1) + dt.timedelta(days=rng.randrange(3 * 365))).isoformat()


def _amount(rng: random.Random, low: int, high: int) -> int | float:
    return rng.randint(low, high) if rng.random() < 0.7 else round(rng.uniform(low, high), rng.choice((1, 2)))


def _units_of(dimension: str) -> list[str]:
    if dimension == "temperature":
        return list(TEMPERATURE_UNITS)
    return [unit for unit, (kind, _) in UNIT_FACTORS.items() if kind == dimension]


def _call(name: str, **arguments: Any) -> ToolCall:
    return ToolCall(name, arguments)


def _calculator(rng: random.Random, run: Run) -> _Draft:
    a, b, c = rng.randint(100, 9999), rng.randint(10, 999), rng.randint(2, 99)
    forms = (f"{a} + {b}", f"{a} - {b}", f"{a} * {b}", f"{a} / {b}", f"({a} + {b}) * {c}", f"{a} * {c} - {b}")
    call = _call("calculator", expression=rng.choice(forms))
    return _Draft(_ask(rng, "calculator", e=call.arguments["expression"]), [[call]], _num(run(call)["result"]))


def _weather(rng: random.Random, run: Run) -> _Draft:
    call = _call("get_weather", city=rng.choice(CITIES), date=_date(rng))
    return _Draft(_ask(rng, "weather", **call.arguments), [[call]], f"{run(call)['temperature_c']}°C")


def _units(rng: random.Random, run: Run) -> _Draft:
    dimension = rng.choice(("length", "mass", "temperature"))
    src, dst = rng.sample(_units_of(dimension), 2)
    value = rng.randint(-40, 120) if dimension == "temperature" else _amount(rng, 1, 500)
    call = _call("convert_units", value=value, from_unit=src, to_unit=dst)
    return _Draft(_ask(rng, "units", v=_num(value), s=src, d=dst), [[call]], f"{_num(run(call)['value'])} {dst}")


def _currency(rng: random.Random, run: Run) -> _Draft:
    src, dst = rng.sample(sorted(USD_RATES), 2)
    amount = _amount(rng, 5, 5000)
    call = _call("convert_currency", amount=amount, from_currency=src, to_currency=dst)
    return _Draft(_ask(rng, "currency", a=_num(amount), s=src, d=dst), [[call]], f"{_num(run(call)['amount'])} {dst}")


def _date_add(rng: random.Random, run: Run) -> _Draft:
    call = _call("date_add", date=_date(rng), days=rng.randint(1, 365))
    return _Draft(_ask(rng, "date_add", **call.arguments), [[call]], run(call)["date"])


def _days_between(rng: random.Random, run: Run) -> _Draft:
    start = _date(rng)
    end = (dt.date.fromisoformat(start) + dt.timedelta(days=rng.randint(1, 400))).isoformat()
    call = _call("days_between", start=start, end=end)
    return _Draft(_ask(rng, "days_between", start=start, end=end), [[call]], f"{run(call)['days']} days")


def _fact(rng: random.Random, run: Run) -> _Draft:
    attribute = rng.choice(("capital", "population", "currency", "continent", "language"))
    call = _call("lookup_fact", entity=rng.choice(sorted(FACTS)), attribute=attribute)
    return _Draft(_ask(rng, "fact", **call.arguments), [[call]], str(run(call)["value"]))


# Parallel tasks compare two results, so one name is the answer. A tie has no right answer:
# such a draft gets an empty query, which `_draw` rejects and draws again.
def _warmer(rng: random.Random, run: Run) -> _Draft:
    date, (a, b) = _date(rng), rng.sample(CITIES, 2)
    calls = [_call("get_weather", city=city, date=date) for city in (a, b)]
    ta, tb = (run(c)["temperature_c"] for c in calls)
    return _Draft(_ask(rng, "warmer", date=date, a=a, b=b) if ta != tb else "", [calls], a if ta > tb else b)


def _bigger_population(rng: random.Random, run: Run) -> _Draft:
    a, b = rng.sample(sorted(FACTS), 2)
    calls = [_call("lookup_fact", entity=country, attribute="population") for country in (a, b)]
    pa, pb = (run(c)["value"] for c in calls)
    return _Draft(_ask(rng, "population", a=a, b=b), [calls], a if pa > pb else b)


def _worth_more(rng: random.Random, run: Run) -> _Draft:
    (c1, c2), a1, a2 = rng.sample(sorted(set(USD_RATES) - {"USD"}), 2), rng.randint(5, 5000), rng.randint(5, 5000)
    calls = [_call("convert_currency", amount=a, from_currency=c, to_currency="USD") for a, c in ((a1, c1), (a2, c2))]
    v1, v2 = (run(c)["amount"] for c in calls)
    query = _ask(rng, "worth_more", a1=a1, c1=c1, a2=a2, c2=c2) if v1 != v2 else ""
    return _Draft(query, [calls], f"{a1} {c1}" if v1 > v2 else f"{a2} {c2}")


def _pricier_stock(rng: random.Random, run: Run) -> _Draft:
    a, b = rng.sample(SYMBOLS, 2)
    calls = [_call("get_stock_price", symbol=symbol) for symbol in (a, b)]
    pa, pb = (run(c)["price_usd"] for c in calls)
    return _Draft(_ask(rng, "pricier_stock", a=a, b=b) if pa != pb else "", [calls], a if pa > pb else b)


# Multi-step tasks: the second call needs a value only the first call's result holds.
def _split_money(rng: random.Random, run: Run) -> _Draft:
    (src, dst), amount, people = rng.sample(sorted(USD_RATES), 2), rng.randint(20, 2000), rng.randint(2, 8)
    first = _call("convert_currency", amount=amount, from_currency=src, to_currency=dst)
    second = _call("calculator", expression=f"{_num(run(first)['amount'])} / {people}")
    query = _ask(rng, "split_money", a=amount, s=src, d=dst, n=people)
    return _Draft(query, [[first], [second]], f"{_num(run(second)['result'])} {dst}")


def _repeated_distance(rng: random.Random, run: Run) -> _Draft:
    (src, dst), value, days = rng.sample(_units_of("length"), 2), _amount(rng, 1, 50), rng.randint(2, 30)
    first = _call("convert_units", value=value, from_unit=src, to_unit=dst)
    second = _call("calculator", expression=f"{_num(run(first)['value'])} * {days}")
    query = _ask(rng, "distance", v=_num(value), s=src, d=dst, n=days)
    return _Draft(query, [[first], [second]], f"{_num(run(second)['result'])} {dst}")


def _weather_later(rng: random.Random, run: Run) -> _Draft:
    city, date, days = rng.choice(CITIES), _date(rng), rng.randint(1, 60)
    first = _call("date_add", date=date, days=days)
    second = _call("get_weather", city=city, date=run(first)["date"])
    query = _ask(rng, "weather_later", c=city, n=days, d=date)
    return _Draft(query, [[first], [second]], f"{run(second)['temperature_c']}°C")


def _capital_weather(rng: random.Random, run: Run) -> _Draft:
    country, date = rng.choice(sorted(FACTS)), _date(rng)
    first = _call("lookup_fact", entity=country, attribute="capital")
    second = _call("get_weather", city=run(first)["value"], date=date)
    query = _ask(rng, "capital_weather", c=country, d=date)
    return _Draft(query, [[first], [second]], f"{run(second)['temperature_c']}°C")


def _stock(rng: random.Random, run: Run) -> _Draft:
    call = _call("get_stock_price", symbol=rng.choice(SYMBOLS))
    return _Draft(_ask(rng, "stock", **call.arguments), [[call]], _num(run(call)["price_usd"]))


def _translate(rng: random.Random, run: Run) -> _Draft:
    language = rng.choice(("Spanish", "French", "German", "Italian"))
    call = _call("translate_word", word=rng.choice(sorted(TRANSLATIONS)), target_language=language)
    return _Draft(_ask(rng, "translate", **call.arguments), [[call]], run(call)["translation"])


def _timezone(rng: random.Random, run: Run) -> _Draft:
    (src, dst), time = rng.sample(sorted(TZ_OFFSETS), 2), f"{rng.randrange(24):02d}:{rng.choice((0, 15, 30, 45)):02d}"
    call = _call("timezone_convert", time=time, from_tz=src, to_tz=dst)
    return _Draft(_ask(rng, "timezone", **call.arguments), [[call]], run(call)["time"])


def _small_talk(rng: random.Random, run: Run) -> _Draft:
    greeting, body = rng.choice(GREETINGS), rng.choice(sorted(SMALL_TALK))
    who = f", I'm {rng.choice(NAMES)}." if rng.random() < 0.8 else "!"
    return _Draft(f"{greeting}{who} {body}", [], "")


# Trivial arithmetic as users ask it, each phrasing with the calculator's operator. The same
# phrasings with large operands need the calculator (``tooltune.world_contrast``).
TRIVIAL_FORMS = (
    ("What is {a}+{b}?", "+"), ("What is {a} + {b}?", "+"), ("What's {a} plus {b}?", "+"),
    ("What is {a}-{b}?", "-"), ("What is {a} minus {b}?", "-"), ("What is {a} times {b}?", "*"),
)  # fmt: skip


def apply_operator(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def heldout_operands(form: str, a: int, b: int) -> bool:
    """Whether a trivial phrasing with these operands belongs to the held-out quarter (a stable
    hash of its content): held-out contrastive pairs draw from it, training data never does
    (``tooltune.world_contrast``)."""
    return int(hashlib.sha256(f"{form}|{a}|{b}".encode()).hexdigest(), 16) % 4 == 0


def large_operands(rng: random.Random) -> tuple[int, int]:
    """Operands that need the calculator: the range of the world's own calculator tasks."""
    return rng.randint(100, 9_999), rng.randint(10, 999)


def _calculator_trivial_phrasing(rng: random.Random, run: Run) -> _Draft:
    """A calculator task asked in a trivial no-tool phrasing, with large operands (never the
    held-out quarter's): the phrasing alone does not decide the call."""
    form, op = rng.choice(TRIVIAL_FORMS)
    a, b = large_operands(rng)
    while heldout_operands(form, a, b):
        a, b = large_operands(rng)
    call = _call("calculator", expression=f"{a} {op} {b}")
    return _Draft(form.format(a=a, b=b), [[call]], _num(run(call)["result"]))


def _trivial_math(rng: random.Random, run: Run) -> _Draft:
    a, b = sorted((rng.randint(0, 12), rng.randint(0, 12)), reverse=True)
    form, op = rng.choice(TRIVIAL_FORMS)
    return _Draft(form.format(a=a, b=b), [], str(apply_operator(op, a, b)), bait=("calculator",))


def _general_fact(rng: random.Random, run: Run) -> _Draft:
    question, answer = rng.choice(GENERAL_FACTS)
    return _Draft(rng.choice(FACT_PREFIXES) + question, [], answer)


# The no-tool generators' names, in GENERATORS["no_tool"]'s order.
NO_TOOL_KINDS = ("small_talk", "trivial_math", "general_fact")
GENERATORS: dict[str, tuple[Generator, ...]] = {
    "single": (_calculator, _weather, _units, _currency, _date_add, _days_between, _fact),
    "parallel": (_warmer, _bigger_population, _worth_more),
    "multi_step": (_split_money, _repeated_distance, _weather_later, _capital_weather),
    "unseen": (_stock, _pricier_stock, _translate, _timezone),
    "no_tool": (_small_talk, _trivial_math, _general_fact),
}
