"""A small GPT-style language model, laid out for splitting.

The model is a flat `nn.Sequential`: an embedding, N transformer blocks, a
head. A pipeline split cuts it between any two children and keeps their
names, so parameter names (and checkpoints) are the same in every layout.
Attention has separate q/k/v projections and infers its local head count
from the projection's output, so column-wise tensor parallelism (each rank a
subset of heads) needs no change to the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shoal.config import check_range
from shoal.errors import ConfigError


@dataclass
class GPT:
    layers: int = 4
    dim: int = 128
    heads: int = 4

    def __post_init__(self):
        check_range(self.layers, "layers", low=1)
        check_range(self.heads, "heads", low=1)
        if self.dim % self.heads:
            raise ConfigError(f"'dim' ({self.dim}) must be a multiple of 'heads' ({self.heads})", "dim")

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
        if len(input_shape) != 1:
            raise ConfigError(
                f"model 'gpt' needs token sequences, but the data set gives shape {input_shape}; "
                "use a language-model data set such as 'stdlib_chars'",
                "model.name",
            )
        context, vocab = input_shape[0], num_classes
        blocks = [Block(self.dim, self.dim // self.heads) for _ in range(self.layers)]
        return nn.Sequential(Embedding(vocab, self.dim, context), *blocks, Head(self.dim, vocab))


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int, context: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(context, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.tokens(ids) + self.positions(pos)


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, head_dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))
