"""The machinery under med_train.config: strict YAML, `--set a.b=c` layers, typed building, per-field checks, saving.

It works on any tree of nested dataclasses (the root is passed in), so `config.py` holds only the fields, their
defaults and constraints, and the rules that tie keys together. A field states its own constraint:

    image_size: int = positive(384)
    top_p: float = checked(0.9, lambda v: 0 < v <= 1, "must be > 0 and <= 1")
    format: Literal["auto", "hub"] = "auto"          # a choice: "did you mean" on a near miss

    data, where = read_layers(Config, "c.yaml", ["train.lr=3e-4"])
    cfg = build(Config, data, where)                   # types first, then each field's check
    raise where.error("generate.min_length", "must be <= ...", also=["generate.max_length"])

Every error is a `ConfigError` with one line naming the file or the `--set`, the dotted key, the bad value and,
for unknown keys and choices, a "did you mean" hint.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_NULL_WORDS = ("", "~", "null", "Null", "NULL")


class ConfigError(ValueError):
    """A bad configuration. The message is one line naming the source, the dotted key and the bad value."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# ---- constraints declared beside their fields ----------------------------------------------------------------------

_CHECK = "check"  # the field metadata key holding (test, requirement)


def rule(test: Callable[[Any], bool], requirement: str) -> dict[str, Any]:
    """Field metadata: the value, unless None, must pass `test`; the error says `requirement` ("must be > 0")."""
    return {_CHECK: (test, requirement)}


def checked(default: Any, test: Callable[[Any], bool], requirement: str) -> Any:
    """A dataclass field with a default and a `rule`."""
    return field(default=default, metadata=rule(test, requirement))


def positive(default: Any) -> Any:
    return checked(default, lambda v: v > 0, "must be > 0")


def non_negative(default: Any) -> Any:
    return checked(default, lambda v: v >= 0, "must be >= 0")


def fraction(default: Any) -> Any:
    return checked(default, lambda v: 0 <= v <= 1, "must be between 0 and 1")


def probability(default: Any) -> Any:
    return checked(default, lambda v: 0 <= v < 1, "must be >= 0 and < 1")


def not_empty(default: Any) -> Any:
    return checked(default, lambda v: v.strip() != "", "must not be empty")


# ---- reading: the YAML file, then --set layers ---------------------------------------------------------------------


def read_layers(root: type, path: str | Path | None, overrides: Sequence[str] = (),
                replaces: Mapping[str, str] | None = None) -> tuple[dict[str, Any], Where]:
    """The YAML file at `path` (None: no file), then `a.b=c` overrides in order, as one nested dict.

    `replaces` maps a key to another that a non-null --set of it clears, unless a --set gave that one too (two
    ways of saying one thing: a later layer's choice replaces the file's).
    """
    file = str(path) if path is not None else None
    data = _read_yaml(Path(path), root) if path is not None else {}
    origins: dict[str, str] = {}
    for text in overrides:
        key, value = _parse_override(text, file, root)
        _set_dotted(data, key, value, Where(root, file, {key: text}))
        origins[key] = text
        other = (replaces or {}).get(key)
        if other and value is not None and other not in origins:
            _set_dotted(data, other, None, Where(root, file, {key: text}))
    return data, Where(root, file, origins)


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML loading that also rejects a key written twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(exc).split())  # PyYAML's messages span lines; ours are one line


def _read_yaml(path: Path, root: type) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # safe: _StrictLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({_yaml_problem(exc)})") from None
    if data is None:  # an empty file, or only comments: all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(_field_names(root))}) "
                          f"at the top level, got {_show(data)}")
    return data


