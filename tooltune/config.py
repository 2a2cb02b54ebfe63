"""The one config loader: a YAML file, then dotted ``key=value`` overrides, then pydantic validation.

Every config class subclasses ``StrictModel``, so an unknown key or a wrong type is an error that
names the key. Every failure is a ``ConfigError`` whose message is one line naming the file (or the
override source) and the key; jobs print it and exit 2.

    cfg = load_config("configs/tiny/sft.yaml", SFTConfig, ["trainer.lr=1e-4", "data.paths=[a, b]"])
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(Exception):
    """A bad config; the message is one line naming the file and the key."""


M = TypeVar("M", bound=StrictModel)

_MAX_ERRORS_SHOWN = 3


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` as a string; configs are full of learning rates written that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode) -> dict:
    # A key written twice silently keeps the last value in plain PyYAML.
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        text = _one_line(e.problem or e.context or e)
        if e.context and e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line:
            # An unclosed bracket fails at the end of the file; where it opened is the useful line.
            text += f" ({e.context} at line {e.context_mark.line + 1})"
        raise ConfigError(f"{where}: malformed YAML: {text}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: malformed YAML: {_one_line(e)}") from None


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The top-level mapping of a YAML file (an empty file is an empty mapping). A top-level
    ``base: other.yaml`` (a path relative to this file) reads that file first and lays this one
    over it: mappings merge key by key, anything else (a list, a value) replaces the base's."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {_one_line(getattr(e, 'strerror', None) or e)}") from None
    data = _parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be the path of a YAML file, got {base!r}")
    resolved = (p.parent / base).resolve()
    if resolved in _seen or resolved == p.resolve():
        raise ConfigError(f"{path}: base {base} includes itself")
    return _merged(read_yaml(resolved, (*_seen, p.resolve())), data)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _apply_overrides(data: dict[str, Any], overrides: Iterable[str], source: str) -> dict[str, str]:
    """Set each ``a.b.c=value`` in ``data`` in place; returns dotted key -> override text."""
    applied: dict[str, str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise ConfigError(f"{source}: malformed override {item!r}: expected dotted.key=value")
        parts = [p.strip() for p in parts]
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(f"{source}: override {item!r}: {prefix!r} is not a mapping")
            node = child
        try:
            node[parts[-1]] = yaml.load(raw, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or e
            raise ConfigError(f"{source}: malformed override {item!r}: {_one_line(problem)}") from None
        applied[".".join(parts)] = item
    return applied


def _dotted(loc: tuple, data: Any) -> str:
    """The dotted key of a pydantic error location, without union member tags pydantic inserts."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(data, dict):
            if part not in data and not last:
                continue
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        parts.append(str(part))
    return ".".join(parts) or "<top level>"


def _describe(error: ValidationError, data: dict[str, Any], source: str, applied: dict[str, str]) -> str:
    messages: list[str] = []
    for err in error.errors():
        key = _dotted(tuple(err["loc"]), data)
        if err["type"] == "extra_forbidden":
            text = f"unknown key {key!r}"
        elif err["type"] == "missing":
            text = f"missing key {key!r}"
        else:
            got = repr(err.get("input"))
            got = got if len(got) <= 60 else got[:57] + "..."
            text = f"{key}: {err['msg']}, got {got}"
        origin = next((o for k, o in applied.items() if key == k or key.startswith(k + ".")), None)
        if origin:
            text += f" (from override {origin!r})"
        if text not in messages:
            messages.append(_one_line(text))
    shown = "; ".join(messages[:_MAX_ERRORS_SHOWN])
    more = len(messages) - _MAX_ERRORS_SHOWN
    return f"{source}: {shown}" + (f" (and {more} more)" if more > 0 else "")


def validate_config(data: dict[str, Any], cls: type[M], source: str, overrides: Iterable[str] = ()) -> M:
    """Apply ``overrides`` to a copy of ``data`` and validate it as ``cls``; errors name ``source``."""
    data = copy.deepcopy(data)
    applied = _apply_overrides(data, overrides, source)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, data, source, applied)) from None


def load_config(path: str | Path, cls: type[M], overrides: Iterable[str] = ()) -> M:
    """Read ``path`` (YAML), apply dotted ``overrides`` (values parsed as YAML), validate as ``cls``."""
    return validate_config(read_yaml(path), cls, str(path), overrides)


def apply_overrides(cfg: M, overrides: Iterable[str], source: str = "overrides") -> M:
    """A new config: ``cfg`` with dotted overrides applied and everything validated again."""
    return validate_config(dump_config(cfg), type(cfg), source, overrides)


def dump_config(cfg: StrictModel) -> dict[str, Any]:
    """Plain JSON-compatible data that ``validate_config`` turns back into an equal config."""
    return cfg.model_dump(mode="json")


def save_config(cfg: StrictModel, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (e.g. next to a checkpoint); ``load_config`` reads it back equal."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return p


def config_changes(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = (), added_ok: bool = False) -> list[str]:
    """Dotted keys whose values differ between two dumped configs, as ``key (old -> new)``;
    a key under one of ``ignore`` (dotted prefixes) is left out, and with ``added_ok`` so is a
    key ``old`` lacks (a setting added to the code since ``old`` was saved, at its default)."""
    skip = tuple(ignore)

    def flat(data: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(data, dict) and data:
            return {k: v for key, value in data.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: data}

    a, b = flat(old), flat(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if not any(k == s or k.startswith(s + ".") for s in skip)]
    keys = [k for k in keys if k in a] if added_ok else keys
    return [f"{k} ({a.get(k, '<unset>')} -> {b.get(k, '<unset>')})" for k in keys if a.get(k, "<unset>") != b.get(k, "<unset>")]
