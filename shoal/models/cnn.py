from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from shoal.errors import ConfigError


@dataclass
class CNN:
    channels: list[int] = field(default_factory=lambda: [16, 32])
    hidden: int = 64

    def __post_init__(self):
        if not self.channels or any(c < 1 for c in self.channels):
            raise ConfigError(f"'channels' must be a non-empty list of widths >= 1, not {self.channels}", "channels")
        if self.hidden < 1:
            raise ConfigError(f"'hidden' must be >= 1, not {self.hidden}", "hidden")

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
        if len(input_shape) != 3:
            raise ConfigError(
                "model 'cnn' needs image input (channels, height, width), "
                f"but the data set gives shape {input_shape}; use model.name = 'mlp'",
                "model.name",
            )
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for c in self.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
            c_in = c
        layers += [
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(c_in * 4, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, num_classes),
        ]
        return nn.Sequential(*layers)
