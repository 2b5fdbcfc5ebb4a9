from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from shoal.config import check_range
from shoal.errors import ConfigError


@dataclass
class MLP:
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0

    def __post_init__(self):
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"'hidden' widths must be >= 1, not {self.hidden}", "hidden")
        check_range(self.dropout, "dropout", low=0.0, high=0.9)

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
        """A flat `nn.Sequential` (Flatten, then Linear/ReLU blocks) so pipeline splits can cut it anywhere."""
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if self.dropout:
                layers.append(nn.Dropout(self.dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
