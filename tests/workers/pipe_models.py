"""Models that are not an `nn.Sequential`, written as pytorch/examples writes them (mnist's `Net`,
a minGPT-style GPT), trained under `Pipeline(stages=2)` with each script's own loop: the worker
functions below run on every rank (`tests/multiproc/test_pipeline_models.py`), and `reference_*`
runs the same loop in one process with the whole batch."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

F = nn.functional

STEPS = 2
BATCH = 8


class Net(nn.Module):
    """pytorch/examples mnist/main.py's model, as written there."""

    def __init__(self, p1: float = 0.25, p2: float = 0.5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(p1)
        self.dropout2 = nn.Dropout(p2)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


class CausalSelfAttention(nn.Module):
    bias: torch.Tensor

    def __init__(self, dim: int, heads: int, block: int) -> None:
        super().__init__()
        # No bias: the key's bias has a zero gradient (softmax ignores it), and Adam turns the
        # rounding noise of a zero gradient into full steps that no tolerance can compare.
        self.c_attn = nn.Linear(dim, 3 * dim, bias=False)
        self.c_proj = nn.Linear(dim, dim)
        self.heads = heads
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (h.view(b, t, self.heads, c // self.heads).transpose(1, 2) for h in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, block: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, block)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(dim, 4 * dim), "c_proj": nn.Linear(4 * dim, dim)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x))))


class GPT(nn.Module):
    """minGPT's shape: embeddings and a position parameter, a ModuleList of blocks, ln_f, head."""

    def __init__(self, vocab: int = 16, dim: int = 32, heads: int = 4, layers: int = 4, block: int = 8) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Parameter(torch.randn(1, block, dim) * 0.02)
        self.drop = nn.Dropout(0.0)
        self.blocks = nn.ModuleList([Block(dim, heads, block) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """minGPT's contract: (logits, loss), the loss None without targets (the pipeline traces that case)."""
        t = idx.size(1)
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, :t, :])
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = gpt_loss(logits, targets)
        return logits, loss


def gpt_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 16, (n, 9), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def net_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [images(BATCH, 10 + i) for i in range(STEPS)]


def mnist_test(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """mnist's own `test()`: eval mode, model(x), summed NLL and correct count."""
    model.eval()
    test_loss, correct, outputs = 0.0, 0, []
    with torch.no_grad():
        for data, target in batches:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            pred = output.argmax(dim=1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
            outputs.append(output)
    return {"loss": test_loss, "correct": correct, "outputs": torch.cat(outputs).tolist()}


def test_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [images(10, 90), images(6, 91)]  # two shapes: the last batch is smaller


# ---------------------------------------------------------------- mnist
def reference_net() -> dict[str, Any]:
    torch.manual_seed(0)
    model = Net(0.0, 0.0)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    losses = []
    for data, target in net_batches():
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "test": mnist_test(model, test_batches()), "model": model, "optimizer": optimizer}


def train_net(rank: int, world: int, out: str) -> dict[str, Any]:
    """mnist's loop (optimizer made before prepare), clip_norm over both stages, then its own test()."""
    import shoal

    torch.manual_seed(0)
    model = Net(0.0, 0.0)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    strategy = shoal.Pipeline(stages=2, microbatches=2, loss_fn=F.nll_loss, clip_norm=0.5)
    model, optimizer = strategy.prepare(model, optimizer)
    model.train()
    losses = []
    for data, target in net_batches():
        optimizer.zero_grad()
        loss = model(data, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    test = mnist_test(model, test_batches())
    x, y = test_batches()[0]
    evaluated = strategy.evaluate(model, torch.utils.data.TensorDataset(x, y), F.nll_loss)
    torch.save(strategy.full_state_dict(model, optimizer), f"{out}/net.rank{rank}.pt")
    mine = [n for n, _ in model.named_parameters()]
    return {
        "losses": losses,
        "test": test,
        "evaluate": evaluated,
        "mine": mine,
        "dropout": eval_net_with_dropout(),
        "wrong_sampler": wrong_sampler(),
    }


def wrong_sampler() -> str:
    """The DDP tutorials' `DistributedSampler(ds)` splits by world rank: the two stages of one
    pipeline would take x and y from different batches. The first step says so."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    import shoal

    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 4, (64,)))
    loader = DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    strategy = shoal.Pipeline(stages=2, microbatches=2)
    model, _ = strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = next(iter(loader))
    try:
        model(x, y)
    except shoal.ShoalError as err:
        return str(err)
    return "trained on mismatched batches"


def eval_net_with_dropout() -> dict[str, Any]:
    """Eval mode turns the traced dropouts off: the output equals one process's eval output, on every rank."""
    import shoal

    torch.manual_seed(0)
    model = Net()
    strategy = shoal.Pipeline(stages=2, microbatches=2, split=["fc1"])
    model, _ = strategy.prepare(model)
    return mnist_test(model, test_batches())


# ---------------------------------------------------------------- minGPT
def gpt_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tokens(BATCH, 20 + i) for i in range(2 * STEPS)]


def reference_gpt() -> dict[str, Any]:
    """Each update: the two micro-batches of an accumulation as one batch."""
    torch.manual_seed(0)
    model = GPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches, losses = gpt_batches(), []
    for i in range(STEPS):
        x = torch.cat([batches[2 * i][0], batches[2 * i + 1][0]])
        y = torch.cat([batches[2 * i][1], batches[2 * i + 1][1]])
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    x, y = tokens(5, 99)
    model.eval()
    logits, loss = model(x, y)
    return {"losses": losses, "model": model, "optimizer": optimizer, "eval": logits.tolist(), "eval_loss": loss.item()}


def train_gpt(rank: int, world: int, out: str) -> dict[str, Any]:
    """minGPT's trainer loop (`_, loss = model(x, y)` becomes `loss = model(x, y)`): optimizer made after
    prepare, grad_accum=2, the user clips with `strategy.clip_grad_norm_`; then the full state loads into a
    fresh pipeline that predicts the same."""
    import shoal

    torch.manual_seed(0)
    strategy = shoal.Pipeline(stages=2, microbatches=2, loss_fn=gpt_loss, grad_accum=2)
    model, _ = strategy.prepare(GPT())
    optimizer = strategy.prepare_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    losses = []
    for x, y in gpt_batches():
        loss = model(x, y)
        loss.backward()
        strategy.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    full = strategy.full_state_dict(model, optimizer)
    torch.save(full, f"{out}/gpt.rank{rank}.pt")

    fresh = shoal.Pipeline(stages=2, microbatches=2, loss_fn=gpt_loss)
    torch.manual_seed(1)  # other initial values: the loaded state must replace them
    model2, _ = fresh.prepare(GPT())
    optimizer2 = fresh.prepare_optimizer(torch.optim.AdamW(model2.parameters(), lr=1e-2))
    fresh.load_full_state_dict(model2, full, optimizer2)
    again = fresh.full_state_dict(model2, optimizer2)
    same = all(torch.equal(again["model"][k], v) for k, v in full["model"].items())
    same = same and all(
        torch.equal(again["optimizer"]["state"][n]["exp_avg"], s["exp_avg"])
        for n, s in full["optimizer"]["state"].items()
    )
    model2.eval()
    x, y = tokens(5, 99)
    with torch.no_grad():  # minGPT's evaluation: the loss of a batch, and the logits
        eval_loss = model2(x, y).item()
    return {"losses": losses, "reloaded_equal": same, "eval": model2(x).tolist(), "eval_loss": eval_loss}
