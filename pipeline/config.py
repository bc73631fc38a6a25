"""Each stage's configuration: one typed dataclass per stage, the one place where its
settings, their defaults and their one-line help are written.

- The Python API merges the caller's keywords into it: :func:`make_conf`.
- The command line derives its options from it: :func:`click_options` (``--pool-size``
  for ``pool_size``, the help and the default from the field).
- Every output records it: :func:`conf_dict` (into the file's ``parameters``).

A stage declares its configuration with :func:`setting`::

    @dataclass(frozen=True)
    class MineConf:
        pool_size: int = setting(100, "Images in M(q): nearest camera centres.", short="-k")

Only plain types: ``int``, ``float``, ``str``, ``bool``, tuples of them (given on the
command line as comma-separated text) and ``X | None``. No torch here, so that
``sfmpairs --help`` is quick.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable

from .common import SfmpairsError


def setting(
    default: Any,
    help: str,
    *,
    choices: typing.Sequence[str] | None = None,
    short: str | None = None,
    default_text: str | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    flag_value: str | None = None,
    name: str | None = None,
    cli: bool = True,
) -> Any:
    """A field of a stage's configuration.

    ``help``: one line for ``--help``; ``choices``: the values allowed; ``short``: a
    one-letter option (``-k``); ``default_text``: what ``--help`` says of the default
    where the value alone would not tell (None defaults); ``parse``: command-line text to
    the value (comma-separated tuples, ``--pretrained`` without a file); ``metavar``,
    ``flag_value``: passed to click; ``name``: the option's name where it is not the
    field's (``--multiscale`` for ``scales``); ``cli=False``: a setting of the Python API only.
    """
    meta = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "short": short,
        "default_text": default_text,
        "parse": parse,
        "metavar": metavar,
        "flag_value": flag_value,
        "name": name,
        "cli": cli,
    }
    return dataclasses.field(default=default, metadata=meta)


def make_conf(cls: type, conf=None, **overrides):
    """An instance of the configuration class ``cls``: its defaults, updated by ``conf``
    (an instance or a dict) and then by ``overrides`` (None: not given, the default).

    Text is parsed where a setting is not text: a comma-separated tuple
    (``scales="1,0.5"``), ``pretrained="imagenet"``; the command line passes its text so,
    and a bad value is a one-line error naming the option. An unknown name is an error."""
    values = {}
    if conf is not None:
        values.update(dataclasses.asdict(conf) if dataclasses.is_dataclass(conf) else dict(conf))
    values.update(given(overrides))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SfmpairsError(f"unknown option {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if isinstance(value, str) and (parse := _parser(fields[name], hints[name])) is not None:
            values[name] = parse(value)
        elif isinstance(value, list) and _is_tuple(hints[name]):
            values[name] = tuple(value)
    conf = cls(**values)
    check_choices(conf)
    return conf


def check_choices(conf) -> None:
    """Refuse a setting outside its ``choices``, in one line naming the option."""
    for f in dataclasses.fields(conf):
        choices, value = f.metadata.get("choices"), getattr(conf, f.name)
        if choices is not None and value is not None and value not in choices:
            option = "--" + (f.metadata.get("name") or f.name).replace("_", "-")
            raise SfmpairsError(f"unknown {option} {value!r} (choose from {', '.join(choices)})")


def _parser(f, hint):
    """How text becomes the setting's value: the field's own parser, or comma-separated
    items for a tuple; None for text settings."""
    parse = f.metadata.get("parse") or (_comma_separated(hint) if _base_type(hint) is tuple else None)
    if parse is None:
        return None
    option = "--" + (f.metadata.get("name") or f.name).replace("_", "-")

    def parse_option(text: str):
        try:
            return parse(text)
        except SfmpairsError as e:
            raise SfmpairsError(f"{option} {text!r}: {e}") from None

    return parse_option


def conf_dict(conf) -> dict:
    """The configuration as a plain dict (tuples as lists): what outputs record."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(conf).items()}


def click_options(cls: type, *, skip: typing.Iterable[str] = ()):
    """A decorator adding one click option per field of ``cls`` (except ``skip``).

    Every option defaults to None, "not given": the command passes only the options the
    user gave (:func:`given`), and the configuration class supplies the rest, so each
    default is written once, in the class, and ``--help`` shows it from there.
    """
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in set(skip)]
    # the class's own settings first, those it shares with other stages (its bases') after them
    depth = {
        f.name: max(i for i, c in enumerate(cls.__mro__) if f.name in getattr(c, "__annotations__", {})) for f in fields
    }
    fields.sort(key=lambda f: depth[f.name])

    def decorate(fn):
        for f in reversed(fields):
            fn = _click_option(f, hints[f.name])(fn)
        return fn

    return decorate


def given(options: dict) -> dict:
    """The options the user gave on the command line (click passes None for the others)."""
    return {k: v for k, v in options.items() if v is not None}


def _is_tuple(hint) -> bool:
    return any(typing.get_origin(t) is tuple for t in (hint, *typing.get_args(hint)))


def _base_type(hint):
    """``int | None`` -> int; ``tuple[float, ...]`` -> tuple."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    return typing.get_origin(hint) or hint


def _default_text(f) -> str:
    if f.metadata["default_text"] is not None:
        return f.metadata["default_text"]
    value = f.default
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return "none" if value is None else str(value)


def _click_option(f, hint):
    import click

    meta, base = f.metadata, _base_type(hint)
    name = "--" + (meta["name"] or f.name).replace("_", "-")
    decls = [name] + ([meta["short"]] if meta["short"] else [])
    kwargs: dict[str, Any] = {"default": None}
    help_text = meta["help"]
    if base is bool and meta["flag_value"] is None:
        if f.default is False:  # a plain flag: off unless given
            kwargs["is_flag"] = True
        else:
            decls = [f"{name}/--no-{name[2:]}"]
            help_text += f" [default: {_default_text(f)}]"
    else:
        help_text += f" [default: {_default_text(f)}]"
        if meta["choices"] is not None:
            kwargs["type"] = click.Choice(meta["choices"])
        elif meta["parse"] is not None or base in (tuple, str) or meta["flag_value"] is not None:
            kwargs["type"] = str
        else:
            kwargs["type"] = base
    if meta["flag_value"] is not None:
        kwargs.update(is_flag=False, flag_value=meta["flag_value"])
    if meta["metavar"] is not None:
        kwargs["metavar"] = meta["metavar"]
    return click.option(*decls, f.name, help=help_text, **kwargs)  # text is parsed by make_conf


def _comma_separated(hint):
    """Command-line text to a tuple: "1,0.7071,0.5" -> (1.0, 0.7071, 0.5)."""
    if typing.get_origin(hint) is not tuple:  # tuple[...] | None
        hint = next((t for t in typing.get_args(hint) if typing.get_origin(t) is tuple), hint)
    inner = typing.get_args(hint)
    item = inner[0] if inner else str

    def parse(text: str):
        try:
            values = tuple(item(s.strip()) for s in text.split(",") if s.strip())
        except ValueError:
            raise SfmpairsError(f"give comma-separated values of type {item.__name__}") from None
        if not values:
            raise SfmpairsError("give at least one value")
        return values

    return parse
