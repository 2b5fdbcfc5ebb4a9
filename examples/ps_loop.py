"""Your own loop on a parameter server: data on the workers, parameters on servers.

shoal run -n 2 --servers 2 examples/ps_loop.py --consistency ssp --staleness 2
"""

import argparse

import torch
from torch import nn

import shoal
from shoal.data.digits import Digits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--consistency", default="bsp", choices=["bsp", "asp", "ssp"])
    parser.add_argument("--staleness", type=int, default=0)
    parser.add_argument("--servers", type=int, default=None, help="default: as many as shoal run --servers started")
    args = parser.parse_args()

    rt = shoal.init()
    torch.manual_seed(0)
    data = Digits().load(seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    strategy = shoal.ParameterServer(
        consistency=args.consistency,
        staleness=args.staleness,
        servers=args.servers,
        overrides={"3.*": "asp"} if args.consistency == "bsp" else {},
    )
    model, optimizer = strategy.prepare(model, optimizer)
    loader = strategy.loader(data.train, batch_size=32, shuffle=True, seed=0)
    # 0 at first; in a worker restarted while the servers ran (shoal run --max-restarts), the steps they hold
    # from it: go on from there, where the data stood
    start = strategy.clock
    loader.load_state_dict({"epoch": start // len(loader), "index": start % len(loader)})
    for epoch in range(start // len(loader), args.epochs):
        for x, y in loader:
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        result = strategy.evaluate(model, data.test, loss_fn)
        if rt.is_main:
            m = strategy.step_metrics()
            print(
                f"epoch {epoch}: loss {loss.item():.4f} test accuracy {result['eval_accuracy']:.4f} "
                f"wait {100 * m['ps_wait_frac']:.0f}% staleness {m['ps_staleness']:.2f}",
                flush=True,
            )
    strategy.close()
    shoal.shutdown()


if __name__ == "__main__":
    main()
