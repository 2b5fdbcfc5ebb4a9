"""`shoal train`, launching side: validate, make the run directory, resume
checks, start workers, show progress, print the result.

Everything that can be wrong with the user's input is found here, before any
worker process starts.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from rich.console import Console

from shoal import env
from shoal.control.guard import guarding
from shoal.control.launch import serving as control_serving
from shoal.errors import CheckpointError, ConfigError, WorkerError
from shoal.launch.agent import LaunchSpec, launch
from shoal.ps.servers import Machines, serving
from shoal.train import checkpoint
from shoal.train import jobconfig as config
from shoal.train.jobconfig import JobConfig
from shoal.train.progress import ProgressMonitor


def run_directory(cfg: JobConfig) -> Path:
    root = Path(cfg.logging.run_dir)
    if cfg.logging.name:
        return root / cfg.logging.name
    prefix = f"{cfg.data.name}-{cfg.strategy.name}-"
    if cfg.checkpoint.resume and not cfg.checkpoint.resume_from:
        earlier = sorted(
            (p for p in root.glob(prefix + "*") if (p / "checkpoints").is_dir()), key=lambda p: p.stat().st_mtime
        )
        if not earlier:
            raise CheckpointError(
                f"no earlier run of {prefix.rstrip('-')!r} with checkpoints in {str(root)!r}; "
                "run without --resume to start fresh, or name the run with --logging.name"
            )
        return earlier[-1]
    return root / (prefix + time.strftime("%Y%m%d-%H%M%S"))


def resolve_resume(cfg: JobConfig, run_dir: Path, console: Console) -> str:
    """The verified checkpoint folder to resume from ('' to start fresh)."""
    if cfg.checkpoint.resume_from:
        checkpoint.verify(Path(cfg.checkpoint.resume_from))
        return cfg.checkpoint.resume_from
    if not cfg.checkpoint.resume:
        return ""
    path, warnings = checkpoint.newest_valid(run_dir / "checkpoints")
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    return str(path)


def train(cfg: JobConfig, console: Console | None = None) -> dict:
    """Run the job `cfg` describes on this machine's workers (and servers); its summary."""
    console = console or Console(soft_wrap=True)
    check_rendezvous(cfg)
    run_dir = prepare_run_dir(cfg, console)
    run_workers(cfg, run_dir, console)
    return report(run_dir, console)


def server_processes(cfg: JobConfig) -> int:
    """How many parameter-server processes the job runs (0: its strategy has none)."""
    return cfg.strategy.options.server_processes(cfg.launch.workers * cfg.launch.nnodes)


def check_rendezvous(cfg: JobConfig) -> None:
    """Parameter servers on several machines meet only in the static rendezvous: each machine's share of
    the servers follows its node_rank (a dynamic backend assigns ranks at rendezvous)."""
    launch_cfg = cfg.launch
    servers = server_processes(cfg)
    if servers and launch_cfg.nnodes > 1 and launch_cfg.rdzv_backend != "static":
        raise ConfigError(
            f'parameter servers on several machines need launch.rdzv_backend = "static" (each machine\'s share '
            f"of the servers follows its node_rank), not {launch_cfg.rdzv_backend!r}",
            "launch.rdzv_backend",
        )


