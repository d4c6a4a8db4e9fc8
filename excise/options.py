"""Option values that stand for a settings dataclass: ``None`` / ``False`` (off), ``True`` (the
defaults), an instance, or a mapping of its fields - the one way ``planted=``, ``canaries=`` and
similar arguments are read, with unknown keys refused by name."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def check_fields(cls: type, value: Mapping, name: str) -> None:
    """Refuse a key of ``value`` that is not a field of the dataclass ``cls``, naming the
    closest field and the valid ones (``name``: what the error calls the mapping)."""
    fields = [f.name for f in dataclasses.fields(cls)]
    bad = [k for k in value if k not in fields]
    if bad:
        close = difflib.get_close_matches(str(bad[0]), fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name}: unknown key {bad[0]!r}{hint} (valid: {', '.join(fields)})")


def dataclass_option(cls: type[T], value, arg: str, defaults: str = "the defaults") -> T | None:
    """``value`` as a ``cls`` (a dataclass), or None when off. ``arg`` names the argument in the
    error for a value of another kind; ``defaults`` says what ``True`` means."""
    fields = [f.name for f in dataclasses.fields(cls)]
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        check_fields(cls, value, cls.__name__)
        return cls(**value)
    raise ValueError(f"{arg}={value!r}: give None, True ({defaults}), a {cls.__name__} or a "
                     f"mapping of its fields ({', '.join(fields)})")
