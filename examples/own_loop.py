"""Your own training loop, distributed by one constructor.

shoal run -n 2 examples/own_loop.py            # 2 local processes
python examples/own_loop.py                    # 1 process, same code
"""

import argparse

import torch
from torch import nn

import shoal
from shoal.data.digits import Digits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    args = parser.parse_args()

    rt = shoal.init()
    torch.manual_seed(0)
    data = Digits().load(seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    strategy = shoal.DataParallel(grad_accum=1, clip_norm=None)
    model, optimizer = strategy.prepare(model, optimizer)
    loader = strategy.loader(data.train, batch_size=args.batch_size, shuffle=True, seed=0)
    for epoch in range(args.epochs):
        for x, y in loader:
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        result = strategy.evaluate(model, data.test, loss_fn)
        if rt.is_main:
            print(f"epoch {epoch}: loss {loss.item():.4f} test accuracy {result['eval_accuracy']:.4f}", flush=True)
    shoal.shutdown()


if __name__ == "__main__":
    main()
