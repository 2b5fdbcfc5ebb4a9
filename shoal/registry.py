"""Name -> component registries, imported lazily so that a config can be
validated without importing every strategy's dependencies."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any


class Registry:
    """Components of one kind (model, data set, strategy) by name, as "module:attribute"."""

    def __init__(self, kind: str, entries: dict[str, str]) -> None:
        self.kind = kind
        self._entries = dict(entries)  # name -> "module:attribute"

    def add(self, name: str, target: str) -> None:
        self._entries[name] = target

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Any:
        module, _, attr = self._entries[name].partition(":")
        return getattr(importlib.import_module(module), attr)

    def options(self, name: str) -> type:
        """The dataclass that holds this component's options: its nested `Options`, else the component itself."""
        obj = self.get(name)
        cls = getattr(obj, "Options", obj)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"{self.kind} {name!r} declares no options dataclass")
        return cls
