"""Your own loop, surviving a dead worker: three lines of `shoal.Recovery`.

shoal run -n 2 --max-restarts 3 examples/recover_loop.py
python examples/recover_loop.py                 # 1 process, same code (nothing to recover)

When a worker dies (or hangs past the process group's timeout, SHOAL_TIMEOUT_S),
torch's elastic agent stops the others and starts every worker again; `resume()`
then loads the newest recovery point that every rank has, and the loop goes on
from that step with the same model, optimizer, data position, LR schedule and
random state, so it ends with the parameters a run without the failure ends with.
"""

import argparse

import torch
from torch import nn

import shoal
from shoal.data.digits import Digits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--every", type=int, default=5, help="a recovery point every this many steps")
    parser.add_argument("--out", default="", help="rank 0 saves the final model and optimizer state here")
    args = parser.parse_args()

    rt = shoal.init()
    torch.manual_seed(0)
    data = Digits().load(seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    loss_fn = nn.CrossEntropyLoss()

    strategy = shoal.DataParallel()
    model, optimizer = strategy.prepare(model, optimizer)
    loader = strategy.loader(data.train, batch_size=args.batch_size, shuffle=True, seed=0)

    recovery = shoal.Recovery(strategy, model, optimizer, loader=loader, schedule=scheduler, every=args.every)
    start = recovery.resume()  # 0 on a fresh start; after a restart, the step of the newest recovery point
    if start and rt.is_main:
        print(f"restarted: resuming at step {start}", flush=True)
    batches = loader.forever()  # made after resume(): it starts at the restored data position
    for step in range(start, args.steps):
        x, y = next(batches)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        recovery.save()  # a recovery point every `every` steps (the step comes from the optimizer)
        if rt.is_main and (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}", flush=True)

    result = strategy.evaluate(model, data.test, loss_fn)
    state = strategy.full_state_dict(model, optimizer)
    if rt.is_main:
        print(f"test accuracy {result['eval_accuracy']:.4f}", flush=True)
        if args.out:
            torch.save(state, args.out)
    shoal.shutdown()


if __name__ == "__main__":
    main()