def prepare_run_dir(cfg: JobConfig, console: Console) -> Path:
    """The run directory, with the config the workers read; refuses to overwrite checkpoints unasked."""
    run_dir = run_directory(cfg)
    resume_from = resolve_resume(cfg, run_dir, console)
    relaunched = bool(os.environ.get(env.RELAUNCHED))  # its predecessor was killed; the job goes on
    if not resume_from and cfg.launch.node_rank == 0 and (run_dir / "checkpoints").exists() and not relaunched:
        raise CheckpointError(
            f"run directory {str(run_dir)!r} already has checkpoints; "
            "pass --resume to continue it, or choose another --logging.name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.checkpoint.resume_from = resume_from
    (run_dir / "config.toml").write_text(config.dump_toml(cfg))
    if resume_from:
        console.print(f"resuming from {resume_from}", highlight=False)
    elif (run_dir / "summary.json").exists():
        (run_dir / "summary.json").unlink()
    return run_dir


def run_workers(cfg: JobConfig, run_dir: Path, console: Console) -> None:
    """This machine's workers, and its share of the parameter servers, to the end, with progress."""
    launch_cfg = cfg.launch
    job_key = os.environ.get(env.JOB_KEY) or secrets.token_hex(32)
    workers_env = {env.RUN_DIR: str(run_dir), env.JOB_KEY: job_key}
    spec = LaunchSpec(
        nproc=launch_cfg.workers,
        nnodes=launch_cfg.nnodes,
        node_rank=launch_cfg.node_rank,
        rdzv_endpoint=launch_cfg.rdzv_endpoint,
        log_dir=str(run_dir / "logs"),
        env=workers_env,
        run_id=run_dir.name,
        max_restarts=launch_cfg.max_restarts,
        restart_on_errors=launch_cfg.restart_on_errors,
        rdzv_backend=launch_cfg.rdzv_backend,
        recovery_fallback=str(run_dir / "recovery"),
        resume_hint="",
        timeout_s=launch_cfg.timeout_s,
    )
    servers = server_processes(cfg)
    spec.store_open = bool(servers and launch_cfg.nnodes > 1)
    events = f"ps_events-node{launch_cfg.node_rank}.jsonl" if launch_cfg.nnodes > 1 else "ps_events.jsonl"
    monitor = ProgressMonitor(run_dir / "metrics.jsonl", cfg.train.steps, console) if cfg.logging.progress else None
    if monitor:
        monitor.start()
    try:
        with (
            control_serving(
                launch_cfg.control, job_key, launch_cfg.nnodes, launch_cfg.node_rank, launch_cfg.rdzv_endpoint
            ) as control_env,
            serving(
                servers,
                job_key,
                log_dir=str(run_dir / "logs"),
                record=str(run_dir / events),
                machines=Machines(launch_cfg.nnodes, launch_cfg.node_rank, launch_cfg.rdzv_endpoint),
                replication=getattr(cfg.strategy.options, "replication", None),
                control=control_env.get(env.CONTROL, ""),  # the shards' records live there
            ) as ps_env,
        ):
            workers_env.update({**ps_env, **control_env})
            with guarding(control_env.get(env.CONTROL, ""), job_key, launch_cfg.node_rank):
                launch(["-m", "shoal.train.worker", str(run_dir)], spec)
    except WorkerError as err:
        if not spec.max_restarts and not servers and not launch_cfg.control:
            raise
        # restarts used up, the servers' state or the control plane gone with the job: a checkpoint is the way on
        raise WorkerError(f"{err}{resume_hint(run_dir)}") from None
    finally:
        if monitor:
            monitor.stop()


def resume_hint(run_dir: Path) -> str:
    """Where a run whose restarts are exhausted can go on from: its newest valid checkpoint, or nowhere."""
    try:
        path, _ = checkpoint.newest_valid(run_dir / "checkpoints")
    except CheckpointError:
        return "; the run has no checkpoint to resume from"
    return f"; resume from its newest checkpoint {str(path)!r} with --resume --logging.name={run_dir.name}"


def report(run_dir: Path, console: Console) -> dict:
    """The run's summary (what rank 0 wrote), told in a few lines."""
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["run_dir"] = str(run_dir)
    if summary.get("stopped_early"):
        console.print(
            f"stopped at step {summary['step']} as asked (train.stop_at); "
            f"resume with --resume --logging.name={run_dir.name}",
            highlight=False,
        )
    if "eval_accuracy" in summary:
        console.print(
            f"test accuracy {summary['eval_accuracy']:.4f}  |  {summary['samples_per_s']:.0f} samples/s on "
            f"{summary['world_size']} workers  |  {summary['step']} steps in {summary['wall_s']:.1f}s",
            highlight=False,
        )
    console.print(
        f"run directory: {run_dir}  (config.toml, metrics.jsonl, tensorboard/, checkpoints/, logs/)", highlight=False
    )
    return summary
