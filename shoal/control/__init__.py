"""The job's replicated state: membership and liveness, a fencing generation, who holds what.

One interface (`ControlPlane`: get, put, compare_and_set, incr, range,
leases, watch) over two backends: three embedded pysyncobj members
(`raft://H:P,H:P,H:P`, see `shoal.control.member`) or an etcd cluster
(`etcd://HOST:PORT`). `connect(spec)` returns either; docs/control-plane.md
says what survives what.
"""

from shoal.control.base import GENERATION, MEMBERS, ControlError, ControlPlane, Event
from shoal.control.client import RaftControl, connect
from shoal.control.keeper import Held, hold
from shoal.control.launch import member_argv

__all__ = [
    "GENERATION",
    "MEMBERS",
    "ControlError",
    "ControlPlane",
    "Event",
    "Held",
    "RaftControl",
    "connect",
    "hold",
    "member_argv",
]
