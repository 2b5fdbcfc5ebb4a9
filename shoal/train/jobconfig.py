"""The job's configuration: one dataclass tree, TOML in, command-line overrides.

Everything is validated here, in the launching process, before any worker
starts: an unknown key, a wrong type or a value out of range raises a
`ConfigError` that names the key and what is allowed.

The `model`, `data` and `strategy` sections are chosen by `name`; the rest of
such a section is the options dataclass that the named component declares in
its registry, so adding a model, data set or strategy never edits this file.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.config import (
    CheckpointConfig,
    LaunchConfig,
    LoggingConfig,
    OptimizerConfig,
    TrainConfig,
    _suggest,
    bind,
)
from shoal.data import DATASETS
from shoal.errors import ConfigError
from shoal.models import MODELS
from shoal.strategies import STRATEGIES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # pyright: ignore[reportMissingImports]  # a dependency on Python 3.10 only


# --------------------------------------------------------------------------
# Sections chosen by name


@dataclass
class Choice:
    """A `name` plus the options dataclass that the named component declares."""

    name: str
    options: Any

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self.options)}


@dataclass
class JobConfig:
    model: Choice
    data: Choice
    strategy: Choice
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Choice) else dataclasses.asdict(value)
        return out


FIXED_SECTIONS = {
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "launch": LaunchConfig,
    "logging": LoggingConfig,
}
DEFAULT_NAMES = {"model": "mlp", "data": "digits", "strategy": "data_parallel"}


REGISTRIES = {"model": MODELS, "data": DATASETS, "strategy": STRATEGIES}


# --------------------------------------------------------------------------
# Loading


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a TOML file (or the defaults), apply `--section.key=value` overrides, validate."""
    table: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} does not exist; give the path of a TOML file, e.g. examples/digits.toml"
            )
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    for item in overrides:
        apply_override(table, item)
    return from_dict(table)


def parse_overrides(args: list[str]) -> list[str]:
    """Turn `--a.b=1 --c.d 2 --flag` command-line words into `a.b=1` items."""
    items, i = [], 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--") or len(word) == 2:
            raise ConfigError(f"unexpected argument {word!r}; overrides look like --section.key=value")
        word = word[2:]
        if "=" in word:
            items.append(word)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            items.append(f"{word}={args[i + 1]}")
            i += 1
        else:
            items.append(f"{word}=true")
        i += 1
    return items


def apply_override(table: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    parts = key.split(".")
    node = table
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{key}' cannot be set: {part!r} is not a section", key)
    node[parts[-1]] = _parse_value(raw)


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word: a string


def from_dict(table: dict) -> JobConfig:
    if not isinstance(table, dict):
        raise ConfigError("the config must be a TOML table")
    known = set(FIXED_SECTIONS) | set(DEFAULT_NAMES)
    for key, value in table.items():
        if key not in known:
            raise ConfigError(
                f"unknown config section {key!r}{_suggest(key, known)}; sections are {', '.join(sorted(known))}", key
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{key!r} must be a section ([{key}]), not a single value", key)
    sections: dict[str, Any] = {}
    for name, cls in FIXED_SECTIONS.items():
        sections[name] = bind(cls, table.get(name, {}), name)
    for section, default in DEFAULT_NAMES.items():
        raw = dict(table.get(section, {}))
        chosen = raw.pop("name", default)
        registry = REGISTRIES[section]
        if not isinstance(chosen, str) or chosen not in registry:
            raise ConfigError(
                f"unknown {registry.kind} {chosen!r} in '{section}.name'{_suggest(str(chosen), registry.names())}; "
                f"choose one of {', '.join(registry.names())}",
                f"{section}.name",
            )
        sections[section] = Choice(chosen, bind(registry.options(chosen), raw, section))
    return JobConfig(**sections)


def dump_toml(cfg: JobConfig) -> str:
    import tomli_w

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if v is not None}
        return obj

    return tomli_w.dumps(clean(cfg.to_dict()))
