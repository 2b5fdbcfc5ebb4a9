"""A worker of `shoal run --control raft`: takes a generation and records itself as alive."""

import json
import os

from shoal.control import GENERATION, connect

rank = int(os.environ["RANK"])
with connect(os.environ["SHOAL_CONTROL"]) as ctl:
    generation = ctl.incr(GENERATION)
    ctl.register(f"worker{rank}", {"pid": os.getpid()}, ttl=30)
    print("RESULT " + json.dumps({"rank": rank, "generation": generation, "spec": os.environ["SHOAL_CONTROL"]}))
