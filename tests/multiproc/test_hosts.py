"""Jobs across test hosts (network namespaces joined by a bridge): each host runs
its own `shoal run` launcher with --nnodes/--node-rank/--rdzv-endpoint, and
every byte between them crosses a veth link, from an address of its own."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shoal import env
from shoal.config import etcd_client_installed
from shoal.ps.servers import REPLACEMENT_MARK
from tests.helpers.cli import SHOAL, finish
from tests.helpers.faults import Faults
from tests.helpers.hosts import TestHosts, can_make_hosts
from tests.helpers.procs import Proc, Processes
from tests.workers import dp_equivalence as worker
from tests.workers import ps_equivalence, ps_tasks

pytestmark = pytest.mark.skipif(bool(can_make_hosts()), reason=can_make_hosts() or "test hosts can be made")
PORT = 29400  # any port: the hosts' namespaces are the test's own


def launcher(
    hosts: TestHosts, procs: Processes, i: int, script: list[str], *flags: str, job: dict, port=PORT, timeout=150.0
) -> Proc:
    """Host i's `shoal run -n 1`, host 0 holding the rendezvous at `port`."""
    argv = [*SHOAL, "run", "-n", "1", "--nnodes", str(len(hosts)), "--node-rank", str(i)]
    argv += ["--rdzv-endpoint", f"{hosts[0].address}:{port}", *flags, *script]
    return procs.start(hosts[i].argv(argv), timeout=timeout, env=job)


def launchers(hosts: TestHosts, procs: Processes, script: list[str], *flags: str) -> list:
    """One `shoal run` per host, host 0 holding the rendezvous; their results."""
    job = {env.JOB_KEY: secrets.token_hex(16)}
    started = [launcher(hosts, procs, i, script, *flags, job=job) for i in range(len(hosts))]
    return [finish(p) for p in started]  # all started before any is waited for: each waits for the others


def test_data_parallel_on_two_hosts_equals_one_process(tmp_path):
    out = tmp_path / "params.pt"
    with TestHosts(2) as hosts, Processes() as procs:
        done = launchers(hosts, procs, ["tests/workers/dp_equivalence.py", str(out)])
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    got = torch.load(out, weights_only=True)
    for name, batch in (("plain", 16), ("accum", 64)):
        want = worker.single_process(batch=batch, clip=None)
        for key in want:
            torch.testing.assert_close(got[name][key], want[key], atol=1e-5, rtol=0)


