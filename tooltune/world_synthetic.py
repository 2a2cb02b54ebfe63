"""Procedurally generated tools: many schemas, so a model learns to read a schema, not a list.

A model fine-tuned on seven tools learns those seven: asked to call a tool it only knows from
its schema, it writes the arguments of the nearest tool it has seen (a ``date`` for a stock
price). Training on a few hundred generated tools (verb + object names, one to three required
arguments drawn from a pool of typed arguments, sometimes an optional one) makes the schema the
only reliable source of argument names, types and enums.

Everything is a pure function of ``(count, seed)``: the same tools, with the same executors, are
rebuilt wherever a world is (SFT data, rollouts), so nothing but the config has to travel.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tooltune.episode import ToolCall
from tooltune.tools import ToolRegistry

VERBS = (
    "get", "find", "search", "check", "create", "update", "cancel", "list", "book", "track",
    "rate", "schedule", "send", "delete", "reserve", "renew", "register", "archive",
)  # fmt: skip
OBJECTS = (
    "order", "flight", "hotel_room", "package", "invoice", "ticket", "recipe", "movie", "song", "meeting",
    "reminder", "account", "playlist", "restaurant", "event", "product", "review", "appointment",
    "car_rental", "parking_spot", "library_book", "gym_class", "support_case", "subscription",
)  # fmt: skip
QUERY_TEMPLATES = (
    "Please {verb} the {obj} {clauses}.",
    "Can you {verb} the {obj} {clauses}?",
    "I need to {verb} the {obj} {clauses}.",
    "{Verb} the {obj} {clauses}, please.",
    "Could you {verb} the {obj} {clauses} for me?",
)


@dataclass(frozen=True)
class Param:
    """One argument kind: its JSON schema, how a value is drawn, how a query says it."""

    name: str
    schema: dict[str, Any]
    draw: Callable[[random.Random], Any]
    clause: str  # "{v}" is the value, written exactly as the call's JSON holds it (strings unquoted)


def _date(rng: random.Random) -> str:
    return (dt.date(2025, 1, 1) + dt.timedelta(days=rng.randrange(3 * 365))).isoformat()


def _pick(*values: Any) -> Callable[[random.Random], Any]:
    return lambda rng: rng.choice(values)


def _string(description: str) -> dict[str, Any]:
    return {"type": "string", "description": description}


def _enum(description: str, values: tuple[str, ...]) -> dict[str, Any]:
    return {"type": "string", "enum": list(values), "description": description}


def _integer(description: str, low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high, "description": description}


_PEOPLE = ("Alice", "Bob", "Carol", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam")
_SIZES, _COLORS = ("small", "medium", "large"), ("red", "blue", "green", "black", "white")
_PRIORITIES, _CLASSES = ("low", "normal", "high"), ("economy", "business", "first")
_CATEGORIES = ("books", "electronics", "clothing", "toys", "garden")
_GENRES = ("jazz", "rock", "pop", "classical", "comedy", "drama")
_LANGUAGES = ("English", "Spanish", "French", "German", "Japanese")

PARAMS: tuple[Param, ...] = (
    Param("order_id", _string('Order number, for example "ORD-1234".'), lambda r: f"ORD-{r.randint(1000, 9999)}", "for order {v}"),
    Param("user_name", _string("Name of the user."), _pick(*_PEOPLE), "for user {v}"),
    Param("email", _string("E-mail address."), lambda r: f"{r.choice(_PEOPLE).lower()}{r.randint(1, 99)}@example.com", "with e-mail {v}"),
    Param("city", _string("City name."), _pick("Paris", "Lima", "Oslo", "Tokyo", "Cairo", "Dublin", "Seoul", "Quito"), "in {v}"),
    Param("date", _string("Day in ISO format YYYY-MM-DD."), _date, "on {v}"),
    Param("start_time", _string("Time of day as HH:MM, 24-hour clock."), lambda r: f"{r.randrange(7, 22):02d}:{r.choice((0, 15, 30, 45)):02d}", "at {v}"),
    Param("quantity", _integer("How many items.", 1, 50), lambda r: r.randint(1, 50), "with quantity {v}"),
    Param("guests", _integer("Number of guests.", 1, 12), lambda r: r.randint(1, 12), "for {v} guests"),
    Param("nights", _integer("Number of nights.", 1, 14), lambda r: r.randint(1, 14), "for {v} nights"),
    Param("rating", _integer("Stars, from 1 to 5.", 1, 5), lambda r: r.randint(1, 5), "with a rating of {v}"),
    Param("limit", _integer("Most results to return.", 1, 50), lambda r: r.randint(1, 50), "with a limit of {v} results"),
    Param("duration_minutes", _integer("Length in minutes.", 5, 240), lambda r: r.choice((15, 30, 45, 60, 90, 120)), "lasting {v} minutes"),
    Param("max_price", {"type": "number", "description": "Highest price in USD."}, lambda r: r.choice((r.randint(5, 900), round(r.uniform(5, 900), 2))), "under {v} USD"),
    Param("size", _enum("Size.", _SIZES), _pick(*_SIZES), "in size {v}"),
    Param("color", _enum("Color.", _COLORS), _pick(*_COLORS), "in {v}"),
    Param("priority", _enum("Priority.", _PRIORITIES), _pick(*_PRIORITIES), "with {v} priority"),
    Param("category", _enum("Product category.", _CATEGORIES), _pick(*_CATEGORIES), "in the {v} category"),
    Param("genre", _enum("Genre.", _GENRES), _pick(*_GENRES), "in the {v} genre"),
    Param("language", _enum("Language of the reply.", _LANGUAGES), _pick(*_LANGUAGES), "in {v}"),
    Param("seat_class", _enum("Travel class.", _CLASSES), _pick(*_CLASSES), "in {v} class"),
    Param("airport", _string('IATA airport code, for example "JFK".'), _pick("JFK", "LHR", "CDG", "HND", "SYD", "GRU", "DXB"), "from airport {v}"),
    Param("tracking_number", _string("Carrier tracking number."), lambda r: f"1Z{r.randint(100000, 999999)}", "with tracking number {v}"),
    Param("account_id", _string('Account identifier, for example "ACC-12345".'), lambda r: f"ACC-{r.randint(10000, 99999)}", "for account {v}"),
    Param("zip_code", _string("Five-digit postal code, as a string."), lambda r: f"{r.randint(1000, 99999):05d}", "near zip code {v}"),
    Param("title", _string("A short title."), _pick("Team sync", "Dentist visit", "Budget review", "Yoga", "Book club"), "titled {v}"),
    Param("product_name", _string("Name of the product."), _pick("desk lamp", "laptop stand", "coffee grinder", "rain jacket", "headphones"), "for the product {v}"),
)  # fmt: skip


@dataclass(frozen=True)
class SyntheticTool:
    name: str
    verb: str
    obj: str
    description: str
    required: tuple[Param, ...]
    optional: tuple[Param, ...]

    @property
    def parameters(self) -> dict[str, Any]:
        params = self.required + self.optional
        return {
            "type": "object",
            "properties": {p.name: dict(p.schema) for p in params},
            "required": [p.name for p in self.required],
            "additionalProperties": False,
        }

    def run(self, **arguments: Any) -> dict[str, Any]:
        """A deterministic reference code for the arguments: the result a final answer must quote."""
        digest = hashlib.sha256(json.dumps([self.name, arguments], sort_keys=True).encode()).hexdigest()
        prefix = "".join(w[0] for w in self.obj.split()).upper().ljust(3, "X")
        return {"status": "ok", "reference": f"{prefix}-{int(digest[:8], 16) % 90000 + 10000}"}


def synthetic_tools(count: int, seed: int = 0) -> list[SyntheticTool]:
    """``count`` distinct tools (at most verbs x objects), the same for the same ``(count, seed)``."""
    pairs = [(v, o) for v in VERBS for o in OBJECTS]
    if count > len(pairs):
        raise ValueError(f"synthetic_tools: at most {len(pairs)} tools can be generated, got {count}")
    rng = random.Random(f"tooltune-synthetic-tools-{seed}")
    tools = []
    for verb, obj in rng.sample(pairs, count):
        params = rng.sample(PARAMS, 4)
        n_required = rng.choice((1, 1, 2, 2, 2, 3))
        n_optional = rng.choice((0, 0, 1))
        words = obj.replace("_", " ")
        tools.append(SyntheticTool(
            name=f"{verb}_{obj}",
            verb=verb,
            obj=words,
            description=f"{verb.capitalize()} {'an' if words[0] in 'aeiou' else 'a'} {words}; returns a reference code.",
            required=tuple(params[:n_required]),
            optional=tuple(params[n_required : n_required + n_optional]),
        ))  # fmt: skip
    return tools


def add_synthetic_tools(registry: ToolRegistry, tools: list[SyntheticTool]) -> ToolRegistry:
    for tool in tools:
        registry.add(tool.name, tool.description, tool.parameters, tool.run)
    return registry


def synthetic_call(rng: random.Random, tool: SyntheticTool) -> tuple[str, ToolCall]:
    """A query asking for ``tool`` and its exact call: every required argument, an optional one half the time."""
    used = list(tool.required) + [p for p in tool.optional if rng.random() < 0.5]
    values = {p.name: p.draw(rng) for p in used}
    clauses = [p.clause.format(v=json.dumps(values[p.name]) if not isinstance(values[p.name], str) else values[p.name]) for p in used]
    rng.shuffle(clauses)
    joined = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
    query = rng.choice(QUERY_TEMPLATES).format(verb=tool.verb, Verb=tool.verb.capitalize(), obj=tool.obj, clauses=joined)
    return query, ToolCall(tool.name, values)
