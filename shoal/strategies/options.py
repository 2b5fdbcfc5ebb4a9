"""The options every strategy has, and the step options of those that apply an averaged gradient.

A strategy's options are a frozen, comparable dataclass nested in it
(`DataParallel.Options`): the config binds them, `build()` makes the
strategy. Every strategy that applies an averaged gradient at `step()` has
the same step options (`StepOptions`): `grad_accum` (k calls of `step()` per
applied update, equal to one step with the k-times batch) and `clip_norm`
(clip the global norm of the averaged gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from shoal.config import check_range
from shoal.errors import ConfigError

if TYPE_CHECKING:
    from shoal.strategies.base import Strategy


@dataclass(frozen=True, kw_only=True, slots=True)
class StrategyOptions:
    """A strategy's options: plain values, checked when made, compared by value.

    Each strategy nests its own subclass as `Options`; `build()` makes that strategy.
    """

    _owner: ClassVar[type | None] = None  # the Strategy subclass (not named: get_type_hints reads this)

    def build(self, **extra: Any) -> Strategy:
        """The strategy with these options (`extra`: run-time objects that are not options)."""
        if self._owner is None:
            raise TypeError(f"{type(self).__qualname__} belongs to no strategy; nest it in one as `Options`")
        return self._owner(self, **extra)

    def server_processes(self, workers: int) -> int:
        """How many non-worker (server) processes the launcher must start."""
        return 0


@dataclass(frozen=True, kw_only=True, slots=True)
class StepOptions(StrategyOptions):
    """The options of a strategy whose `optimizer.step()` applies the averaged gradient.

    Same names and meaning under every such strategy; a subclass with its own
    `__post_init__` calls `StepOptions.__post_init__(self)`.
    """

    grad_accum: int = 1
    """Calls of `optimizer.step()` per applied update (the mean of their gradients is applied)."""
    clip_norm: float | None = None
    """Clip the global norm of the averaged gradient to this before applying (None: no clipping)."""

    def __post_init__(self) -> None:
        check_range(self.grad_accum, "grad_accum", low=1)
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"'clip_norm' must be > 0 (or unset for no clipping), not {self.clip_norm}", "clip_norm")
