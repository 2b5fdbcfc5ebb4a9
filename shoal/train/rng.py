"""The random state a run must resume with, as one checkpointed part.

torch's CPU generator drives dropout and anything else seeded by
`torch.manual_seed`; it is saved per rank as the uint8 tensor torch gives.
"""

from __future__ import annotations

from typing import Any

import torch


class RNGState:
    """torch's CPU random generator as a checkpoint part."""

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        if "torch" in state:
            torch.set_rng_state(state["torch"].to(torch.uint8))
