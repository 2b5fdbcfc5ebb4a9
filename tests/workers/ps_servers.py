"""Under `shoal run -n 2 --servers S tests/workers/ps_servers.py [SERVERS]`: a
ParameterServer with `servers=SERVERS` (left out without the argument) trains
one step; each rank prints how many servers it trained with."""

import sys

import torch
from torch import nn

import shoal

rt = shoal.init()
kwargs = {"servers": int(sys.argv[1])} if len(sys.argv) > 1 else {}
strategy = shoal.ParameterServer(**kwargs)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
model, optimizer = strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
nn.functional.cross_entropy(model(torch.randn(4, 8)), torch.tensor([0, 1, 0, 1])).backward()
optimizer.step()
print(f"rank {rt.rank} trained with {len(strategy.session.layout.slices)} servers", flush=True)
strategy.close()
shoal.shutdown()
