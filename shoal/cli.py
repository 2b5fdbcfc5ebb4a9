"""The `shoal` command: `shoal train [CONFIG.toml] [--section.key=value ...]`
and `shoal run -n N script.py [args...]`.

Errors the user can fix print one sentence and exit 2 (bad input) or 1 (a
failed worker); no traceback.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from shoal import allocator, env, logs
from shoal.errors import ConfigError, ShoalError

USAGE = """usage: shoal <command> ...

commands:
  train [CONFIG.toml] [--section.key=value ...] [--resume]
        run a complete training job (default: an MLP on scikit-learn's digits, 2 workers)
  run [-n N] [--servers S [--replication 1|2]] [--control raft] [--nnodes M --node-rank K --rdzv-endpoint HOST:PORT]
      [--rdzv-backend static|c10d|etcd] [--rdzv-id ID] [--max-restarts R] script.py [args ...]
        run any script on N local worker processes (the environment torchrun sets),
        with S parameter-server processes for the parameter_server strategy (each shard
        on 2 of them by default when S >= 2) and a replicated control plane (docs/control-plane.md)
  run --servers S --server-nodes H --server-node-rank J --rdzv-endpoint HOST:PORT
        run only parameter servers on this machine (server node J of H), for workers on other machines

`shoal <command> --help` for details.
"""

TRAIN_HELP = """usage: shoal train [CONFIG.toml] [--section.key=value ...] [--resume]

Runs the job a TOML config describes (see examples/); without one, the default
job: an MLP on scikit-learn's handwritten digits, data parallel on 2 workers.
Any config key can be overridden, e.g. --train.steps=500 --launch.workers=4
--model.hidden=[512,256] --strategy.grad_accum=2. --resume continues the run
named by --logging.name (or the newest matching run) from its newest valid
checkpoint.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        logs.setup()
        allocator.setting()  # read by every worker and server: a bad value stops here, before any starts
        if command == "train":
            return _train(rest)
        if command == "run":
            return _run(rest)
        raise ConfigError(f"unknown command {command!r}; use 'train' or 'run' (shoal --help)")
    except ShoalError as err:
        print(f"shoal: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("shoal: interrupted; workers were stopped", file=sys.stderr)
        return 130


def _train(args: list[str]) -> int:
    from shoal.launch.job import run_directory, server_processes, train
    from shoal.launch.supervisor import reason_to_supervise, supervise
    from shoal.train import jobconfig as config

    if any(a in ("-h", "--help") for a in args):
        print(TRAIN_HELP, end="")
        return 0
    path = None
    if args and not args[0].startswith("-"):
        path, args = args[0], args[1:]
    args = ["--checkpoint.resume=true" if a == "--resume" else a for a in args]
    cfg = config.load(path, config.parse_overrides(args))
    launch_cfg = cfg.launch
    if not reason_to_supervise(
        launch_cfg.nnodes,
        launch_cfg.rdzv_backend,
        launch_cfg.rdzv_endpoint,
        launch_cfg.max_restarts,
        servers=server_processes(cfg),
        control=launch_cfg.control,
        node_rank=launch_cfg.node_rank,
        replication=getattr(cfg.strategy.options, "replication", None),
    ):
        # a launcher started again must write into the same run directory
        named = [] if cfg.logging.name else [f"--logging.name={run_directory(cfg).name}"]
        argv = ["train", *([path] if path else []), *args, *named]
        return supervise(argv, launch_cfg.max_restarts, hang_s=launch_cfg.timeout_s)
    train(cfg)
    return 0


def _run(args: list[str]) -> int:
    from shoal.launch.agent import LaunchSpec, launch

    parser = argparse.ArgumentParser(
        prog="shoal run", description="Run a script on N local worker processes (like torchrun)."
    )
    parser.add_argument("-n", "--nproc", type=int, default=1, help="worker processes on this machine")
    parser.add_argument("--nnodes", type=int, default=1, help="machines in the job")
    parser.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0..nnodes-1")
    parser.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of machine 0, the same on every machine")
    parser.add_argument(
        "--rdzv-backend",
        default="static",
        help="across machines: static (ranks from --node-rank; default), or torch's c10d (ranks assigned at "
        "rendezvous; a machine that starts late, or again after a failure, joins), etcd, etcd-v2",
    )
    parser.add_argument(
        "--rdzv-id",
        default="",
        help="across machines: the rendezvous's name, the same on every machine (default: derived from "
        "SHOAL_JOB_KEY, else shoal-job); two jobs that share an etcd need different ones",
    )
    parser.add_argument("--log-dir", default=None, help="where each rank's stdout/stderr is kept")
    parser.add_argument(
        "--servers", type=int, default=0, help="parameter-server processes to start (for the parameter_server strategy)"
    )
    parser.add_argument(
        "--replication",
        type=int,
        default=None,
        help="server processes that hold each shard of the parameters: 1, or 2 (the default with 2 or more "
        "--servers: a server that dies or hangs loses no acknowledged update)",
    )
    parser.add_argument(
        "--control",
        default="",
        help="the job's control plane: raft (3 members on this machine), raft://H:P,H:P,H:P or etcd://HOST:PORT; "
        "workers connect with shoal.control.connect(os.environ['SHOAL_CONTROL']); parameter servers keep "
        "their shards' records there",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="after a worker fails, stop the others and restart all of them up to this many times (default 0); "
        "with --rdzv-backend c10d or etcd, also start this machine's launcher again if it is killed",
    )
    parser.add_argument(
        "--server-nodes",
        type=int,
        default=0,
        help="machines that run only parameter servers (given on every machine; the workers' machines then run none)",
    )
    parser.add_argument(
        "--server-node-rank",
        type=int,
        default=None,
        help="this machine is server node J of --server-nodes: it runs servers J, J+H, ... and no script",
    )
    parser.add_argument("script", nargs="?", default=None, help="the Python script to run")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:
        return int(exc.code or 0) and 2
    if ns.nproc < 1:
        raise ConfigError(f"-n must be >= 1, not {ns.nproc}")
    if ns.nnodes < 1 or not 0 <= ns.node_rank < ns.nnodes:
        raise ConfigError(f"--node-rank must be in 0..{ns.nnodes - 1} for --nnodes {ns.nnodes}, not {ns.node_rank}")
    if ns.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be >= 0, not {ns.max_restarts}")
    if ns.servers < 0:
        raise ConfigError(f"--servers must be >= 0, not {ns.servers}")
    _check_server_nodes(ns)
    _check_rdzv_backend(ns)
    _timeout_s()  # a bad SHOAL_TIMEOUT_S is named before anything starts
    if ns.server_node_rank is None and ns.script is None:
        raise ConfigError("shoal run needs a script (or --server-node-rank J on a machine that runs only servers)")
    if ns.script is not None and not os.path.isfile(ns.script):
        raise ConfigError(f"script {ns.script!r} does not exist")
    from shoal.launch.supervisor import reason_to_supervise, supervise

    if ns.server_node_rank is None and not reason_to_supervise(
        ns.nnodes,
        ns.rdzv_backend,
        ns.rdzv_endpoint,
        ns.max_restarts,
        servers=ns.servers,
        control=ns.control,
        node_rank=ns.node_rank,
        replication=ns.replication,
    ):
        return supervise(["run", *args], ns.max_restarts, hang_s=_timeout_s())
    from shoal.ps.servers import Machines, serve_only, serving

    key = os.environ.get(env.JOB_KEY) or secrets.token_hex(32)
    record = os.path.join(ns.log_dir, "ps_events.jsonl") if ns.log_dir else None
    if (ns.nnodes > 1 or ns.server_nodes) and not ns.rdzv_endpoint:
        raise ConfigError("a job on several machines needs --rdzv-endpoint HOST:PORT (the same on every machine)")
    if ns.server_node_rank is not None:
        serve_only(
            ns.servers,
            key,
            ns.server_nodes,
            ns.server_node_rank,
            ns.rdzv_endpoint,
            log_dir=ns.log_dir,
            record=record,
            live=sys.stderr.isatty(),
        )
        return 0
    from shoal.control.guard import guarding
    from shoal.control.launch import serving as control_serving

    with (
        control_serving(ns.control, key, ns.nnodes, ns.node_rank, ns.rdzv_endpoint) as control_env,
        serving(
            ns.servers,
            key,
            log_dir=ns.log_dir,
            record=record,
            live=sys.stderr.isatty(),
            machines=Machines(ns.nnodes, ns.node_rank, ns.rdzv_endpoint, ns.server_nodes),
            replication=ns.replication,
            control=control_env.get(env.CONTROL, ""),  # the shards' records live there
        ) as ps_env,
    ):
        spec = LaunchSpec(
            nproc=ns.nproc,
            nnodes=ns.nnodes,
            node_rank=ns.node_rank,
            rdzv_endpoint=ns.rdzv_endpoint,
            log_dir=ns.log_dir,
            env={env.JOB_KEY: key, **ps_env, **control_env},
            store_open=bool(ns.servers and (ns.nnodes > 1 or ns.server_nodes)),
            max_restarts=ns.max_restarts,
            rdzv_backend=ns.rdzv_backend,
            rdzv_id=ns.rdzv_id,
            timeout_s=_timeout_s(),
        )
        with guarding(control_env.get(env.CONTROL, ""), key, ns.node_rank):
            launch([str(ns.script), *ns.script_args], spec)
    return 0


def _timeout_s() -> float:
    """The workers' process-group timeout (SHOAL_TIMEOUT_S, 300 s by default): how long a launcher may hang."""
    from shoal.config import timeout_from_env

    return timeout_from_env(os.environ)


def _check_rdzv_backend(ns: argparse.Namespace) -> None:
    """A rendezvous backend torch has, whose client is installed, that fits the rest of the command."""
    from shoal.config import ETCD_NEEDS, RDZV_BACKENDS, etcd_client_installed

    backend = ns.rdzv_backend
    if backend not in RDZV_BACKENDS:
        raise ConfigError(f"--rdzv-backend must be one of {', '.join(RDZV_BACKENDS)}, not {backend!r}")
    if backend.startswith("etcd") and not etcd_client_installed():
        raise ConfigError(f"--rdzv-backend {backend} {ETCD_NEEDS} (--rdzv-endpoint); or use --rdzv-backend c10d")
    if backend != "static" and ns.servers and (ns.nnodes > 1 or ns.server_nodes):
        raise ConfigError(
            f"parameter servers on several machines need --rdzv-backend static (each machine's share of the "
            f"servers follows its --node-rank), not {backend}"
        )
    if backend != "static" and not ns.rdzv_endpoint:
        raise ConfigError(f"--rdzv-backend {backend} needs --rdzv-endpoint HOST:PORT (the same on every machine)")


def _check_server_nodes(ns: argparse.Namespace) -> None:
    """--server-nodes and --server-node-rank make sense together and with --servers, or stop in one sentence."""
    nodes, rank = ns.server_nodes, ns.server_node_rank
    if nodes < 0:
        raise ConfigError(f"--server-nodes must be >= 0, not {nodes}")
    if nodes and not ns.servers:
        raise ConfigError(f"--server-nodes {nodes} needs --servers S (the parameter servers those machines run)")
    if nodes > ns.servers:
        raise ConfigError(
            f"--servers {ns.servers} is fewer than --server-nodes {nodes}: give every server node at least one server"
        )
    if rank is not None:
        if not nodes:
            raise ConfigError("--server-node-rank needs --server-nodes H (how many machines run only servers)")
        if not 0 <= rank < nodes:
            raise ConfigError(f"--server-node-rank must be in 0..{nodes - 1} for --server-nodes {nodes}, not {rank}")
        if ns.script is not None:
            raise ConfigError(
                f"a server node (--server-node-rank {rank}) runs no script; "
                f"start {ns.script!r} on the workers' machines instead"
            )


if __name__ == "__main__":
    sys.exit(main())
