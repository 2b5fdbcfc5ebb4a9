"""Parallel degrees and the device mesh: validated once, asked by everyone.

A job of W processes is laid out as a (dp, pp, tp) grid, tp innermost: the
ranks of one tensor-parallel group are neighbours (on one machine, where the
fast links are), then pipeline stages, then data-parallel replicas. Nothing
else computes ranks or groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from shoal import runtime
from shoal.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    pp: int = 1
    tp: int = 1

    @classmethod
    def for_world(cls, world: int, pp: int = 1, tp: int = 1, dp: int = 0) -> ParallelDims:
        """Fill in dp (0: whatever is left) and check that the degrees multiply to `world`."""
        for name, value in (("pp", pp), ("tp", tp)):
            if value < 1:
                raise ConfigError(f"'{name}' must be >= 1, not {value}", name)
        if dp == 0:
            if world % (pp * tp):
                raise ConfigError(
                    f"{world} processes cannot be split into {pp} pipeline stage group(s) x {tp} "
                    f"tensor-parallel rank(s): {pp * tp} does not divide {world}; "
                    "choose degrees whose product divides the number of workers",
                    "dp",
                )
            dp = world // (pp * tp)
        if dp * pp * tp != world:
            raise ConfigError(
                f"dp x pp x tp = {dp} x {pp} x {tp} = {dp * pp * tp}, but the job has {world} processes; "
                "make the product equal the number of workers",
                "dp",
            )
        return cls(dp, pp, tp)

    @cached_property
    def mesh(self) -> DeviceMesh:
        """The `DeviceMesh` with dimensions named dp, pp, tp (built on first use; collective)."""
        from torch.distributed.device_mesh import init_device_mesh

        rt = runtime.current()
        return init_device_mesh(rt.device.type, (self.dp, self.pp, self.tp), mesh_dim_names=("dp", "pp", "tp"))

    def coords(self, rank: int | None = None) -> tuple[int, int, int]:
        rank = runtime.current().rank if rank is None else rank
        return rank // (self.pp * self.tp), (rank // self.tp) % self.pp, rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.coords()[0]

    @property
    def pp_rank(self) -> int:
        return self.coords()[1]

    @property
    def tp_rank(self) -> int:
        return self.coords()[2]

    def group(self, dim: str) -> ProcessGroup:
        """The process group of this rank along `dim` ("dp", "pp" or "tp")."""
        return self.mesh[dim].get_group()
