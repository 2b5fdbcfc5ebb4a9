"""Start a job's worker processes on this machine through torch's elastic agent.

We do not spawn workers ourselves: `torch.distributed.launcher.elastic_launch`
runs the rendezvous (c10d on one machine, static with a node rank across
machines), sets the environment torchrun sets, tees each rank's output with a
`[rankN]:` prefix into the console and into log files, and on the first
failure stops every other worker (by pid, SIGTERM then SIGKILL) and, up to
`max_restarts` times, starts them all again in the same rendezvous (each
worker sees TORCHELASTIC_RESTART_COUNT; `shoal train` and `shoal.Recovery`
resume from recovery points). What we add: the job's folder for recovery
points on this machine (in /dev/shm, removed at the end); a hung
(SIGSTOPped) worker ended at once when a peer fails (`_agent_class`);
a one-line reason with the failing rank and its last error line, and the
rendezvous store itself, opened here on the asked address only
(`shoal.ps.store.listen`; torch's server would listen on every interface),
which torch's rendezvous then shares (`multi_tenant`); across machines with
restarts, the static rendezvous in rounds (`shoal.launch.rounds`), which a
launcher started again by its supervisor rejoins. With restarts, each round's
workers meet in a bootstrap store of their own (MASTER_PORT): under the static
rounds machine 0's agent opens it on the rendezvous address only
(`shoal.launch.rounds`); under c10d worker rank 0 opens torch's own
(`_restartable`), which still listens on every interface. And an agent whose
workers all finished marks the job finished before torch's exit barrier, so
that a launcher started again meanwhile (its predecessor killed after the
workers' last collective) exits 0 instead of waiting for a rendezvous nobody
enters (`shoal.launch.finished`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from unittest import mock

from shoal import env, logs
from shoal.comm.netif import address_towards, interface_towards, is_this_machine
from shoal.config import split_endpoint
from shoal.errors import ShoalError, WorkerError, caused_by_peer, first_line
from shoal.launch import finished
from shoal.launch.finished import FinishedElsewhereError
from shoal.launch.log_folders import logs_specs
from shoal.launch.supervisor import recovery_folder_prefix
from shoal.procfs import remove_orphaned, state_of

if TYPE_CHECKING:
    from torch.distributed import TCPStore  # pyright: ignore[reportPrivateImportUsage]
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

TORCH_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")
"""Silenced while workers run: we report a failure ourselves, in one line."""


@dataclass
class LaunchSpec:
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    log_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the workers."""
    run_id: str = ""
    rdzv_timeout_s: int = 300
    quiet: bool = False
    """Keep workers' output in the log files only (no console tee)."""
    store_open: bool = False
    """Machine 0's launcher already hosts the job's store on `rdzv_endpoint` (for parameter servers)."""
    max_restarts: int = 0
    """Times torch's agent restarts every worker after a failure before the job fails."""
    restart_on_errors: bool = True
    """Restart after a worker's own Python exception too (torchrun's way); False (`shoal train`'s default):
    on one machine, only after a worker was killed, hung or failed on a peer, for a restart meets the
    same bug again."""
    rdzv_backend: str = "static"
    """Across machines: "static" (ranks from --node-rank), or torch's "c10d", "etcd", "etcd-v2"
    (ranks assigned at rendezvous; a machine that starts late or again joins)."""
    rdzv_id: str = ""
    """Across machines: the rendezvous's name, the same on every machine (`rdzv_id`)."""
    recovery_fallback: str = ""
    """The folder for recovery points where /dev/shm cannot take them ('' : a temporary folder)."""
    timeout_s: float = 300.0
    """The workers' process-group timeout; also how long this agent waits for the others' at the end."""
    resume_hint: str = "; the job's recovery points went with it: start again from your script's own newest checkpoint"
    """What the line that reports exhausted restarts ends with (`shoal train` names its checkpoint itself)."""


