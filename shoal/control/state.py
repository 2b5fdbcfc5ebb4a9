"""The replicated state machine: what every member applies, in log order.

`apply(state, client, seq, op)` is a pure function of the state and the
operation (no clock, no randomness), so every member that applies the same
log holds the same state. Each client numbers its requests; a request whose
number was already applied returns the recorded result instead of acting
twice, so a client may retry after a lost reply (or a new leader) and a
replayed message changes nothing.

Lease expiry is not decided here: a lease's keys go when an `expire`
operation naming the lease's current `beat` is applied. The leader submits
it once it has seen no keep-alive for the lease's TTL (see
`shoal.control.member`); a keep-alive applied first bumps `beat` and makes
that expiry a no-op.
"""

from __future__ import annotations

import json
from typing import Any

OPS = ("get", "put", "delete", "cas", "incr", "range", "grant", "keepalive", "revoke", "expire")


def new_state() -> dict[str, Any]:
    """kv: key -> [value, revision, lease]; leases: id -> {ttl, beat, keys}; sessions: client -> [seq, result]."""
    return {"kv": {}, "leases": {}, "sessions": {}, "rev": 0, "next_lease": 1}


def check_value(value: Any) -> None:
    """Values are JSON-able plain data, never None (None means absent)."""
    if value is None:
        raise ValueError("None cannot be stored: it means 'absent'; delete the key instead")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"control-plane values must be JSON-able plain data: {exc}") from None


def apply(state: dict[str, Any], client: str, seq: int, op: dict[str, Any]) -> Any:
    """["ok", result] or ["error", why] of `op`, request `seq` of `client`, applied once.

    A repeated `seq` returns its first answer; an older one is refused. The
    client "" (the leader's own lease expiries) keeps no session.
    """
    last = state["sessions"].get(client)
    if last is not None and seq <= last[0]:
        return last[1] if seq == last[0] else ["error", "stale request (already superseded)"]
    try:
        for field in ("key", "prefix"):
            if field in op and not isinstance(op[field], str):
                raise ValueError(f"{field} must be a string, not {op[field]!r}")
        result = ["ok", _OPS[op["op"]](state, op)]
    except Exception as exc:  # an operation must never stop the log from being applied
        result = ["error", f"{type(exc).__name__}: {exc}"]
    if client:
        state["sessions"][client] = [seq, result]
    return result


def _put(state, key: str, value: Any, lease: int | None) -> int:
    kv, leases = state["kv"], state["leases"]
    if lease is not None and lease not in leases:
        raise ValueError(f"lease {lease} has expired or was revoked; grant a new one")
    old = kv.get(key)
    if old is not None and old[2] is not None and old[2] in leases:
        leases[old[2]]["keys"].remove(key)
    state["rev"] += 1
    kv[key] = [value, state["rev"], lease]
    if lease is not None:
        leases[lease]["keys"].append(key)
    return state["rev"]


def _delete(state, key: str) -> bool:
    old = state["kv"].pop(key, None)
    if old is None:
        return False
    if old[2] is not None and old[2] in state["leases"]:
        state["leases"][old[2]]["keys"].remove(key)
    state["rev"] += 1
    return True


def _op_get(state, op):
    item = state["kv"].get(op["key"])
    return None if item is None else item[0]


def _op_put(state, op):
    check_value(op["value"])
    return _put(state, op["key"], op["value"], op.get("lease"))


def _op_cas(state, op):
    item = state["kv"].get(op["key"])
    current = None if item is None else item[0]
    if current != op["expected"]:
        return False
    if op["new"] is None:
        _delete(state, op["key"])
    else:
        check_value(op["new"])
        _put(state, op["key"], op["new"], op.get("lease"))
    return True


def _op_incr(state, op):
    item = state["kv"].get(op["key"])
    value = 0 if item is None else item[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{op['key']!r} holds {value!r}, not an integer")
    _put(state, op["key"], value + 1, None)
    return value + 1


def _op_range(state, op):
    prefix = op["prefix"]
    return {"rev": state["rev"], "items": {k: v[0] for k, v in state["kv"].items() if k.startswith(prefix)}}


def _op_grant(state, op):
    ttl = float(op["ttl"])
    if not ttl > 0:
        raise ValueError("a lease's TTL must be positive")
    lease = state["next_lease"]
    state["next_lease"] += 1
    state["leases"][lease] = {"ttl": ttl, "beat": 0, "keys": []}
    return lease


def _op_keepalive(state, op):
    lease = state["leases"].get(op["lease"])
    if lease is None:
        return False
    lease["beat"] += 1
    return True


def _op_revoke(state, op):
    lease = state["leases"].pop(op["lease"], None)
    if lease is None:
        return False
    for key in list(lease["keys"]):
        state["kv"].pop(key, None)
    state["rev"] += 1
    return True


def _op_expire(state, op):
    lease = state["leases"].get(op["lease"])
    if lease is None or lease["beat"] != op["beat"]:
        return False
    return _op_revoke(state, op)


_OPS = {
    "get": _op_get,
    "put": _op_put,
    "delete": lambda state, op: _delete(state, op["key"]),
    "cas": _op_cas,
    "incr": _op_incr,
    "range": _op_range,
    "grant": _op_grant,
    "keepalive": _op_keepalive,
    "revoke": _op_revoke,
    "expire": _op_expire,
}
assert set(_OPS) == set(OPS)