def test_parameter_servers_on_two_hosts_serve_workers_on_both(tmp_path):
    """Host k starts server k; each worker pushes to a server on the other host too (BSP, `--max-restarts
    2`). The job's Raft control plane (`--control raft`) spreads its members over both hosts (two on host
    0, one on host 1) and holds the shards' records (`shoal.ps.records`). At step 3 host 1's launcher is
    SIGKILLed (its worker, rank 1, kills its parent): server process 1 goes with it and process 0 takes
    shard 1 over; host 1's supervisor ends what is left and starts the launcher again, which starts server
    process 1 again as a replacement (the backup of both shards again) and its worker; host 0's agent
    restarts its healthy worker into the new round (`shoal.launch.rounds`); both rejoin the servers at
    their clocks and the run ends at one process's parameters, with nobody's help. A host whose launcher
    asks for another server count is told, in one sentence."""
    out = tmp_path / "params.json"
    script = ["tests/workers/ps_equivalence.py", str(out), "2"]
    # the orphaned worker sleeps right after, so that it dies with its launcher at a known point, before it
    # pushes step 3 (a death between its pushes to the two servers is test_ps_recovery's BSP case)
    faults = Faults(tmp_path).kill_launcher("worker", rank=1, step=3).sleep("worker", rank=1, step=3, seconds=2)
    with TestHosts(2) as hosts, Processes() as procs:
        hosts.shape(1, rate="1gbit")  # a real link between the hosts, not loopback speed
        job = {env.JOB_KEY: secrets.token_hex(16)}
        flags = ["--servers", "2", "--control", "raft", "--max-restarts", "2"]
        started = [
            launcher(
                hosts, procs, i, script, *flags, "--log-dir", str(tmp_path / f"host{i}"), job={**job, **faults.env()}
            )
            for i in (0, 1)
        ]
        done = [finish(p) for p in started]
        assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
        addresses = [h.address for h in hosts.hosts]
        # host 0 waits for host 1's workers (killed on leaving the block); host 1 asks for 3 servers
        launcher(hosts, procs, 0, script, "--servers", "2", job=job, port=PORT + 1, timeout=60)
        wrong = finish(launcher(hosts, procs, 1, script, "--servers", "3", job=job, port=PORT + 1, timeout=60))
    assert wrong.returncode == 2 and "pass the same --servers on every machine" in wrong.stderr, wrong.stderr[-2000:]
    for d, here in zip(done, (2, 1), strict=True):
        members = re.search(r"shoal: control plane raft://(\S+) \((\d) of its members here\)", d.stderr)
        assert members is not None, d.stderr[-2000:]
        hosts_of = [m.split(":")[0] for m in members.group(1).split(",")]
        assert hosts_of == [addresses[0], addresses[1], addresses[0]] and int(members.group(2)) == here
    faults.assert_fired("worker", 1, 3, "kill-launcher")
    said = done[1].stderr
    assert "launcher was killed by SIGKILL; ended the" in said and "started it again (1 of 2)" in said, said[-3000:]
    assert "parameter server process(es) 1 of this machine start as replacements" in said, said[-3000:]
    assert [p.name for p in (tmp_path / "host0").glob("server*.log")] == ["server0.log"]
    assert [p.name for p in (tmp_path / "host1").glob("server*.log")] == ["server1.log"]
    server0 = (tmp_path / "host0" / "server0.log").read_text()
    assert "server process 0 took shard 1 over" in server0, server0[-3000:]
    replacement = (tmp_path / "host1" / "server1.log").read_text().split(REPLACEMENT_MARK)[-1]
    assert sorted(re.findall(r"is the backup of shard (\d) again", replacement)) == ["0", "1"], replacement[-3000:]
    got = json.loads(out.read_text())
    want = ps_tasks.single_process("sgd", ps_equivalence.STEPS, world=2)
    for name, value in want.items():
        np.testing.assert_allclose(np.asarray(got[name]), value, atol=1e-5, rtol=0, err_msg=name)


def test_servers_on_hosts_without_workers_equal_one_process_and_outlive_a_launcher(tmp_path):
    """Two parameter servers, each on a host of its own (`--server-nodes 2 --server-node-rank J`), one
    worker on each of two other hosts: BSP ends at one process's parameters. The shards are replicated
    (the default with 2 servers), so when host 3's launcher is SIGKILLed at the servers' clock 3 (by its
    server process 1), that server goes too, as a killed process (`shoal.ps.process`: every shard it
    held has its other copy), process 0 takes shard 1 over, and the job ends right without it."""
    out = tmp_path / "params.json"
    script = ["tests/workers/ps_equivalence.py", str(out), "2"]
    # then it sleeps until it notices that its launcher is gone: else, under load, the 6 short steps
    # ended on its own copy of shard 1 before it did, and no takeover came
    faults = Faults(tmp_path).kill_launcher("server", rank=1, step=3).sleep("server", rank=1, step=3, seconds=2)
    with TestHosts(4) as hosts, Processes() as procs:
        job = {env.JOB_KEY: secrets.token_hex(16), **faults.env()}
        common = ["--servers", "2", "--server-nodes", "2", "--rdzv-endpoint", f"{hosts[0].address}:{PORT}"]
        started = []
        for i in (0, 1):
            argv = [*SHOAL, "run", "-n", "1", "--nnodes", "2", "--node-rank", str(i), *common]
            argv += ["--log-dir", str(tmp_path / f"host{i}"), *script]
            started.append(procs.start(hosts[i].argv(argv), timeout=150, env=job))
        for j in (0, 1):
            argv = [*SHOAL, "run", "--server-node-rank", str(j), *common, "--log-dir", str(tmp_path / f"host{2 + j}")]
            started.append(procs.start(hosts[2 + j].argv(argv), timeout=150, env=job))
        done = [finish(p) for p in started]
    codes = [d.returncode for d in done]
    assert codes[:3] == [0, 0, 0] and codes[3] == -9, "\n----\n".join(d.stderr[-3000:] for d in done)
    faults.assert_fired("server", 1, 3, "kill-launcher")
    assert [p.name for p in (tmp_path / "host2").glob("server*.log")] == ["server0.log"]
    assert [p.name for p in (tmp_path / "host3").glob("server*.log")] == ["server1.log"]
    assert not list((tmp_path / "host0").glob("server*.log")) and not list((tmp_path / "host1").glob("server*.log"))
    server0 = (tmp_path / "host2" / "server0.log").read_text()
    assert "server process 0 took shard 1 over" in server0, server0[-3000:]
    got = json.loads(out.read_text())
    want = ps_tasks.single_process("sgd", ps_equivalence.STEPS, world=2)
    for name, value in want.items():
        np.testing.assert_allclose(np.asarray(got[name]), value, atol=1e-5, rtol=0, err_msg=name)


