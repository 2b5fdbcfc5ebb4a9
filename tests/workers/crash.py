"""Under `shoal run -n 2`: record each rank's pid, then rank 1 fails."""

import os
import sys
import time

import shoal

rt = shoal.init()
with open(os.path.join(sys.argv[1], f"pid{rt.rank}"), "w") as f:
    f.write(str(os.getpid()))
if rt.rank == 1:
    time.sleep(1)
    raise RuntimeError("disk quota exceeded (injected)")
time.sleep(120)
