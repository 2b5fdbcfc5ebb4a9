"""A prepared model that pickle cannot save says in one sentence what to save instead.

FSDP2 gives each sharded module a class made at run time (`FSDPNet`) that
pickle cannot find by name, and tensor parallelism hangs local functions on
the layers as hooks: `torch.save(model)` fails with a message about neither,
and a model whose parameters are split over the ranks would not be whole in
the file anyway. `refuse_pickling` gives the prepared model a subclass of its
own class (made once per class, under the same name, as FSDP2 itself does)
whose pickling raises a ShoalError naming what to save; copying it
(`copy.copy`, `copy.deepcopy`) works as it did before.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from torch import nn

from shoal.errors import ShoalError

SAVE_INSTEAD = (
    "save strategy.full_state_dict(model, optimizer) with torch.save instead, "
    "and load its 'model' part into a freshly built model with load_state_dict"
)


def refuse_pickling(model: nn.Module, why: str) -> None:
    """Make `torch.save(model)` / `pickle.dumps(model)` raise `why` and what to save instead."""
    model.__class__ = _refusing_class(type(model), f"torch.save(model) cannot save this model ({why}): {SAVE_INSTEAD}")


@functools.cache
def _refusing_class(base: type[nn.Module], message: str) -> type[nn.Module]:
    def __reduce_ex__(self: nn.Module, protocol: Any) -> Any:  # noqa: N807  (the name pickle calls)
        raise ShoalError(message)

    namespace: dict[str, Any] = {
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "__reduce_ex__": __reduce_ex__,
        "__copy__": _copy,
    }
    if "__deepcopy__" not in dir(base):  # FSDP2 refuses deepcopy itself: keep its refusal
        namespace["__deepcopy__"] = _deepcopy
    if base.__new__ is not object.__new__:
        # FSDP2's: a new instance (indexing a sharded Sequential) is of the original
        # class, which it finds at a fixed place in the class's MRO: ask it as `base`.
        namespace["__new__"] = lambda cls, *args, **kwargs: base.__new__(base, *args, **kwargs)
    return type(base.__name__, (base,), namespace)


def _copy(self: nn.Module) -> nn.Module:
    """What `copy.copy` does by default, without `__reduce_ex__`."""
    cls = type(self)
    new = cls.__new__(cls)
    new.__setstate__(self.__dict__)
    return new


def _deepcopy(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """What `copy.deepcopy` does by default, without `__reduce_ex__`."""
    cls = type(self)
    new = cls.__new__(cls)
    memo[id(self)] = new
    new.__setstate__(copy.deepcopy(self.__dict__, memo))
    return new