LOOP = ["examples/recover_loop.py", "--steps", "12", "--every", "5"]


@pytest.fixture(scope="module")
def loop_without_faults(tmp_path_factory) -> Path:
    """The parameters that LOOP ends with in a fault-free run of two workers on one host."""
    out = tmp_path_factory.mktemp("want") / "want.pt"
    one_thread = {**os.environ, env.THREADS: "1"}  # as two workers on one host get: the same float sums
    want = subprocess.run(
        [*SHOAL, "run", "-n", "2", *LOOP, "--out", str(out)], capture_output=True, timeout=120, env=one_thread
    )
    assert want.returncode == 0, want.stderr[-3000:]
    return out


@pytest.mark.parametrize("backend", ["c10d", "static"])
def test_a_late_node_and_a_killed_launcher_come_back_by_itself_bit_identical(tmp_path, backend, loop_without_faults):
    """`--rdzv-backend c10d --max-restarts 2`: host 1's launcher starts after host 0's and joins. At step 7
    host 1's launcher is SIGKILLed (its worker, rank 1, kills its parent); host 1's supervisor ends the
    orphaned worker and starts the launcher again, which rejoins; torch's agent on host 0 restarts its
    worker; both resume from the newest recovery point (host 1's kept by its supervisor), and the run
    ends with the parameters of the fault-free one-host run, bit for bit, with nobody's help. At step 11
    host 1's launcher hangs (SIGSTOP); its worker finishes, and after the 8 s timeout the supervisor
    ends the launcher and exits 0 instead of waiting for it. The job runs a control plane (`--control
    raft`: members 0 and 2 on host 0, member 1 on host 1): the supervisor ends member 1 with the worker,
    and the new launcher starts it again on the same address from its journal (a term > 0 at start,
    which a new member never has), after its first write committed.

    `static` (the default rendezvous, in rounds with restarts: `shoal.launch.rounds`), kept short: the
    kill only, both launchers at once, no control plane; machine 0 on host 1 (the higher address, so
    that gloo has machine 0's worker connect to the others' after a restart). In both, the orphaned worker
    sleeps at step 8, so that it dies with its launcher before it reaches a later step (12 short steps:
    under load it once reached step 11 within 20 ms of the kill and stopped its dying launcher, not the
    new one)."""
    static = backend == "static"
    faults = Faults(tmp_path).kill_launcher("worker", rank=1, step=7)  # ranks follow the hosts' addresses
    # The orphaned worker sleeps until it dies with its launcher: else it runs on with rank 0 for a few
    # steps, may finish the short job first, or (c10d) fire the step-11 fault at the dying launcher.
    faults.sleep("worker", rank=1, step=8, seconds=2)
    if not static:
        faults.stop_launcher("worker", rank=1, step=11, seconds=120)  # hung past the 8 s timeout, workers done
    with TestHosts(2) as hosts, Processes() as procs:
        job = {env.JOB_KEY: secrets.token_hex(16), env.THREADS: "1", env.TIMEOUT_S: "8", **faults.env()}

        on = [hosts[1], hosts[0]] if static else [hosts[0], hosts[1]]  # machine i runs on host on[i]

        def node(i: int) -> Proc:
            argv = [*SHOAL, "run", "-n", "1", "--nnodes", "2", "--rdzv-backend", backend, "--max-restarts", "2"]
            argv += ["--node-rank", str(i)] + ([] if static else ["--control", "raft"])  # places the members
            argv += ["--rdzv-endpoint", f"{on[0].address}:{PORT}", *LOOP, "--out", str(tmp_path / "got.pt")]
            return procs.start(on[i].argv(argv), timeout=180, env=job, name=f"host{i}")

        first = node(0)
        if not static:
            time.sleep(3)  # host 0 waits in the rendezvous for a host that is not there yet
        late = node(1)
        done = [finish(first), finish(late)]
        host1 = hosts[1].address
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    faults.assert_fired("worker", 1, 7, "kill-launcher")
    if static:  # its worker
        assert "launcher was killed by SIGKILL; ended the 1 process(es) it left and started it again (1 of 2)" in (
            done[1].stderr
        ), done[1].stderr[-3000:]
        assert done[0].stdout.count("restarted: resuming at step 5") == 1, done[0].stdout[-3000:]
        assert_bit_identical(tmp_path / "got.pt", loop_without_faults)
        return
    stopped = faults.assert_fired("worker", 1, 11, "stop-launcher")
    assert stopped["pid"] != faults.assert_fired("worker", 1, 7, "kill-launcher")["pid"]  # the restarted worker
    said = done[1].stderr
    # its worker and control member 1
    assert "launcher was killed by SIGKILL; ended the 2 process(es) it left and started it again (1 of 2)" in said
    planes = re.findall(r"shoal: control plane raft://(\S+) \(1 of its members here\)", said)
    assert len(planes) == 2 and planes[0] == planes[1], said[-3000:]  # the same addresses, twice
    member1 = planes[0].split(",")[1]
    assert member1.startswith(f"{host1}:"), planes
    back = re.search(rf"shoal: control member 1 came back on {re.escape(member1)} with its journal \(term (\d+)", said)
    assert back is not None and int(back.group(1)) > 0, said[-3000:]
    assert "launcher hung (stopped for 8 s) after its workers finished; ended it" in said, said[-3000:]
    assert done[0].stdout.count("restarted: resuming at step 5") == 1, done[0].stdout[-3000:]
    assert_bit_identical(tmp_path / "got.pt", loop_without_faults)


