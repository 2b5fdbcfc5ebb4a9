"""Under `shoal run -n 4`: train each model-parallel layout for a few steps and
save every rank's (gathered) parameters and last loss, for comparison with one
process on the combined batch. Pipelines train with the hand-written loop
`loss = model(x, y); loss.backward(); optimizer.step()`. The 1F1B pipeline also saves a checkpoint, its full state
dict and an eval-mode output on every rank."""

import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor

import shoal
from shoal.data.synthetic import Synthetic
from shoal.models.gpt import GPT

STEPS = 6
BATCH = 8  # per data-parallel rank
SCENARIOS = {  # name: (model kind, strategy factory, data-parallel degree)
    "pipeline_gpipe": (
        "mlp",
        lambda: shoal.Pipeline(stages=2, microbatches=4, schedule="gpipe", dp=2, split="params"),
        2,
    ),
    "pipeline_1f1b": (
        "mlp",
        lambda: shoal.Pipeline(stages=2, microbatches=4, schedule="1f1b", dp=2, split="params"),
        2,
    ),
    "pipeline_interleaved": (
        "mlp",
        lambda: shoal.Pipeline(stages=2, microbatches=4, schedule="interleaved", dp=2, split="params"),
        2,
    ),
    "tensor_mlp": ("mlp", lambda: shoal.TensorParallel(dp=2), 2),
    "tensor_gpt": ("gpt", lambda: shoal.TensorParallel(dp=2), 2),
    "sharded": ("mlp", lambda: shoal.ShardedDataParallel(), 4),
}


def build(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    if kind == "gpt":
        return GPT(layers=2, dim=32, heads=4).build((8,), 16)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(16, 32),
        nn.Tanh(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 16),
        nn.Tanh(),
        nn.Linear(16, 4),
    )


def data(kind: str):
    if kind == "gpt":
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 16, (256, 9), generator=g)
        return torch.utils.data.TensorDataset(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    return Synthetic(samples=256, features=16, classes=4, test_fraction=0.25).load(seed=0).train


def loss_fn(kind: str):
    if kind == "gpt":
        return lambda out, y: nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return nn.functional.cross_entropy


def main(out: Path) -> None:
    rt = shoal.init()
    for name, (kind, make, _dp) in SCENARIOS.items():
        model = build(kind)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        strategy = make()
        model, opt = strategy.prepare(model, opt)
        batches = strategy.loader(data(kind), batch_size=BATCH, seed=3).forever()
        for _ in range(STEPS):
            if name.startswith("pipeline"):  # the ordinary loop the docs promise, loss on the last stage
                x, y = next(batches)
                loss = model(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad()
            else:
                loss = strategy.train_step(model, opt, loss_fn(kind), next(batches))
        params = {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in strategy.unwrap(model).named_parameters()
        }
        torch.save({"params": params, "loss": float(loss)}, out / f"{name}.rank{rt.rank}.pt")
        if name == "pipeline_1f1b":
            dcp.save(strategy.checkpoint_state(model, opt), checkpoint_id=str(out / "ckpt_pipeline"))
            full = strategy.full_state_dict(model, opt)  # every stage's tensors, on every rank
            model.eval()
            x, _ = next(batches)
            full["eval"] = {"x": x, "out": model(x)}  # the output on every rank, not only the last stage's
            torch.save(full, out / f"full_pipeline.rank{rt.rank}.pt")
    shoal.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