def _parse_override(text: str, file: str | None, root: type) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", value). String fields take the text as typed, other fields parse it as YAML."""
    key, sep, raw = text.partition("=")
    key = ".".join(part.strip() for part in key.split("."))
    if not sep or any(not part for part in key.split(".")):
        where = f" (on {file})" if file else ""
        raise ConfigError(f"--set {text}{where}: expected KEY=VALUE with a dotted key, e.g. train.lr=3e-4")
    tp = _field_type(root, key)
    if tp is not None and _is_text(tp):
        # Parsing as YAML would turn `data.train_split=2017` into an int, `train.mixed_precision=no` into false
        # and make `model.prompt=a picture of ` lose its trailing space; a quoted value is still parsed, so
        # '"null"' gives the word null.
        if raw in _NULL_WORDS and type(None) in typing.get_args(tp):
            return key, None
        if not (len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""):
            return key, raw
    try:
        return key, yaml.load(raw, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        problem = f"value {raw!r} is not valid YAML ({_yaml_problem(exc)})"
        raise Where(root, file, {key: text}).error(key, problem) from None


def _set_dotted(data: dict[str, Any], key: str, value: Any, where: Where) -> None:
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            parent = ".".join(parts[: depth + 1])
            raise where.error(key, f"cannot set it: {parent} is {_show(child)}, not a section")
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        _deep_merge(node[last], value)  # --set model.vision={name: x} keeps the file's other vision keys
    else:
        node[last] = value


def _deep_merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


# ---- errors that say where a value came from -----------------------------------------------------------------------


@dataclass(frozen=True)
class Where:
    """Where values came from, so that an error can name the file or the `--set` that gave the bad key."""

    root: type  # the dataclass the keys are read into (for "did you mean" across sections)
    file: str | None
    origins: dict[str, str]  # dotted key -> the --set text that set it

    def error(self, key: str, problem: str, also: Sequence[str] = ()) -> ConfigError:
        """`key` is the key at fault; `also` lists other keys the problem involves (for finding the --set)."""

        def related(k: str) -> bool:  # this key, a section above it, or a key inside it
            return any(k == x or x.startswith((k + ".", k + "[")) or k.startswith(x + ".") for x in (key, *also))

        hits = [k for k in self.origins if related(k)]  # the longest (most specific) --set wins
        if hits:
            where = f"--set {self.origins[max(hits, key=len)]}" + (f" (on {self.file})" if self.file else "")
        else:
            where = self.file or "<defaults>"
        return ConfigError(f"{where}: {key}: {problem}" if key else f"{where}: {problem}", key=key)

    def mismatch(self, key: str, value: Any, tp: Any) -> ConfigError:
        choices = _choices(tp)
        if choices and isinstance(value, str):
            near = difflib.get_close_matches(value, choices, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            return self.error(key, f"must be one of {' | '.join(choices)}, got {_show(value)}{hint}")
        # YAML turns unquoted 2017, 1.0 or yes into numbers and bools.
        hint = "; quote it to make it a string" if _is_text(tp) and isinstance(value, int | float) else ""
        return self.error(key, f"expected {_describe(tp)}, got {_show(value)} ({type(value).__name__}){hint}")


def _show(value: Any) -> str:
    text = repr(value)  # repr escapes newlines: messages stay on one line
    return text if len(text) <= 80 else text[:77] + "..."


def _name(key: Any) -> str:
    text = str(key)
    return text if text.isprintable() else repr(text)


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{_name(name)}" if prefix else _name(name)


# ---- building: declared types first, then each field's check -------------------------------------------------------


def build(root: type, data: Any, where: Where) -> Any:
    """An instance of the dataclass `root` from nested `data`: every value of its declared type, every check met."""
    obj = _convert(data, root, "", where)
    _check_fields(obj, "", where)
    return obj


def _check_fields(obj: Any, prefix: str, where: Where) -> None:
    for f in dataclasses.fields(obj):
        key, value = _join(prefix, f.name), getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, key, where)
        elif _CHECK in f.metadata and value is not None:
            test, requirement = f.metadata[_CHECK]
            if not test(value):
                raise where.error(key, f"{requirement}, got {_show(value)}")


def _build_section(cls: type, raw: Any, prefix: str, where: Where) -> Any:
    if raw is None:  # `train:` with nothing under it
        raw = {}
    if not isinstance(raw, Mapping):
        raise where.mismatch(prefix, raw, cls)
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        key = _join(prefix, name)
        if name not in hints:
            raise where.error(key, f"unknown key (value {_show(value)}); {_suggest(name, prefix, cls, where.root)}")
        values[name] = _convert(value, hints[name], key, where)
    return cls(**values)


def _convert(value: Any, tp: Any, key: str, where: Where) -> Any:
    """Check `value` against the declared type `tp` and convert where YAML falls short (`1e-5` -> float)."""
    if dataclasses.is_dataclass(tp):
        return _build_section(tp, value, key, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        deeper: list[ConfigError] = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arm, key, where)
            except ConfigError as exc:
                if exc.key != key:  # a bad element further down (model.vision.mean[1]) says more
                    deeper.append(exc)
        if deeper:
            raise deeper[0]
        raise where.mismatch(key, value, tp)
    if origin is typing.Literal:
        if value in args:
            return value
        raise where.mismatch(key, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise where.mismatch(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise where.mismatch(key, value, tp)
    if tp is float:
        return _to_float(value, key, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise where.mismatch(key, value, tp)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise where.mismatch(key, value, tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise where.error(key, f"expected {len(args)} values, got {_show(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args, strict=True)))
        items = [_convert(v, args[0], f"{key}[{i}]", where) if args else v for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise where.mismatch(key, value, tp)
        for name in value:
            if not isinstance(name, str):  # these dicts become keyword arguments
                raise where.error(_join(key, name), f"keys must be strings, got {_show(name)}")
        if args:
            return {k: _convert(v, args[1], _join(key, k), where) for k, v in value.items()}
        return dict(value)
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp)):
        return value
    raise where.mismatch(key, value, tp)


def _to_float(value: Any, key: str, where: Where) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # PyYAML reads `1e-5` (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None:
        raise where.mismatch(key, value, float)
    if not math.isfinite(number):
        raise where.error(key, f"must be a finite number, got {_show(value)}")
    return number


# ---- declared types and keys ---------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # `from __future__ import annotations` leaves annotations as strings; this resolves them.
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _field_names(cls: type) -> list[str]:
    return list(_hints(cls))


def _field_type(root: type, key: str) -> Any | None:
    """The declared type of a dotted key, or None when the key is not a dataclass field."""
    tp: Any = root
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp) or part not in _hints(tp):
            return None
        tp = _hints(tp)[part]
    return tp


@functools.cache
def _all_keys(root: type) -> tuple[str, ...]:
    """Every dotted key of `root`, sections included."""

    def under(cls: type, prefix: str) -> list[str]:
        keys: list[str] = []
        for name, tp in _hints(cls).items():
            keys.append(_join(prefix, name))
            if dataclasses.is_dataclass(tp):
                keys.extend(under(tp, _join(prefix, name)))
        return keys

    return tuple(under(root, ""))


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _choices(tp: Any) -> tuple[Any, ...]:
    """The values a Literal type (optional or not) allows; () for other types."""
    for arm in typing.get_args(tp) if _is_union(tp) else (tp,):
        if typing.get_origin(arm) is typing.Literal:
            return typing.get_args(arm)
    return ()


def _is_text(tp: Any) -> bool:
    """A string field, optional or not, free or one of a few words."""
    arms = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    if len(arms) != 1:
        return False
    choices = _choices(arms[0])
    return arms[0] is str or (bool(choices) and all(isinstance(c, str) for c in choices))


def _describe(tp: Any) -> str:
    if _is_union(tp):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])} values" if args else "a list"
    if tp is dict or origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(_field_names(tp))}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _suggest(name: Any, prefix: str, cls: type, root: type) -> str:
    """A "did you mean" hint for an unknown key: a near name in the same section, or the name elsewhere."""
    near = difflib.get_close_matches(str(name), _field_names(cls), n=1)
    if near:
        return f"did you mean '{_join(prefix, near[0])}'?"
    # The name, or a near one, in another section (train.num_beam -> generate.num_beams). Comparing the last
    # part only, because whole dotted keys sharing the section prefix look alike to difflib.
    last_parts = {k.rsplit(".", 1)[-1] for k in _all_keys(root)}
    near = difflib.get_close_matches(str(name), last_parts, n=1)
    elsewhere = [k for k in _all_keys(root) if near and k.rsplit(".", 1)[-1] == near[0]]
    if elsewhere:
        return "did you mean " + " or ".join(f"'{k}'" for k in elsewhere) + "?"
    return f"valid keys{' in ' + prefix if prefix else ''}: {', '.join(_field_names(cls))}"