def assert_bit_identical(got_path, want_path) -> None:
    got, expected = torch.load(got_path, weights_only=True), torch.load(want_path, weights_only=True)
    for key, value in expected["model"].items():
        torch.testing.assert_close(got["model"][key], value, atol=0, rtol=0)
    for key, state in expected["optimizer"]["state"].items():
        torch.testing.assert_close(got["optimizer"]["state"][key], state, atol=0, rtol=0)


ETCD = shutil.which("etcd")


@pytest.mark.skipif(ETCD is None, reason="no etcd binary (apt-get install etcd-server)")
@pytest.mark.skipif(
    not etcd_client_installed(),
    reason="torch's etcd rendezvous imports python-etcd (the `etcd` module), which the test extra installs",
)
def test_etcd_rendezvous_takes_a_late_node(tmp_path):
    """`--rdzv-backend etcd-v2`: an etcd (v2 API) on host 0; host 1's launcher starts late and joins."""
    with TestHosts(2) as hosts, Processes() as procs:
        address, client, peer = hosts[0].address, f"http://{hosts[0].address}:2379", f"http://{hosts[0].address}:2380"
        argv = [ETCD, "--name", "r", "--data-dir", str(tmp_path / "etcd"), "--enable-v2"]
        argv += ["--listen-client-urls", client, "--advertise-client-urls", client, "--listen-peer-urls", peer]
        argv += ["--initial-advertise-peer-urls", peer, "--initial-cluster", f"r={peer}"]
        server = procs.start(hosts[0].argv(argv), timeout=240, name="etcd")
        deadline = time.monotonic() + 30
        while "ready to serve client requests" not in server.stderr():
            assert server.poll() is None and time.monotonic() < deadline, server.stderr()[-2000:]
            time.sleep(0.1)
        job = {env.JOB_KEY: secrets.token_hex(16)}

        def node(i: int):
            argv = [*SHOAL, "run", "-n", "1", "--nnodes", "2", "--rdzv-backend", "etcd-v2"]
            argv += ["--rdzv-endpoint", f"{address}:2379", "tests/workers/rejoin.py", "10", "0.1"]
            return procs.start(hosts[i].argv(argv), timeout=180, env=job, name=f"node{i}")

        first = node(0)
        time.sleep(3)  # host 0 waits in the rendezvous for a host that is not there yet
        late = node(1)  # started before waiting on host 0, which waits for it
        done = [finish(first), finish(late)]
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    assert any("done: world 2" in d.stdout for d in done), done[0].stdout[-2000:]


