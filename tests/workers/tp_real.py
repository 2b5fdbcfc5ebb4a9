"""A user's own training loop under `shoal.TensorParallel`, written as the
pytorch/examples scripts write theirs: a model with layers outside the plan,
a `DistributedSampler` and `DataLoader`, torch's `clip_grad_norm_`, a
`GradScaler`, and no common seed. Run on each rank by
tests/multiproc/test_tensor_parallel.py, which trains the same loop in one
process for reference."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import shoal

STEPS = 4
BATCH = 8
CLIP = 0.5
SCENARIOS = {  # name: (dropout, clip with torch's clip_grad_norm_, TensorParallel(clip_norm=CLIP), GradScaler)
    "user_clip": (0.0, True, False, False),
    "option_clip": (0.0, False, True, False),
    "scaler": (0.0, True, False, True),
    "dropout": (0.3, True, False, False),
}


class Net(nn.Module):
    """An embedding, a LayerNorm, dropout and a head around one splittable MLP."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 16)
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.norm(self.emb(ids)))
        return self.head(self.drop(h + self.mlp(h)).mean(1))


class MnistNet(nn.Module):
    """pytorch/examples mnist's `Net` (smaller): nothing the automatic plan can split."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(torch.relu(self.conv1(x)), 1))))


class Attention(nn.Module):
    """minGPT-ddp's attention layer: torch's MultiheadAttention given a mask buffer by keyword."""

    def __init__(self, dim: int, context: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(context, context)) == 0)
        self.attn = nn.MultiheadAttention(dim, 2, dropout=dropout, batch_first=True)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        return self.drop(self.proj(self.attn(x, x, x, attn_mask=self.mask[:t, :t])[0]))


class Block(nn.Module):
    def __init__(self, dim: int, context: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, context, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Stem(nn.Module):
    """minGPT-ddp's embedding stem: a position parameter of its own beside its children."""

    def __init__(self, vocab: int, dim: int, context: int, dropout: float) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.tok(ids) + self.pos[:, : ids.shape[1]])


class MiniGPT(nn.Module):
    """The shape of pytorch/examples minGPT-ddp's GPT (small): `model(x, y)` returns (logits, loss)."""

    def __init__(self, dropout: float = 0.0, vocab: int = 12, dim: int = 16, context: int = 6) -> None:
        super().__init__()
        self.stem = Stem(vocab, dim, context, dropout)
        self.blocks = nn.Sequential(Block(dim, context, dropout), Block(dim, context, dropout))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        logits = self.head(self.ln_f(self.blocks(self.stem(ids))))
        if targets is None:
            return logits, None
        return logits, nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_gpt(model: nn.Module, opt: torch.optim.Optimizer) -> list:
    """minGPT-ddp's loop: the model computes its loss. The same code here and in the reference."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 12, (STEPS, BATCH, 7), generator=g)
    norms = []
    for batch in ids:
        opt.zero_grad()
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
    return norms


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randint(0, 16, (64, 6), generator=g), torch.randint(0, 4, (64,), generator=g))


def loader(num_replicas: int, rank: int) -> DataLoader:
    ds = dataset()
    return DataLoader(
        ds, batch_size=BATCH, sampler=DistributedSampler(ds, num_replicas=num_replicas, rank=rank, seed=0)
    )


def train(model: nn.Module, opt: torch.optim.Optimizer, data: DataLoader, clip: bool, scaler: Any = None) -> list:
    """The loop itself: the same code here and in the one-process reference. Returns the clipped norms."""
    norms = []
    for step, (x, y) in enumerate(data):
        if step == STEPS:
            break
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if clip:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return norms


def parameters(model: nn.Module) -> dict:
    """Whole parameters by name, and the names of the replicated ones (as this rank holds them)."""
    params, replicated = {}, []
    for n, p in model.named_parameters():
        if isinstance(p, DTensor) and all(isinstance(pl, Replicate) for pl in p.placements):
            replicated.append(n)
            params[n] = p.to_local().tolist()  # this rank's own copy, compared bit for bit
        else:
            params[n] = (p.full_tensor() if isinstance(p, DTensor) else p).tolist()
    return {"params": params, "replicated": replicated}


def real_loop(rank: int, world: int) -> dict:
    results: dict[str, Any] = {}
    for name, (dropout, user_clip, option_clip, scaler) in SCENARIOS.items():
        torch.manual_seed(100 + rank)  # no common seed: prepare() must start every rank from rank 0's weights
        model = Net(dropout)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        strategy = shoal.TensorParallel(clip_norm=CLIP if option_clip else None)
        model, opt = strategy.prepare(model, opt)
        grad_scaler = torch.amp.GradScaler("cpu") if scaler else None
        norms = train(model, opt, loader(strategy.data_world, strategy.data_rank), user_clip, grad_scaler)
        results[name] = {"norms": norms, **parameters(model)}

    for dropout in (0.0, 0.1):
        torch.manual_seed(100 + rank)
        model = MiniGPT(dropout)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = shoal.TensorParallel().prepare(model, opt)
        norms = train_gpt(model, opt)
        results[f"mingpt_{dropout}"] = {"norms": norms, **parameters(model)}

    model = Net()
    strategy = shoal.TensorParallel()
    model, opt = strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    try:
        train(model, opt, loader(world, rank), clip=False)  # split by world rank: wrong under TP
    except shoal.ShoalError as err:
        results["world_sampler"] = str(err)
    try:
        mnist = MnistNet()
        shoal.TensorParallel().prepare(mnist, torch.optim.SGD(mnist.parameters(), lr=0.1))
    except shoal.ShoalError as err:
        results["nothing_to_split"] = str(err)
    return results
