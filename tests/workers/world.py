"""Under `shoal run`: all-reduce each rank's number and print what was seen."""

import torch
import torch.distributed as dist

import shoal

rt = shoal.init()
t = torch.tensor([float(rt.rank + 1)])
dist.all_reduce(t)
print(f"rank {rt.rank} of {rt.world_size} sum {t.item():g}", flush=True)
shoal.shutdown()
