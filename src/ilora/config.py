"""Typed configuration: dataclasses that load from YAML and take overrides.

Every command's options are a dataclass whose fields carry a help text
(``option(default, "help")``). The same dataclass drives three things:

* ``--help`` and the ``--flag`` options of the CLI (`add_arguments`),
* YAML files (``--config FILE``),
* ``key=value`` overrides (dotted keys reach nested dataclasses: ``rec.epochs=3``).

Precedence, lowest to highest: dataclass defaults, YAML file, ``--flags``,
``key=value`` overrides. Unknown keys and values of the wrong type are errors, and so
is a float option set to NaN or an infinity (no option takes one).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from ilora.errors import ConfigError

T = TypeVar("T")


def option(default: Any, help: str, *, flag: bool = True) -> Any:
    """A config field with a help text. ``flag=False`` keeps it out of ``--flags``."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help, "flag": flag})
    if dataclasses.is_dataclass(default):
        cls = type(default)
        return dataclasses.field(default_factory=cls, metadata={"help": help, "flag": flag})
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 60, 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def _shown(value: Any) -> str:
    """A bounded repr for messages: YAML aliases can make a small file's value a shared graph
    whose full repr (or ``str``) is exponential in the file's size."""
    return _SHORT.repr(value)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command line string) to the field type ``tp``.
    A list or mapping where a single value belongs is refused, not turned into its text."""
    inner, optional = _strip_optional(tp)
    if isinstance(value, (list, tuple, dict, set)) and not (get_origin(inner) in (list, tuple) or dataclasses.is_dataclass(inner)):
        kind = "a mapping" if isinstance(value, dict) else "a list"
        raise ConfigError(f"{key}: expected a single value, got {kind} ({_shown(value)})")
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required")
    origin = get_origin(inner)
    try:
        if origin is Literal:
            choices = get_args(inner)
            if value not in choices:
                raise ConfigError(f"{key}: {_shown(value)} is not one of {', '.join(map(str, choices))}")
            return value
        if origin in (list, tuple):
            (elem, *_rest) = get_args(inner) or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}: expected a list, got {_shown(value)}")
            items = [coerce(v, elem, key) for v in value]
            return tuple(items) if origin is tuple else items
        if inner is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: {_shown(value)} is not a boolean (true/false)")
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{key}: {_shown(value)} is not a finite number")
            return number
        if inner is str:
            return str(value)
        if inner is Path:
            return Path(value)
        if dataclasses.is_dataclass(inner):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of options")
            return from_dict(inner, value, prefix=f"{key}.")
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {_shown(value)} is not a valid {getattr(inner, '__name__', inner)}") from None
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a (possibly partial, possibly nested) mapping."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ConfigError(f"unknown option {prefix}{key!s} (known: {', '.join(sorted(names))})")
        kwargs[name] = coerce(value, hints[name], f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # a section's own check ("lr: must be ...") names its options unqualified
        section = prefix.rstrip(".")
        if not section or str(exc).startswith(section):
            raise
        raise ConfigError(f"{section}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-safe mapping of a config (Paths become strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def without_added_defaults(config: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a config as a dict) as a version before the options in ``added`` (option ->
    the value runs had before it existed) recorded it: those entries dropped where they hold that
    value, kept where they do not."""
    return {k: v for k, v in config.items() if not (k in added and v == added[k])}


def changed_entries(old: dict[str, Any], new: dict[str, Any], skip: typing.Collection[str] = ()) -> list[str]:
    """``"key: old -> new"`` for every key (sorted, those in ``skip`` left out) whose value
    differs between two recorded configs; a key one of them lacks reads as None."""
    keys = sorted((set(old) | set(new)) - set(skip))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.replace("-", "_").split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a group of options")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a=1", "rec.epochs=3"]`` -> nested mapping of strings."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (overrides go after the command's positional arguments: a key=value before them is read as one)")
        key, value = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        _set_dotted(tree, key, value)
    return tree


def merge_trees(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:  # where it went wrong, 1-based, and what it found there
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = ": ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(f"{path}{where}: not valid YAML ({problem[:200]})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to read") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level")
    return data


