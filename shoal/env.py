"""Every environment variable shoal reads, named once.

User settings may be set before `shoal run`/`shoal train` (which pass their
environment down) or a script; launcher-to-child variables are set by the
launchers for the processes they start and are not meant to be set by hand.
docs/environment.md lists them all.
"""

from __future__ import annotations

# ---------------------------------------------------------------- for users
BACKEND = "SHOAL_BACKEND"
"""Process-group backend: 'gloo', 'nccl' or 'auto' (NCCL where CUDA is available)."""
DEVICE = "SHOAL_DEVICE"
"""'cpu', 'cuda' or 'auto'."""
THREADS = "SHOAL_THREADS"
"""torch intra-op threads per worker (0: the machine's cores divided among the local workers)."""
TIMEOUT_S = "SHOAL_TIMEOUT_S"
"""Collective timeout in seconds."""
JOB_KEY = "SHOAL_JOB_KEY"
"""The job's shared secret (>= 16 characters); the launcher makes one when unset."""
PS_ADVERTISE = "SHOAL_PS_ADVERTISE"
"""The address a parameter server publishes for other machines to reach it."""
LOG_LEVEL = "SHOAL_LOG_LEVEL"
"""Level of shoal's log records in the processes shoal starts (default WARNING); see `shoal.logs`."""
MALLOC = "SHOAL_MALLOC"
"""'keep' (default): workers and servers keep the memory they free for the next step (`shoal.allocator`);
'default': glibc's own settings."""
PS_THREADS = "SHOAL_PS_THREADS"
"""torch threads of a parameter-server process (default 1)."""
PS_MAX_BYTES = "SHOAL_PS_MAX_BYTES"
"""The ceiling on a message a parameter server accepts (default 2^30); the workers' max_message_mb governs below it."""
CURVE = "SHOAL_CURVE"
"""1 (default): every shoal ZeroMQ connection is CURVE-authenticated and encrypted (`shoal.comm.security`); 0: off."""
PS_IPC = "SHOAL_PS_IPC"
"""1 (default): a parameter-server job on one machine talks over ipc:// sockets in a private directory, without
CURVE or per-message MACs (`shoal.comm.ipc`); 0: over loopback TCP with CURVE, as across machines."""
PS_MAX_CONNECTIONS = "SHOAL_PS_MAX_CONNECTIONS"
"""The most open files, so connections, a parameter-server process holds (default 1024; `shoal.ps.process`)."""
PS_TIMEOUT_S = "SHOAL_PS_TIMEOUT_S"
"""How long a parameter server waits for the other workers to join if the first init does not say (default 60)."""

CONTROL = "SHOAL_CONTROL"
"""The job's control plane (`shoal.control.connect`): raft://H:P,H:P,H:P or etcd://HOST:PORT; `shoal run --control`."""

# ----------------------------------------------- launcher -> its children
LAUNCHED = "SHOAL_LAUNCHED"
"""Set to 1 in processes a shoal launcher started."""
RUN_DIR = "SHOAL_RUN_DIR"
"""The run directory of a `shoal train` job."""
RECOVERY_DIR = "SHOAL_RECOVERY_DIR"
"""This machine's folder for the job's recovery points (in /dev/shm where it can), removed when the job ends."""
PS_STORE = "SHOAL_PS_STORE"
"""host:port of the store where parameter servers publish their endpoints."""
PS_SESSION = "SHOAL_PS_SESSION"
"""The job's session: part of every signature on the parameter-server store's values (see `shoal.ps.store`)."""
PS_EVENTS = "SHOAL_PS_EVENTS"
"""Endpoint of the launcher's event subscriber (live table, event log)."""
PS_IPC_DIR = "SHOAL_PS_IPC_DIR"
"""The private (0700) directory of a one-machine parameter-server job's ipc:// sockets (`shoal.comm.ipc`)."""
PS_INDEX = "SHOAL_PS_INDEX"
"""A server process's index among the job's servers."""
PS_HOST = "SHOAL_PS_HOST"
"""The interface a server binds."""
PS_REPLACEMENT = "SHOAL_PS_REPLACEMENT"
"""Set (to how many times its index was replaced) in a server process started in place of one that
exited, or by a launcher started again (to `RELAUNCHED`): it joins its shards as their backup
(`shoal.ps.replacement`)."""
SUPERVISED = "SHOAL_SUPERVISOR"
"""Set (to the supervisor's pid) in a launcher that `shoal.launch.supervisor` starts again if it is killed."""
RELAUNCHED = "SHOAL_RELAUNCHED"
"""Set (to how many times) in a launcher that its supervisor started again after the previous one was killed."""
THREADS_DEFAULTED = "SHOAL_THREADS_DEFAULTED"
"""Set to 1 where `shoal run` put torchrun's default OMP_NUM_THREADS=1 (the user did not choose it), so that
`shoal.init()` may still choose the threads."""

# -------------------------------- other libraries' variables shoal sets
DISABLE_SHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
"""Set to 1 by the launcher when workers may restart: torch's agent then opens a new bootstrap store per round."""
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
"""Set by torch's elastic agent in every worker: how many times it has restarted the workers (0 at first)."""
OMP_NUM_THREADS = "OMP_NUM_THREADS"
"""Threads per worker: `shoal run` sets 1 for several local workers, as torchrun does, unless already set."""
GLOO_SOCKET_IFNAME = "GLOO_SOCKET_IFNAME"
"""Gloo's interface; on several machines the launcher sets it to the one that routes to the rendezvous host."""
NCCL_SOCKET_IFNAME = "NCCL_SOCKET_IFNAME"
"""NCCL's bootstrap interface, chosen likewise."""

# ------------------------------------------------------------- tests only
FAULTS = "SHOAL_FAULTS"
"""A fault schedule (JSON) for tests and benchmarks; see `shoal.faults`."""
CONTROL_TIMING = "SHOAL_CONTROL_TIMING"
"""`MIN,MAX,HEARTBEAT` seconds: a control-plane member's election timeouts and heartbeat (benchmarks)."""
