"""A character-level language-modelling set made from text on every machine:
the Python standard library's own source files. No download; the same files
(sorted by name) and the same vocabulary (printable ASCII) everywhere."""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from shoal.config import check_range
from shoal.data.split import DataSplit

VOCAB = sorted(set(string.printable) - set("\x0b\x0c\r"))  # 97 characters, plus one for "other"


@dataclass
class StdlibChars:
    batch_size: int = 16
    context: int = 64
    characters: int = 400_000
    test_fraction: float = 0.05

    def __post_init__(self):
        check_range(self.batch_size, "batch_size", low=1)
        check_range(self.context, "context", low=2)
        check_range(self.characters, "characters", low=1000)
        check_range(self.test_fraction, "test_fraction", low=0.0, high=0.5, low_open=True)

    def load(self, seed: int = 0) -> DataSplit:
        text = stdlib_text(self.characters)
        index = {c: i for i, c in enumerate(VOCAB)}
        other = len(VOCAB)
        ids = torch.tensor([index.get(c, other) for c in text], dtype=torch.long)
        window = self.context + 1
        rows = ids[: len(ids) // window * window].view(-1, window)
        gen = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(len(rows), generator=gen)]
        n_test = max(1, int(len(rows) * self.test_fraction))
        test, train = rows[:n_test], rows[n_test:]
        return DataSplit(
            TensorDataset(train[:, :-1].contiguous(), train[:, 1:].contiguous()),
            TensorDataset(test[:, :-1].contiguous(), test[:, 1:].contiguous()),
            input_shape=(self.context,),
            num_classes=len(VOCAB) + 1,
            task="language_model",
        )


def stdlib_text(characters: int) -> str:
    """The first `characters` characters of the standard library's top-level modules, by file name."""
    root = Path(os.__file__).parent
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        chunk = path.read_text(encoding="utf-8", errors="replace")
        parts.append(chunk)
        total += len(chunk)
        if total >= characters:
            break
    return "".join(parts)[:characters]