def rdzv_id(given: str = "", backend: str = "c10d", environ: Mapping[str, str] = os.environ) -> str:
    """The name of a job's rendezvous across machines, the same on each: `given`, else, for a dynamic
    backend (whose server, an etcd say, may serve several jobs), one derived from the SHOAL_JOB_KEY
    exported on every machine, else "shoal-job" (one job at a time per rendezvous endpoint: the
    static rendezvous's store is the job's own)."""
    if given:
        return given
    key = environ.get(env.JOB_KEY, "") if backend != "static" else ""
    return f"shoal-{hashlib.sha256(b'shoal-rdzv-id' + key.encode()).hexdigest()[:16]}" if key else "shoal-job"


def launch(argv: list[str], spec: LaunchSpec) -> None:
    """Run `python argv...` on `spec.nproc` local workers; raise `WorkerError` on a failure."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher import api as launcher_api
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    held, backend, endpoint, rdzv_configs, local_addr = _rendezvous(spec)
    log_dir = spec.log_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), "shoal-logs")
    logs_spec = logs_specs(log_dir, spec.quiet)
    config = LaunchConfig(
        min_nodes=spec.nnodes,
        max_nodes=spec.nnodes,
        nproc_per_node=spec.nproc,
        # Every machine must name the same rendezvous.
        run_id=rdzv_id(spec.rdzv_id, spec.rdzv_backend) if spec.nnodes > 1 else (spec.run_id or str(uuid.uuid4())),
        role="default",  # torchrun's ROLE_NAME
        rdzv_endpoint=endpoint,
        rdzv_backend=backend,
        rdzv_configs={**rdzv_configs, "timeout": spec.rdzv_timeout_s},
        local_addr=local_addr,
        max_restarts=spec.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
        logs_specs=logs_spec,
        log_line_prefix_template="[rank${rank}]: ",
        shutdown_timeout=5,
    )
    recovery = _recovery_dir(spec)
    worker_env = {
        **_interfaces(spec),
        **_threads(spec),
        **_restartable(spec),
        env.RECOVERY_DIR: str(recovery),
        **spec.env,
        env.LAUNCHED: "1",
    }
    saved = {k: os.environ.get(k) for k in worker_env}
    # on several machines every agent restarts on any failure: one that stopped alone would leave the
    # others' agents waiting for it in the next rendezvous until its timeout
    fail_fast = not spec.restart_on_errors and spec.nnodes == 1
    agent = _agent_class(spec.timeout_s, _watch(spec, config), log_dir if fail_fast else None)
    os.environ.update(worker_env)
    try:
        with (
            logs.quiet(*TORCH_LOGGERS),
            mock.patch.object(launcher_api, "LocalElasticAgent", agent),
        ):
            elastic_launch(config, entrypoint=sys.executable)(*["-u", *argv])
    except FinishedElsewhereError:
        raise
    except ChildFailedError as err:
        said = _describe_failure(err, log_dir)
        if agent.own_error:
            said += f"; not restarted, for a restart would meet the same error{_restarted(agent.restarts)}"
        elif spec.max_restarts:
            said += f"; the workers were restarted {spec.max_restarts} time(s), all that --max-restarts allows"
        if spec.max_restarts and spec.resume_hint:
            said += spec.resume_hint
        raise WorkerError(said) from None
    except SignalException as err:  # SIGTERM, SIGHUP, SIGQUIT (Ctrl-C is a KeyboardInterrupt)
        raise WorkerError(f"the launcher got {signal.Signals(err.sigval).name} and stopped its workers") from None
    except Exception as err:  # rendezvous timeouts, ports in use, ...
        from shoal.launch.rounds import RestartTimeoutError

        what = "stopped" if isinstance(err, RestartTimeoutError) else "could not start"
        raise WorkerError(f"the job {what}: {type(err).__name__}: {first_line(str(err))}") from None
    finally:
        del held
        shutil.rmtree(recovery, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rendezvous(spec: LaunchSpec) -> tuple[Any, str, str, dict[str, Any], str | None]:
    """(the store held here or None, torch's backend, its endpoint, its configs, this machine's address)."""
    # The job's store, held here so that it listens only where asked (torch's own
    # server listens on every interface); torch's rendezvous shares it (multi_tenant).
    held = None
    # store_open: parameter servers on other machines share the store; etcd: the user's, on any number of machines
    several = spec.nnodes > 1 or spec.store_open or spec.rdzv_backend.startswith("etcd")
    if several and not spec.rdzv_endpoint:
        raise ShoalError("a job on several machines needs --rdzv-endpoint HOST:PORT (the same on every machine)")
    if several and spec.rdzv_backend == "c10d":
        held = _hold_store_if_mine(spec.rdzv_endpoint, spec.rdzv_timeout_s)
        backend, endpoint = "c10d", spec.rdzv_endpoint
        rdzv_configs = {"is_host": held is not None, "join_timeout": spec.rdzv_timeout_s}
    elif several and spec.rdzv_backend != "static":  # etcd, etcd-v2: torch's own, on the user's etcd
        backend, endpoint, rdzv_configs = spec.rdzv_backend, spec.rdzv_endpoint, {}
    elif several:
        backend, endpoint, rdzv_configs = "static", spec.rdzv_endpoint, {"rank": spec.node_rank}
        if spec.nnodes > 1 and spec.max_restarts:  # a restart, or a launcher started again, rejoins in rounds
            from shoal.launch.rounds import FOLLOW, register

            backend = register()
            rdzv_configs[FOLLOW] = spec.store_open  # parameter-server workers follow a newer round
        _check_endpoint(endpoint, spec.node_rank, store_open=spec.store_open)
        if spec.node_rank == 0 and not spec.store_open:
            held = _hold_store(*split_endpoint(endpoint), spec.rdzv_timeout_s)
    elif spec.rdzv_endpoint:
        backend, endpoint, rdzv_configs = "c10d", spec.rdzv_endpoint, {}
    else:
        held = _hold_store("127.0.0.1", 0, spec.rdzv_timeout_s)
        backend, endpoint, rdzv_configs = "c10d", f"127.0.0.1:{held.port}", {}
    # Dynamic rendezvous: name this machine by the address the others reach (torch would take the
    # host name, which may resolve to loopback, and then advertise it as MASTER_ADDR).
    local_addr = address_towards(split_endpoint(endpoint)[0]) if several and "static" not in backend else None
    return held, backend, endpoint, rdzv_configs, local_addr


def _watch(spec: LaunchSpec, config: Any) -> tuple[str, int, str, int] | None:
    """c10d, in a launcher started again: where and what its first rendezvous watches for the marker
    that the job finished meanwhile (`shoal.launch.finished`); None otherwise (the static rounds watch
    it themselves)."""
    if not os.environ.get(env.RELAUNCHED) or spec.nnodes <= 1 or config.rdzv_backend != "c10d":
        return None
    return (*split_endpoint(spec.rdzv_endpoint), config.run_id, spec.nnodes)


def _restarted(times: int) -> str:
    return f" (the workers had been restarted {times} time(s) before)" if times else ""


def _agent_class(
    exit_barrier_s: float, watch: tuple[str, int, str, int] | None = None, fail_fast_logs: str | None = None
) -> Any:
    """torch's `LocalElasticAgent`, but a stopped worker is woken to end when a peer has failed, the
    wait for the other machines' agents at the end is `exit_barrier_s` (the process group's timeout),
    and the job's end is marked for a launcher started again meanwhile (`shoal.launch.finished`):
    an agent whose workers all finished marks it before that wait, which it waits in the job's raw
    store; with `watch` (c10d, a launcher started again), the first rendezvous ends with
    `FinishedElsewhereError` once the mark is there, the wait counting it in.

    When a worker fails, torch 2.13 sends the others SIGTERM and waits up to a
    fixed 30 s before SIGKILL (`SubprocessContext.close`). A SIGSTOPped worker
    (a hung rank, whose peers' collective timed out) would sit out all of it:
    its SIGTERM waits until it runs again. Here, as soon as a worker has
    exited, each stopped one is sent SIGTERM and then SIGCONT, so it ends at once.
    The exit barrier (torch: a fixed 300 s) waits for an agent that hung after its
    workers finished, which its supervisor ends after that timeout too.
    With `fail_fast_logs` (the workers' log folder), a failure in which every failed
    worker raised an exception of its own (not one caused by a peer, nor a signal)
    uses up the restarts: the class's `own_error` says so, `restarts` how many came before.
    """
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class _Agent(LocalElasticAgent):
        own_error = False
        restarts = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("exit_barrier_timeout", exit_barrier_s)
            super().__init__(*args, **kwargs)
            self._watch = watch

        def _exit_barrier(self) -> None:  # torch enters it only when this agent's workers all exited 0
            run_id = self._worker_group.spec.rdzv_handler.get_run_id()
            finished.mark(self._store, run_id, self._worker_group.group_world_size or 0)
            store, self._store = self._store, finished.exit_store(self._store, run_id)
            try:  # in a place a launcher started again finds (c10d: not the round's store)
                super()._exit_barrier()
            finally:
                self._store = store

        def _rendezvous(self, worker_group: Any) -> None:
            where, self._watch = self._watch, None  # the first only: later, a failure here is this job's own
            if where is None:
                return super()._rendezvous(worker_group)  # pyright: ignore[reportCallIssue]  # @prof
            from torch.distributed.elastic.rendezvous import RendezvousError

            with finished.closing_when_finished(*where) as found:
                try:
                    return super()._rendezvous(worker_group)  # pyright: ignore[reportCallIssue]  # @prof
                except RendezvousError:  # closed (a node kept as spare: RendezvousGracefulExitError)
                    if found.is_set():
                        raise finished.FinishedElsewhereError() from None
                    raise

        def _monitor_workers(self, worker_group: Any) -> Any:
            pcontext = getattr(self, "_pcontext", None)
            if pcontext is not None:
                _wake_stopped(list(pcontext.pids().values()))
            result = super()._monitor_workers(worker_group)  # pyright: ignore[reportCallIssue]  # @prof hides its signature
            if (
                fail_fast_logs is not None
                and result.state == WorkerState.FAILED
                and self._remaining_restarts > 0
                and _own_errors(result.failures, fail_fast_logs)
            ):
                _Agent.own_error = True
                _Agent.restarts = worker_group.spec.max_restarts - self._remaining_restarts
                self._remaining_restarts = 0
            return result

    return _Agent


def _own_errors(failures: Mapping[int, Any], log_dir: str) -> bool:
    """Whether the workers that failed by themselves (not those that failed because of them: a lost
    connection, a timeout) all said why and exited with code 1, none killed by a signal. torch's agent
    SIGTERMs the others as soon as one has failed, so a worker seen SIGTERMed counts only when its log
    shows it had failed already (a traceback, or the one line a `shoal train` worker prints)."""
    first = []
    for failure in failures.values():
        last = _last_error_line(log_dir, failure)
        if _is_secondary(failure.exitcode, last):
            continue
        if failure.exitcode == 1:
            first.append(last is not None)
        elif failure.exitcode != -signal.SIGTERM:
            first.append(False)  # killed: the OOM killer, a segfault
        elif last is not None and (last.line.startswith("shoal:") or last.raised):
            first.append(True)  # it had raised, and was on its way out
    return bool(first) and all(first)


def _wake_stopped(pids: list[int]) -> None:
    """If any of `pids` has exited, end each stopped one: SIGTERM, then SIGCONT so that it is delivered."""
    states = {pid: state_of(pid) for pid in pids}
    if not any(state in ("Z", "X", "") for state in states.values()):
        return
    for pid, state in states.items():
        if state in ("T", "t"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGCONT)


def _interfaces(spec: LaunchSpec) -> dict[str, str]:
    """On several machines, the interface that reaches machine 0, for gloo and NCCL (unless the user chose)."""
    if spec.nnodes <= 1:
        return {}
    wanted = [k for k in (env.GLOO_SOCKET_IFNAME, env.NCCL_SOCKET_IFNAME) if not os.environ.get(k)]
    name = interface_towards(split_endpoint(spec.rdzv_endpoint)[0]) if wanted else None
    return dict.fromkeys(wanted, name) if name else {}


def _threads(spec: LaunchSpec) -> dict[str, str]:
    """torchrun's default: one OpenMP thread per worker when several share the machine, unless the user chose.

    Without it an unmodified torchrun script runs 3x slower here (every worker
    takes every core). The mark lets `shoal.init()` still size the threads itself.
    """
    if spec.nproc <= 1 or env.OMP_NUM_THREADS in os.environ:
        return {}
    return {env.OMP_NUM_THREADS: "1", env.THREADS_DEFAULTED: "1"}


def _restartable(spec: LaunchSpec) -> dict[str, str]:
    """With restarts, a fresh bootstrap store for each round of workers.

    torch's agent otherwise shares one store across rounds (torch 2.13), and the
    restarted workers' gloo reads the dead round's addresses from it and fails to connect.
    """
    return {env.DISABLE_SHARED_STORE: "1"} if spec.max_restarts else {}


SHM = Path("/dev/shm")
SHM_FREE = 1 << 30
"""/dev/shm takes the recovery points only with this much free (a container's default 64 MiB would not do)."""


def _recovery_dir(spec: LaunchSpec) -> Path:
    """This job's folder for recovery points on this machine: in /dev/shm (memory: a point costs no disk
    write and is gone with the job), else `spec.recovery_fallback`, else a temporary folder. Removed at the end."""
    try:
        if SHM.is_dir() and os.access(SHM, os.W_OK):
            remove_orphaned(SHM, "shoal-recovery-")  # the pid is the launcher's, or its supervisor's
            if shutil.disk_usage(SHM).free >= SHM_FREE:
                # under a supervisor, named after it: a launcher started again takes its predecessor's points
                prefix = recovery_folder_prefix(int(os.environ.get(env.SUPERVISED) or os.getpid()))
                earlier = sorted(SHM.glob(prefix + "*"))
                return earlier[0] if earlier else Path(tempfile.mkdtemp(prefix=prefix, dir=SHM))
    except OSError:
        pass
    if spec.recovery_fallback:
        Path(spec.recovery_fallback).mkdir(parents=True, exist_ok=True)
        return Path(spec.recovery_fallback)
    return Path(tempfile.mkdtemp(prefix="shoal-recovery-"))


def _hold_store(host: str, port: int, timeout_s: float) -> TCPStore:
    from shoal.comm.signed_store import listen

    try:
        return listen(host, port, timeout_s, multi_tenant=True)
    except (OSError, RuntimeError) as exc:
        raise ShoalError(
            f"cannot open the job's rendezvous store on {host}:{port} ({first_line(str(exc))}); give "
            "--rdzv-endpoint this machine's own address and a free port"
        ) from None


def _hold_store_if_mine(endpoint: str, timeout_s: float) -> TCPStore | None:
    """c10d: the job's store, held here when the endpoint is this machine's own address
    (None: another machine, or another launcher here, holds it; torch's backend then connects)."""
    host, port = split_endpoint(endpoint)
    try:
        address = socket.gethostbyname(host)
    except OSError:
        raise ShoalError(f"cannot resolve the host {host!r} of --rdzv-endpoint; give an address") from None
    if not is_this_machine(address):
        return None
    try:
        return _hold_store(host, port, timeout_s)
    except ShoalError:
        return None  # in use: a launcher on this machine started first and holds it


def _check_endpoint(endpoint: str, node_rank: int, store_open: bool = False) -> None:
    """A HOST:PORT that machine 0 can listen on (unless its launcher already holds the job's store there)."""
    _, port = split_endpoint(endpoint)
    if node_rank == 0 and not store_open:
        try:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("", port))
        except OSError:
            raise ShoalError(
                f"port {port} of --rdzv-endpoint is in use on this machine; choose another port on every machine"
            ) from None


def _describe_failure(err: ChildFailedError, log_dir: str) -> str:
    """One sentence naming the worker that failed by itself, not one that failed because of it."""
    described = []
    for rank, failure in err.failures.items():
        last = _last_error_line(log_dir, failure)
        described.append((_is_secondary(failure.exitcode, last), failure.timestamp, rank, failure, last))
    _, _, rank, failure, last = min(described, key=lambda d: d[:3])
    if failure.exitcode in (1, -signal.SIGTERM) and last is not None:
        # its own error; the same words whether it exited by itself or the launcher
        # stopped it while it was still shutting down (a race a reader should not see)
        how = "failed"
    elif failure.exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-failure.exitcode}"
    else:
        how = f"exited with code {failure.exitcode}"
    where = f" (full log: {last.path})" if last else ""
    reason = f": {last.line}" if last else ""
    return f"worker rank {rank} {how}{reason}{where}"


def _is_secondary(exitcode: int, last: _Said | None) -> int:
    """0: failed by itself; 1: failed on a dead peer or aborted by gloo; 2: stopped by the agent (SIGTERM)."""
    if last is not None:  # what the worker said decides, whatever ended it
        return (2 if "got signal: 15" in last.line else 1) if caused_by_peer(last.line) else 0
    return {-signal.SIGTERM: 2, -signal.SIGABRT: 1}.get(exitcode, 0)


class _Said(NamedTuple):
    line: str
    path: str
    raised: bool  # `line` is the exception line of a traceback


def _last_error_line(log_dir: str, failure: Any) -> _Said | None:
    """What the failed worker's stderr log says went wrong: the exception line of its last
    traceback, else its last meaningful line.

    The log is the one beside the worker's own error file (torch's agent puts
    both in this run's folder); only without one, the newest log of that local
    rank under `log_dir`, which other jobs sharing the default folder may also write.
    """
    error_file = getattr(failure, "error_file", "") or ""
    own = Path(error_file).parent / "stderr.log" if error_file else None
    if own is not None and own.is_file():
        candidates = [own]
    else:
        logs = Path(log_dir).glob(f"*/attempt_*/{failure.local_rank}/stderr.log")
        candidates = sorted(logs, key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates[:1]:
        lines = _log_lines(path)
        said = exception_line(lines)
        raised = said is not None
        if said is None:
            kept = [ln.strip() for ln in lines if ln.strip()]
            said = next((ln for ln in reversed(kept) if not ln.startswith(_NOT_A_REASON)), None)
        if said is not None:
            return _Said(first_line(said)[:300], str(path), raised)
    return None


def _log_lines(path: Path) -> list[str]:
    """A worker's log, without torch's `[rankN]: ` prefixes."""
    return [_PREFIX.sub("", ln).rstrip() for ln in path.read_text(errors="replace").splitlines()]


_MODULE = re.compile(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*(?::|$))")
"""The module path before an exception's class name in a traceback's last line."""
_NOT_A_REASON = ("File ", "^", "~", "Traceback", "[W", "[I")


def exception_line(lines: list[str]) -> str | None:
    """The exception a Python traceback ends with, e.g. 'ValueError: bad batch' (None: no traceback).

    The last traceback wins (a chained exception, or the one raised while shutting
    down). Its frames are indented; the first unindented line after them is the
    exception. Text printed after it (hydra's "Set the environment variable
    HYDRA_FULL_ERROR=1 ...") is not the reason. A message that ends with ':' (torch's
    "Error(s) in loading state_dict for Net:") is followed by its first detail line.
    """
    starts = [i for i, ln in enumerate(lines) if ln.strip() == "Traceback (most recent call last):"]
    if not starts:
        return None
    rest = iter(lines[starts[-1] + 1 :])
    for line in rest:
        if line and not line[0].isspace():
            line = _MODULE.sub("", line)  # shoal.errors.ShoalError: ... -> ShoalError: ...
            if line.endswith(":"):
                detail = next((ln.strip() for ln in rest if ln.strip()), "")
                return f"{line} {detail}".rstrip()
            return line
    return None


_PREFIX = re.compile(r"^(\[rank\d+\]: ?)+")
"""torch's `[rankN]: ` prefix; the indentation after it is kept (it tells frames from the exception)."""