# ---- writing -------------------------------------------------------------------------------------------------------


def to_dict(obj: Any) -> dict[str, Any]:
    """Every key of a dataclass instance as plain nested dicts and lists (what YAML can hold)."""
    return _plain_data(dataclasses.asdict(obj))


def to_yaml(obj: Any) -> str:
    """Every key of a dataclass instance as YAML text that `read_layers` + `build` read back to an equal one."""
    # A huge width keeps long strings on one line. PyYAML writes some line-break characters (U+0085, U+2028,
    # U+2029) raw even inside double quotes when allow_unicode is on, and reads them back as spaces: if the text
    # does not read back equal, write it again with every non-ASCII character escaped.
    data = to_dict(obj)
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1 << 30)
    if yaml.safe_load(text) != data:
        text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=False, width=1 << 30)
    return text


class _Dumper(yaml.SafeDumper):
    """Block style for sections, but lists of plain values on one line (`mean: [0.48, 0.46, 0.41]`)."""

    def represent_list(self, data: list[Any]) -> yaml.Node:
        flat = all(not isinstance(v, list | dict) for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)

    def represent_text(self, data: str) -> yaml.Node:
        # PyYAML writes U+0085 raw inside single quotes when allow_unicode is on, and reads it back as a line
        # break (a space). Double quotes escape every non-printable character.
        style = None if data.isprintable() else '"'
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(list, _Dumper.represent_list)
_Dumper.add_representer(str, _Dumper.represent_text)


def _plain_data(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):  # safe_dump cannot write tuples
        return [_plain_data(v) for v in value]
    return value