LISTEN = """
import socket, sys
s = socket.create_server((sys.argv[1], 5000))
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""
CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], 5000), timeout=2); print('reached')"


def test_hosts_reach_each_other_until_cut_and_are_removed_afterwards():
    with TestHosts(3) as hosts, Processes() as procs:
        names = [h.netns for h in hosts.hosts]
        server = procs.start(hosts[0].argv([sys.executable, "-c", LISTEN, hosts[0].address]), timeout=60)
        while "ready" not in server.stdout():
            assert server.poll() is None, server.stderr()
            time.sleep(0.05)
        hosts.cut(0, 2)
        reach = [
            procs.start(hosts[i].argv([sys.executable, "-c", CONNECT, hosts[0].address]), timeout=30) for i in (1, 2)
        ]
        done = [p.wait() for p in reach]
        assert "reached" in done[0].stdout and done[0].returncode == 0
        assert done[1].returncode != 0 and "reached" not in done[1].stdout
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "link"], capture_output=True, text=True, check=True).stdout
    assert not any(name in listed for name in names) and hosts.bridge not in links


def test_shoal_train_pipeline_on_two_hosts_c10d_rendezvous_equals_one_host(tmp_path):
    """A pipeline with one stage per host, `shoal train --launch.rdzv_backend=c10d` on each
    host into one shared run directory (torch's dynamic rendezvous assigns the ranks, so
    the stages), ends where the same job on one host ends. (A killed launcher coming back:
    the c10d test above, one decisive case.)"""
    args = ["examples/lm-pipeline.toml", "--train.steps=12", "--train.eval_every=12", "--train.log_every=4"]
    args += ["--strategy.split=params", "--data.batch_size=8", "--logging.progress=false", "--launch.threads=1"]
    args += ["--logging.tensorboard=false", f"--logging.run_dir={tmp_path}"]
    want, got, _ = _one_host_and_two(tmp_path, args, ["--launch.rdzv_backend=c10d"])
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], abs=1e-6)
    assert (tmp_path / "two" / "checkpoints").is_dir()


def _one_host_and_two(
    tmp_path, args: list[str], node_args: tuple[str, ...] | list[str] = (), two_env: dict[str, str] | None = None
) -> tuple[dict, dict, list]:
    """`shoal train ARGS` on one host (run "one"), then on two test hosts with one worker each (run
    "two", `node_args` added on each, `two_env` in its environment); both runs' summaries, after checking
    they ended at the same step, and how the two hosts' launchers ended."""
    with Processes() as procs:
        one = finish(procs.start([*SHOAL, "train", *args, "--logging.name=one"], timeout=240))
    assert one.returncode == 0, one.stderr[-3000:]
    with TestHosts(2) as hosts, Processes() as procs:
        job = {env.JOB_KEY: secrets.token_hex(16), **(two_env or {})}
        started = []
        for host in hosts.hosts:
            node = ["--logging.name=two", "--launch.workers=1", "--launch.nnodes=2", f"--launch.node_rank={host.index}"]
            node += [*node_args, f"--launch.rdzv_endpoint={hosts[0].address}:{PORT}"]
            started.append(procs.start(host.argv([*SHOAL, "train", *args, *node]), timeout=240, env=job))
        two = [finish(p) for p in started]
    assert [d.returncode for d in two] == [0, 0], two[0].stderr[-3000:] + two[1].stderr[-3000:]
    want = json.loads((tmp_path / "one" / "summary.json").read_text())
    got = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert got["world_size"] == 2 and got["step"] == want["step"] == 12
    return want, got, two
