"""Gradient compressors by name, and `parse(spec)` for config strings.

A spec is a family name with an optional argument, written as in a config:

    "none" | "fp16" | "bf16" | "int8" | "qsgd:levels=N" | "topk:RATIO"
    | "randomk:RATIO" | "powersgd:rank=R"

Adding a compressor is adding a class and one `FAMILIES` entry: a builder
that checks the argument and raises `ConfigError` (key "compression") with
one sentence that says what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable

from shoal.compress.base import Compressor, ErrorFeedback, Payload
from shoal.errors import ConfigError

KEY = "compression"


def _fail(spec: str, why: str) -> ConfigError:
    return ConfigError(f"'{KEY}' = {spec!r} is not valid: {why}", KEY)


def _no_arg(family: str, arg: str | None, spec: str) -> None:
    if arg is not None:
        raise _fail(spec, f"{family!r} takes no argument; write just {family!r}")


def _ratio(family: str, arg: str | None, spec: str) -> float:
    try:
        ratio = float(arg) if arg is not None else float("nan")
    except ValueError:
        ratio = float("nan")
    if not 0.0 < ratio <= 1.0:
        raise _fail(
            spec, f"{family!r} needs the fraction of elements to send, a number in (0, 1], e.g. '{family}:0.01'"
        )
    return ratio


def _named_int(family: str, name: str, arg: str | None, spec: str, low: int, high: int | None, example: str) -> int:
    allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
    key, sep, raw = (arg or "").partition("=")
    try:
        value = int(raw) if sep and key.strip() == name else None
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise _fail(spec, f"{family!r} needs {name} = {allowed}, e.g. {example!r}")
    return value


def _none(arg, spec):
    from shoal.compress.cast import NoCompression

    _no_arg("none", arg, spec)
    return NoCompression(spec)


def _cast(family):
    def build(arg, spec):
        from shoal.compress.cast import Cast

        _no_arg(family, arg, spec)
        return Cast(spec, family)

    return build


def _int8(arg, spec):
    from shoal.compress.quantize import Quantizer

    _no_arg("int8", arg, spec)
    return Quantizer(spec, levels=127, family="int8")


def _qsgd(arg, spec):
    from shoal.compress.quantize import Quantizer

    return Quantizer(spec, levels=_named_int("qsgd", "levels", arg, spec, 2, 127, "qsgd:levels=16"))


def _topk(arg, spec):
    from shoal.compress.sparse import TopK

    return TopK(spec, _ratio("topk", arg, spec))


def _randomk(arg, spec):
    from shoal.compress.sparse import RandomK

    return RandomK(spec, _ratio("randomk", arg, spec))


def _powersgd(arg, spec):
    from shoal.compress.lowrank import PowerSGD

    return PowerSGD(spec, rank=_named_int("powersgd", "rank", arg, spec, 1, None, "powersgd:rank=4"))


FAMILIES: dict[str, Callable[[str | None, str], Compressor]] = {
    "none": _none,
    "fp16": _cast("fp16"),
    "bf16": _cast("bf16"),
    "int8": _int8,
    "qsgd": _qsgd,
    "topk": _topk,
    "randomk": _randomk,
    "powersgd": _powersgd,
}


def parse(spec: str) -> Compressor:
    """A fresh compressor for `spec`; `ConfigError` (key "compression") if malformed."""
    if not isinstance(spec, str):
        raise ConfigError(
            f"'{KEY}' must be a string such as 'none', 'int8' or 'topk:0.01', not {type(spec).__name__} {spec!r}", KEY
        )
    family, sep, arg = spec.strip().partition(":")
    family = family.strip().lower()
    if family not in FAMILIES:
        raise _fail(spec, f"unknown compressor {family!r}; choose one of {', '.join(names())}")
    return FAMILIES[family](arg.strip() if sep else None, spec)


def names() -> list[str]:
    return ["none", "fp16", "bf16", "int8", "qsgd:levels=N", "topk:RATIO", "randomk:RATIO", "powersgd:rank=R"]


__all__ = ["FAMILIES", "Compressor", "ErrorFeedback", "Payload", "names", "parse"]
