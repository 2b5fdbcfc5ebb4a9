"""Read what a `shoal train` run left in its run directory."""

from __future__ import annotations

from pathlib import Path

from shoal.train.checkpoint import load_tensors


def checkpoint_state(run_dir: Path, which: int = -1) -> dict:
    """The model and optimizer state of a kept checkpoint (default: the newest), as plain tensors
    (read as shoal reads it: verified, nothing unpickled but DCP's metadata classes)."""
    return load_tensors(sorted((run_dir / "checkpoints").glob("step-*"))[which])


def final_params(run_dir: Path) -> tuple[dict, dict]:
    """The newest checkpoint's model parameters and optimizer state."""
    state = checkpoint_state(run_dir)
    return dict(state["model"]), state["optim"]


def first_checkpoint_params(run_dir: Path) -> dict:
    """The model parameters of the run's oldest kept checkpoint."""
    return checkpoint_state(run_dir, 0)["model"]
