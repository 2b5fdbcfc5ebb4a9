"""Under `shoal run -n 2 --servers 1 tests/workers/ps_no_close.py`: the README's loop under the
parameter server, ending without `strategy.close()` or `shoal.shutdown()`, rank 1 a while after
rank 0 (as a rank that evaluates or saves does); each rank prints when it is done."""

import time

import torch
from torch import nn

import shoal

rt = shoal.init()
torch.manual_seed(0)
model = nn.Linear(8, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
strategy = shoal.ParameterServer(consistency="bsp")
model, optimizer = strategy.prepare(model, optimizer)
x = torch.randn(64, 8)
data = torch.utils.data.TensorDataset(x, (x.sum(1) > 0).long())
for xb, yb in strategy.loader(data, batch_size=8, shuffle=True, seed=0):
    nn.functional.cross_entropy(model(xb), yb).backward()
    optimizer.step()
    optimizer.zero_grad()
if rt.rank == 1:
    time.sleep(2)
print(f"done {rt.rank}", flush=True)
