"""pytorch/examples' word_language_model (an LSTM), ported to shoal by changing the
constructor: characters of the standard library's source instead of WikiText-2, the
original's hand-written SGD update, gradient clipping, and its rank-local decisions
(anneal the learning rate when validation got worse, keep the best model).

    shoal run -n 2 examples/word_language_model.py --epochs 2
    shoal run -n 2 examples/word_language_model.py --strategy sharded
    python examples/word_language_model.py                         # one process

The decisions are taken on `strategy.mean_over_ranks(val_loss)`, the same
number on every rank: under data_parallel and sharded each rank's own figure
would agree anyway, but not under ASP/SSP, where every rank holds its own
model. Under the parameter server the update must be `optimizer.step()` with an
optimizer given to the strategy (the servers apply it): this script's hand-written
update stops with one sentence saying so.
"""

import argparse
import math

import torch
import torch.nn.functional as F  # noqa: N812  (the original's name)
from torch import nn
from torch.utils.data import DataLoader

import shoal
from shoal.data.chars import StdlibChars


class RNNModel(nn.Module):
    def __init__(self, ntoken, ninp, nhid, nlayers, dropout=0.2):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nlayers, self.nhid = nlayers, nhid

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


def evaluate(model, raw, loader, criterion):
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for data, targets in loader:
            data, targets = data.t(), targets.t()
            output, _ = model(data, raw.init_hidden(data.size(1)))
            total += criterion(output, targets.reshape(-1)).item() * targets.numel()
            count += targets.numel()
    return total / count


STRATEGIES = {
    "data_parallel": lambda: shoal.DataParallel(),
    "sharded": lambda: shoal.ShardedDataParallel(),
    "parameter_server": lambda: shoal.ParameterServer(consistency="bsp"),
}


def main():
    parser = argparse.ArgumentParser(description="PyTorch LSTM language model, on shoal")
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--clip", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=16, help="per worker")
    parser.add_argument("--steps", type=int, default=40, help="steps per epoch (the data set is large)")
    parser.add_argument("--seed", type=int, default=1111)
    parser.add_argument("--save", default="model.pt")
    parser.add_argument("--strategy", default="data_parallel", choices=sorted(STRATEGIES))
    args = parser.parse_args()

    rt = shoal.init()
    torch.manual_seed(args.seed)
    data = StdlibChars(context=32, characters=120_000).load(seed=0)
    val_loader = DataLoader(data.test, batch_size=64)
    model = RNNModel(data.num_classes, 32, 64, 2)
    criterion = nn.NLLLoss()

    strategy = STRATEGIES[args.strategy]()
    model, _ = strategy.prepare(model)  # no optimizer: the update below is written by hand
    raw = strategy.unwrap(model)  # the RNNModel itself, for init_hidden
    loader = strategy.loader(data.train, batch_size=args.batch_size, shuffle=True, seed=args.seed)

    lr, best_val_loss = args.lr, None
    for epoch in range(1, args.epochs + 1):
        model.train()
        for step, (data_batch, targets) in enumerate(loader):
            if step == args.steps:
                break
            data_batch, targets = data_batch.t(), targets.t()
            hidden = raw.init_hidden(data_batch.size(1))
            model.zero_grad()
            output, hidden = model(data_batch, hidden)
            loss = criterion(output, targets.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
        # Every rank takes the decisions below alone: decide on a figure they share (under
        # ASP/SSP each rank's own model, and so its own validation, differs).
        val_loss = strategy.mean_over_ranks(evaluate(model, raw, val_loader, criterion))
        print(f"| end of epoch {epoch} | valid loss {val_loss:5.3f} | valid ppl {math.exp(val_loss):8.2f} | lr {lr}")
        state = strategy.full_state_dict(model)  # collective: every rank calls it
        if best_val_loss is None or val_loss < best_val_loss:
            if rt.is_main:
                torch.save(state["model"], args.save)
            best_val_loss = val_loss
        else:
            lr /= 4.0  # the same val_loss on every rank: every rank anneals alike
    print(f"best valid loss {best_val_loss:.4f} final lr {lr}", flush=True)
    shoal.shutdown()


if __name__ == "__main__":
    main()
