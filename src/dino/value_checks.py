"""The valid values of a setting, declared once and checked with one clear error: a number's
interval (``"[0, 1]"``, ``"(0, inf)"``), a list's length, a min-max pair's order, a string's
choices. Config fields declare them with :func:`setting`; the evaluation
commands' flags call :func:`check_value`."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

from dino.errors import DinoError


@dataclass(frozen=True)
class Interval:
    """The valid values of a number, written as in mathematics: ``"[0, 1]"``, ``"(0, inf)"``."""

    lo: float
    hi: float
    lo_open: bool
    hi_open: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*", text)
        if m is None:
            raise ValueError(f"not an interval: {text!r}")
        return cls(float(m[2]), float(m[3]), m[1] == "(", m[4] == ")")

    def __contains__(self, x: float) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below

    def __str__(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else str(v)

        if math.isinf(self.hi):
            return f"greater than {num(self.lo)}" if self.lo_open else f"at least {num(self.lo)}"
        return (
            f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}"
            f"{')' if self.hi_open else ']'}"
        )


def value_spec(
    range: str | None = None,
    length: int | tuple[int, float] | None = None,
    increasing: bool = False,
    choices: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """The metadata that declares the valid values (see :func:`check_value`)."""
    spec: dict[str, Any] = {}
    if range is not None:
        spec["range"] = Interval.parse(range)
    if length is not None:
        spec["length"] = (length, length) if isinstance(length, int) else length
    if increasing:
        spec["increasing"] = True
    if choices is not None:
        spec["choices"] = choices
    return spec


#: What ``--resume`` does with a field given a new value (see :func:`setting`).
ON_RESUME = ("free", "change", "fixed")


def setting(
    default: Any,
    help: str,
    *,
    range: str | None = None,
    length: int | tuple[int, float] | None = None,
    increasing: bool = False,
    choices: tuple[str, ...] | None = None,
    on_resume: str = "change",
) -> Any:
    """A field of the config schema (:mod:`dino.config`): its default, its help text (also the
    flag's) and its valid values, all checked by :func:`dino.config_checks.validate`.

    ``range``: the interval of a number, or of each number of a list (``"[0, 1]"``,
    ``"(0, inf)"``); ``length``: the number of values of a list, or its ``(min, max)``;
    ``increasing``: a list's values must not decrease (a min-max pair); ``choices``: a string's
    allowed values (``"cuda:N"`` stands for any ``cuda:<number>``).

    ``on_resume`` says what ``dino train --resume`` does with a new value (:data:`ON_RESUME`):
    ``"free"``: how the run is executed, saved or logged, changed in place; ``"change"``: what
    the run computes, only into a new run folder; ``"fixed"``: the checkpoint's shapes and
    state depend on it, never changed.
    """
    assert on_resume in ON_RESUME, on_resume
    meta = {"help": help, "on_resume": on_resume, **value_spec(range, length, increasing, choices)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_value(
    name: str,
    value: Any,
    range: str | None = None,
    *,
    length: int | tuple[int, float] | None = None,
    increasing: bool = False,
    choices: tuple[str, ...] | None = None,
) -> None:
    """Raise a :class:`DinoError` naming ``name`` (a field or a flag such as ``--k``), ``value``
    and the valid values when ``value`` is not one of them; the arguments are those of a config
    field's declaration (:func:`setting`). For the evaluation commands' flags and functions."""
    check_spec(name, value, value_spec(range, length, increasing, choices))


def check_spec(name: str, value: Any, meta: Any) -> None:
    """Raise a :class:`DinoError` naming ``name``, ``value`` and the valid values if ``value``
    breaks the field's declared range, length or choices."""
    what = name
    values = value if isinstance(value, list) else [value]
    if "length" in meta:
        lo, hi = meta["length"]
        if not lo <= len(value) <= hi:
            need = f"{lo} values" if lo == hi else f"at least {lo} value{'s' * (lo != 1)}"
            raise DinoError(f"{what} needs {need}, got {len(value)}: {value}")
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise DinoError(f"{what} must be a finite number, got {value}")
    rng = meta.get("range")
    if rng is not None and any(v not in rng for v in values):
        each = " values must each" if isinstance(value, list) else " must"
        raise DinoError(f"{what}{each} be {rng}, got {value}")
    if meta.get("increasing") and any(a > b for a, b in itertools.pairwise(values)):
        raise DinoError(f"{what} is a min max pair and needs min <= max, got {value}")
    choices = meta.get("choices")
    if choices is not None:
        allowed = any(
            value == c or (c.endswith(":N") and re.fullmatch(re.escape(c[:-1]) + r"\d+", value))
            for c in choices
        )
        if not allowed:
            raise DinoError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
