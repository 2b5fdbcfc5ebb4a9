"""Save and resume the way a user's own script does: train, `torch.save` the
strategy's full state, `torch.load(..., weights_only=True)` it into a fresh
model (plain, or prepared under another strategy or world size) and go on.

`reference` is plain PyTorch in one process with the combined batch; `run`
is what each rank of a job does. The test (tests/multiproc/test_saving.py,
tests/unit/test_saving.py) compares the two.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shoal
from shoal.runtime import barrier

GLOBAL_BATCH = 16
STEPS = 2  # before saving, and again after resuming
STRATEGIES = {
    "data_parallel": shoal.DataParallel,
    "sharded": shoal.ShardedDataParallel,
    "tensor_parallel": shoal.TensorParallel,  # tp = the world: one Linear pair, column- then row-wise
}


def build_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.05)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, rank: int = 0, ranks: int = 1) -> None:
    """The user's loop; each data-parallel rank takes its slice of the global batch."""
    per_rank = GLOBAL_BATCH // ranks
    device = next(model.parameters()).device
    for step in steps:
        x, y = batch(step)
        x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def reference(steps: int) -> dict[str, Any]:
    """One process, plain PyTorch: the model and optimizer state after `steps` steps, the optimizer's by name."""
    model = build_model()
    optimizer = build_optimizer(model)
    train(model, optimizer, range(steps))
    names = [name for name, _ in model.named_parameters()]
    state = optimizer.state_dict()["state"]
    return {
        "model": model.state_dict(),
        "optimizer": {names[i]: {k: v.clone() for k, v in s.items()} for i, s in state.items()},
    }


def prepared(strategy_name: str, seed: int) -> tuple[shoal.Strategy, nn.Module, torch.optim.Optimizer]:
    """A fresh model (initialized from `seed`) and optimizer, prepared under a strategy."""
    strategy = STRATEGIES[strategy_name]()
    model = build_model(seed)
    model, optimizer = strategy.prepare(model, build_optimizer(model))
    return strategy, model, optimizer


def save_and_resume(rank: int, world: int, saved_under: str, resumed_under: str, out: str) -> dict[str, Any]:
    """Train STEPS steps under one strategy and save; resume under another, train STEPS more and save.

    Every rank saves what it got (`full-{rank}.pt`), to show every rank gets
    the whole state; the resumed run reads rank 0's file, as a script would.
    """
    folder = Path(out)
    strategy, model, optimizer = prepared(saved_under, seed=0)
    train(model, optimizer, range(STEPS), strategy.data_rank, strategy.data_world)
    torch.save(strategy.full_state_dict(model, optimizer), folder / f"full-{rank}.pt")
    # torch.save(model) says what to save instead; indexing the model still works
    result: dict[str, Any] = {"pickling": pickling_error(model), "sliced": type(strategy.unwrap(model)[:2]).__name__}
    if saved_under == "data_parallel" and rank == 0:
        torch.save(model.state_dict(), folder / "dp-model.pt")  # mnist's --save-model
        # and the prepared model takes plain names back, and DDP's prefixed ones
        plain = torch.load(folder / "dp-model.pt", weights_only=True)
        model.load_state_dict(plain)
        model.load_state_dict({f"module.{k}": v for k, v in plain.items()})
    barrier()

    strategy, model, optimizer = prepared(resumed_under, seed=1)  # other values: the load must set them all
    strategy.load_full_state_dict(model, torch.load(folder / "full-0.pt", weights_only=True), optimizer)
    train(model, optimizer, range(STEPS, 2 * STEPS), strategy.data_rank, strategy.data_world)
    resumed = strategy.full_state_dict(model, optimizer)
    if rank == 0:
        torch.save(resumed, folder / "resumed.pt")
    return result


def resume_alone(path: Path, strategy_name: str) -> dict[str, Any]:
    """Resume a saved state in a world of one (this process), train STEPS more; the full state."""
    strategy, model, optimizer = prepared(strategy_name, seed=1)
    strategy.load_full_state_dict(model, torch.load(path, weights_only=True), optimizer)
    train(model, optimizer, range(STEPS, 2 * STEPS))
    return strategy.full_state_dict(model, optimizer)


def pickling_error(model: nn.Module) -> str | None:
    """What `torch.save(model)` says (None: it saved)."""
    try:
        torch.save(model, io.BytesIO())
    except shoal.ShoalError as err:
        return str(err)
    return None


def assert_matches(full: dict[str, Any], want: dict[str, Any]) -> None:
    """A full state dict equals the reference: model by name, optimizer state by name (if `want` has it)."""
    model = build_model(seed=1)
    model.load_state_dict(full["model"])  # strict: the plain model's names, no more, no fewer
    for name, value in want["model"].items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=1e-5, rtol=1e-5)
    if "optimizer" not in want:
        return
    state = full["optimizer"]["state"]
    assert set(state) == set(want["optimizer"])
    for name, values in want["optimizer"].items():
        for key, value in values.items():
            torch.testing.assert_close(state[name][key], value, atol=1e-5, rtol=1e-5)
    groups = full["optimizer"]["param_groups"]
    assert [p for g in groups for p in g["params"]] == [name for name, _ in model.named_parameters()]