def load_config(
    cls: type[T],
    *,
    yaml_path: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> T:
    """Defaults < YAML file < explicit flags < ``key=value`` overrides. An error that the YAML
    file alone causes here (a misspelt key, a value of the wrong type or out of a field's
    choices) names the file; range checks a config's ``validate`` makes later do not."""
    tree: dict[str, Any] = {}
    from_file: dict[str, Any] = {}
    if yaml_path is not None:
        from_file = read_yaml(yaml_path)
        tree = merge_trees(tree, from_file)
    if flags:
        flat: dict[str, Any] = {}
        for key, value in flags.items():
            _set_dotted(flat, key, value)
        tree = merge_trees(tree, flat)
    if overrides:
        tree = merge_trees(tree, parse_overrides(overrides))
    try:
        return from_dict(cls, tree)
    except ConfigError as exc:
        if from_file and _same_error(cls, from_file, str(exc)):
            raise ConfigError(f"{yaml_path}: {exc}") from None
        raise


def _same_error(cls: type, tree: dict[str, Any], message: str) -> bool:
    """Whether ``tree`` alone fails with ``message``."""
    try:
        from_dict(cls, tree)
    except ConfigError as exc:
        return str(exc) == message
    return False


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per (non-nested) field of ``cls``, with the field's help text.

    Flags default to ``None`` so that only the ones given on the command line override
    the YAML file; `flags_from_args` collects them.
    """
    hints = _hints(cls)
    group = parser.add_argument_group(f"options ({cls.__name__}; also settable as key=value or in --config YAML)")
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("flag", True):
            continue
        tp, _ = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        # argparse %-formats help texts: a literal % ("about 5 % of a step") must be doubled
        help_text = f"{f.metadata.get('help', '')} [default: {default}]".replace("%", "%%")
        if tp is bool:
            group.add_argument(flag, dest=f"cfg__{f.name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_origin(tp) is Literal:
            group.add_argument(flag, dest=f"cfg__{f.name}", choices=get_args(tp), default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f"cfg__{f.name}", default=None, metavar=f.name.upper(), help=help_text)


def option_lines(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, "help [default: value]")`` for every option of ``cls``, nested
    dataclasses' options under their field's name (``rec.epochs``), as `--help` lists them."""
    hints = _hints(cls)
    lines: list[tuple[str, str]] = []
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines += option_lines(tp, f"{key}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if get_origin(tp) is Literal:
            choices = "one of " + ", ".join(map(str, get_args(tp))) + "; "
        else:
            choices = ""
        shown = list(default) if isinstance(default, tuple) else default  # a YAML list
        lines.append((key, f"{f.metadata.get('help', '')} [{choices}default: {shown!r}]"))
    return lines


def options_epilog(cls: type, title: str, width: int = 100) -> str:
    """Every option of ``cls`` (`option_lines`) as an argparse epilog (for ``RawDescriptionHelpFormatter``)."""
    import textwrap

    lines = option_lines(cls)
    column = min(max(len(key) for key, _ in lines) + 4, 36)
    out = [title]
    for key, text in lines:
        first = f"  {key}".ljust(column)
        if len(first) > column:
            out.append(f"  {key}")
            first = " " * column
        wrapped = textwrap.wrap(text, width=width - column) or [""]
        out.append(first + wrapped[0])
        out += [" " * column + rest for rest in wrapped[1:]]
    return "\n".join(out)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML file of options (same names as the flags, with underscores)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, applied last (dotted keys reach nested groups)")


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k[len("cfg__"):]: v for k, v in vars(args).items() if k.startswith("cfg__") and v is not None}


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return load_config(
        cls,
        yaml_path=getattr(args, "config", None),
        flags=flags_from_args(args),
        overrides=list(getattr(args, "overrides", None) or []),
    )


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` inside the block, as a ``threads`` option
    asks, and the count before it restored after (None: left as it is). A trainer or a
    pipeline stage runs inside one, so that one stage's option never carries into the next."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
