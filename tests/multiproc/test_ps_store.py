"""A process on loopback that rewrites a server's endpoint in the job's store cannot redirect a worker."""

from __future__ import annotations

import json
import socket
import sys

import pytest

from shoal.ps import store as ps_store
from tests.helpers.cli import shoal
from tests.helpers.procs import Processes
from tests.helpers.ps import servers
from tests.helpers.ranks import start_ranks, wait_all
from tests.workers import ps_tasks

# The stranger knows the store's address and the key names; not the job key.
REWRITE = """
import sys
from datetime import timedelta
from torch.distributed import TCPStore
host, port, key, value = sys.argv[1:]
TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=10)).set(key, value)
"""


@pytest.mark.parametrize("signature", ["unsigned", "wrong key"])
def test_a_rewritten_server_endpoint_stops_the_worker_before_it_connects(signature, tmp_path):
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    trap.setblocking(False)
    forged = f"tcp://127.0.0.1:{trap.getsockname()[1]}"
    if signature == "wrong key":  # well formed, signed, but not with this job's key
        forged = f"{'0' * 64} {forged}"
    with Processes() as procs:
        group = servers(procs, 1)
        try:
            group.endpoints(timeout_s=30)  # the real server has published: the stranger writes over it
            host, port = group.address.rsplit(":", 1)
            rewrite = procs.start([sys.executable, "-c", REWRITE, host, port, ps_store.server_key(0), forged], 30)
            assert rewrite.wait().returncode == 0, rewrite.stderr
            args = {"task": "linear", "strategy": {"servers": 1, "consistency": "bsp", "timeout_s": 20}, "steps": 2}
            ranks = start_ranks(procs, ps_tasks.run, [args], 1, tmp_path, 60, group.env)
            (done,) = wait_all(ranks)
        finally:
            group.stop()
    with pytest.raises(BlockingIOError):
        trap.accept()  # nobody connected to the stranger's socket
    trap.close()
    assert done.returncode != 0
    # the harness prints the traceback; the error itself is one sentence naming the key
    (sentence,) = [line for line in done.stderr.splitlines() if line.startswith("shoal.errors.ShoalError: ")]
    assert "'shoal/ps/server/0'" in sentence and "is not signed with this job's key" in sentence


def test_a_local_job_listens_on_loopback_only_but_for_torchs_worker_store(tmp_path):
    out = tmp_path / "listeners.json"
    result = shoal("run", "-n", "2", "--servers", "1", "tests/workers/listeners.py", out, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(out.read_text())
    # the parameter-server store, the rendezvous store, the event monitor: loopback only;
    # torch's elastic agent opens the workers' bootstrap store (MASTER_PORT) itself, on every interface
    others = [(addr, port) for addr, port in seen["launcher"] if port != seen["master_port"]]
    assert len(others) >= 2 and all(addr == "127.0.0.1" for addr, _ in others), seen
