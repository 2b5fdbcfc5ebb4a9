"""Configuration building blocks: the fixed sections of a job's config, the
binder that checks a TOML table against an options dataclass, and the range
and choice checks that every options dataclass uses.

The bottom layer: components (models, data sets, strategies) import it to
validate their own options; the whole job's tree, which needs their
registries, is assembled above them in `shoal.train.jobconfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal import env
from shoal.errors import ConfigError

# --------------------------------------------------------------------------
# Fixed sections

RDZV_BACKENDS = ("static", "c10d", "etcd", "etcd-v2")
"""Rendezvous backends `shoal run --rdzv-backend` and `launch.rdzv_backend` accept: static, or torch's own."""
ETCD_NEEDS = (
    "needs the python-etcd package (pip install python-etcd) and an etcd server with the v2 API "
    "(etcd --enable-v2) at the rendezvous endpoint"
)
"""What torch's etcd rendezvous needs that shoal does not install; said when it is missing."""


def etcd_client_installed() -> bool:
    """Whether torch's etcd rendezvous can import its client (python-etcd's `etcd` module)."""
    import importlib.util

    return importlib.util.find_spec("etcd") is not None


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 0

    def __post_init__(self):
        check_choice(self.name, "name", ("sgd", "adam", "adamw"))
        check_choice(self.schedule, "schedule", ("constant", "cosine"))
        check_range(self.lr, "lr", low=0.0, low_open=True)
        check_range(self.momentum, "momentum", low=0.0, high=1.0)
        check_range(self.weight_decay, "weight_decay", low=0.0)
        check_range(self.warmup_steps, "warmup_steps", low=0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("'betas' must be two numbers in [0, 1), e.g. [0.9, 0.999]", "betas")
        if self.nesterov and self.momentum == 0.0:
            raise ConfigError("'nesterov' needs a momentum > 0", "nesterov")


@dataclass
class TrainConfig:
    steps: int = 300
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    stop_at: int = 0
    """Debug: stop after this step as if the job were interrupted (0 = never)."""

    def __post_init__(self):
        check_range(self.steps, "steps", low=1)
        check_range(self.log_every, "log_every", low=1)
        check_range(self.eval_every, "eval_every", low=0)
        check_range(self.stop_at, "stop_at", low=0)


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save every this many steps (0: only at the end)."""
    keep: int = 3
    resume: bool = False
    resume_from: str = ""
    """A checkpoint directory to resume from (implies resume)."""
    recovery_every: int = 5
    """Take a recovery point (each rank's state, on local disk) every this many steps (0: never); a worker
    restart resumes from the newest one every rank has. 5: every step cost 14-23% of steps/s on the
    5.4M-parameter MLP, every 5th at most 4.5% (docs/fault-tolerance.md)."""

    def __post_init__(self):
        check_range(self.every, "every", low=0)
        check_range(self.keep, "keep", low=1)
        check_range(self.recovery_every, "recovery_every", low=0)


def is_control_spec(value: str) -> bool:
    """Whether `value` names a control plane `shoal run --control` and `launch.control` accept ("" is none)."""
    return value in ("", "raft") or value.startswith(("raft://", "etcd://"))


@dataclass
class LaunchConfig:
    workers: int = 2
    threads: int = 0
    """torch threads per worker (0: the machine's cores divided among the local workers)."""
    backend: str = "auto"
    device: str = "auto"
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    timeout_s: float = 300.0
    max_restarts: int = 3
    """Restart every worker this many times after a worker fails (torch's elastic agent); each resumes
    from the newest recovery point. 0: stop at the first failure."""
    restart_on_errors: bool = False
    """Restart after a worker's own Python exception too; by default, on one machine, only after a worker
    was killed (a signal: SIGKILL, the OOM killer), hung, or failed because a peer did: a restart meets a
    bug again. On several machines every failure is restarted, so that all machines' agents restart together."""
    rdzv_backend: str = "static"
    """How the machines meet: "static" (ranks from node_rank), or torch's dynamic "c10d", "etcd", "etcd-v2"
    (ranks assigned at rendezvous; a machine that starts late, or again, joins). The same as `shoal run
    --rdzv-backend`."""
    control: str = ""
    """The job's control plane, as `shoal run --control`: "" (none), "raft" (three members started with the
    job, on this machine), "raft://H:P,H:P,H:P" or "etcd://HOST:PORT". Workers reach it through
    SHOAL_CONTROL; parameter servers keep their shards' records there (docs/control-plane.md)."""

    def __post_init__(self):
        check_range(self.workers, "workers", low=1)
        check_range(self.max_restarts, "max_restarts", low=0)
        check_range(self.threads, "threads", low=0)
        check_range(self.nnodes, "nnodes", low=1)
        check_range(self.node_rank, "node_rank", low=0, high=self.nnodes - 1)
        check_range(self.timeout_s, "timeout_s", low=0.0, low_open=True)
        check_choice(self.backend, "backend", ("auto", "gloo", "nccl"))
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"'device' must be one of auto, cpu, cuda, not {self.device!r}", "device")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("'rdzv_endpoint' (HOST:PORT) is needed when nnodes > 1", "rdzv_endpoint")
        if not is_control_spec(self.control):
            raise ConfigError(
                f"'control' must be raft, raft://H:P,H:P,H:P or etcd://HOST:PORT (or empty: none), not "
                f"{self.control!r}",
                "control",
            )
        check_choice(self.rdzv_backend, "rdzv_backend", RDZV_BACKENDS)
        if self.rdzv_backend != "static" and not self.rdzv_endpoint:
            raise ConfigError(
                f"'rdzv_backend' {self.rdzv_backend} needs rdzv_endpoint = \"HOST:PORT\" (the same on every machine)",
                "rdzv_backend",
            )
        if self.rdzv_backend.startswith("etcd") and not etcd_client_installed():
            raise ConfigError(
                f"'rdzv_backend' {self.rdzv_backend} {ETCD_NEEDS}; or use rdzv_backend = \"c10d\"", "rdzv_backend"
            )


@dataclass
class LoggingConfig:
    run_dir: str = "runs"
    name: str = ""
    """The run's folder under run_dir (default: data-strategy-timestamp)."""
    tensorboard: bool = True
    progress: bool = True


def bind(cls: type, raw: dict, prefix: str) -> Any:
    """Build dataclass `cls` from a TOML table, checking keys and types."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            allowed = ", ".join(fields) or "(none)"
            raise ConfigError(
                f"unknown config key '{prefix}.{key}'{_suggest(key, fields)}; keys in [{prefix}] are {allowed}",
                f"{prefix}.{key}",
            )
        kwargs[key] = coerce(value, hints[key], f"{prefix}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix) from None


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint; ints are accepted where floats are."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, not {_describe(value)}", key)
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a table of key = value, not {_describe(value)}", key)
        return {str(k): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint in _SCALARS:
        accepts, convert, what = _SCALARS[hint]
        if not accepts(value):
            raise ConfigError(f"'{key}' must be {what}, not {_describe(value)}", key)
        return convert(value)
    return value


def _coerce_union(value: Any, args: tuple, key: str) -> Any:
    """The first member of a union (Optional included) that `value` fits."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce(value, arg, key)
        except ConfigError as err:
            errors.append(err)
    raise errors[0]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_SCALARS: dict[Any, tuple[Callable[[Any], bool], Callable[[Any], Any], str]] = {
    float: (_is_number, float, "a number"),
    int: (_is_int, lambda v: v, "an integer"),
    bool: (lambda v: isinstance(v, bool), lambda v: v, "true or false"),
    str: (lambda v: isinstance(v, str), lambda v: v, "a string"),
}
"""Per scalar type hint: what is accepted, how it is converted, and its name in an error."""


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------
# Checks that option dataclasses use in __post_init__


def split_endpoint(endpoint: str, what: str = "--rdzv-endpoint", key: str = "rdzv_endpoint") -> tuple[str, int]:
    """(host, port) of an endpoint written HOST:PORT; otherwise ConfigError naming `what`
    (the option or environment variable it came from)."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{what} {endpoint!r} must look like HOST:PORT, e.g. 10.0.0.1:29500", key)
    return host, int(port)


def check_range(
    value: float, key: str, low: float | None = None, high: float | None = None, low_open: bool = False
) -> None:
    """ConfigError naming `key` unless `value` is finite and within [low, high] ((low, high] with `low_open`)."""
    if not math.isfinite(value):
        raise ConfigError(f"'{key}' must be a finite number, not {value!r}", key)
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ConfigError(f"'{key}' must be {bound}, not {value!r}", key)
    if high is not None and value > high:
        raise ConfigError(f"'{key}' must be <= {high}, not {value!r}", key)


def timeout_from_env(environ: Mapping[str, str], default: float = 300.0) -> float:
    """SHOAL_TIMEOUT_S (the process group's timeout, so how long a hung rank or launcher may stay
    stopped), read the same way by the launcher and the workers; ConfigError (one sentence) for a
    value that is not a finite number of seconds > 0."""
    text = environ.get(env.TIMEOUT_S, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{env.TIMEOUT_S} must be a number of seconds > 0, such as 300, not {text!r}", env.TIMEOUT_S)
    return value


def check_choice(value: object, key: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(
            f"'{key}' must be one of {', '.join(map(str, choices))}, not {value!r}{_suggest(str(value), choices)}", key
        )
