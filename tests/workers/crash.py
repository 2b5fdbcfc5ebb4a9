"""Under `shoal run -n 2 [--servers 1] tests/workers/crash.py OUT_DIR dp|ps`: each
rank writes its pid to OUT_DIR/pid<rank>, then trains a small model for a few
steps, data parallel or on one parameter server (BSP, 5 s timeout). The fault
schedule in SHOAL_FAULTS makes a worker or the server fail at a chosen step."""

import os
import sys

import torch
from torch import nn

import shoal

STEPS = 20


def main(out: str, kind: str) -> None:
    rt = shoal.init()
    with open(os.path.join(out, f"pid{rt.rank}"), "w") as f:
        f.write(str(os.getpid()))
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = shoal.DataParallel() if kind == "dp" else shoal.ParameterServer(servers=1, timeout_s=5)
    model, opt = strategy.prepare(model, opt)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(rt.rank))
    for _ in range(STEPS):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    strategy.close()
    shoal.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
