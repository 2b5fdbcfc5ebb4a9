"""The control plane on an etcd cluster the site already runs: `etcd://HOST:PORT[/PREFIX]`.

Talks to etcd's HTTP gateway (`/v3/...` JSON) with `etcd3gw`, which needs no
gRPC or protobuf of its own, so it sits beside the protobuf that tensorboard
pulls in. Keys live under PREFIX (default `shoal/`); values are stored as
canonical JSON, so compare-and-set compares JSON text. etcd gives the same
guarantees as the embedded members: every write and (serializable=false)
read is committed by a majority. etcd's own authentication and TLS are the
site's business; this backend sends no job key.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from etcd3gw import exceptions as etcd_exceptions
from etcd3gw.client import Etcd3Client
from etcd3gw.lease import Lease

from shoal.control.base import ControlError, ControlPlane
from shoal.control.state import check_value

T = TypeVar("T")
RETRY_PAUSE_S = 0.1
LEASE_GONE = "requested lease not found"
"""etcd's words for a lease that expired or was revoked."""


class LeaseGoneError(ControlError):
    """A lease that etcd no longer has."""


def _b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


class EtcdControl(ControlPlane):
    """`EtcdControl("host:2379")` or `"host:2379/myjob/"` (keys under that prefix)."""

    def __init__(self, address: str, timeout: float = 10.0):
        hostport, _, prefix = address.partition("/")
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ControlError(f"etcd://{address} is not HOST:PORT[/PREFIX]; give etcd://127.0.0.1:2379 for example")
        self.address, self.prefix, self.timeout = hostport, prefix or "shoal/", timeout
        self.etcd = Etcd3Client(host=host, port=int(port), timeout=min(timeout, 5.0))

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """fn() until it reaches etcd, for at most `timeout` seconds."""
        end = time.monotonic() + self.timeout
        while True:
            try:
                return fn()
            except (etcd_exceptions.ConnectionFailedError, etcd_exceptions.ConnectionTimeoutError) as exc:
                if time.monotonic() >= end:
                    raise ControlError(
                        f"etcd at {self.address} did not acknowledge {what} within {self.timeout:g} s ({exc}); "
                        f"check that etcd runs there and that a majority of its members is up"
                    ) from None
                time.sleep(RETRY_PAUSE_S)
            except etcd_exceptions.Etcd3Exception as exc:
                detail = str(exc.detail_text or exc)
                if LEASE_GONE in detail:
                    why = "the lease has expired or was revoked; grant a new one"
                    raise LeaseGoneError(f"the control plane refused {what}: {why}") from None
                raise ControlError(f"etcd at {self.address} refused {what}: {detail}") from None

    def get(self, key: str) -> Any:
        found = self._retry("get", lambda: self.etcd.get(self.prefix + key))
        return json.loads(found[0]) if found else None

    def put(self, key: str, value: Any, lease: int | None = None) -> None:
        check_value(value)
        held = Lease(lease, self.etcd) if lease is not None else None
        self._retry("put", lambda: self.etcd.put(self.prefix + key, _dumps(value), lease=held))

    def delete(self, key: str) -> bool:
        url, body = self.etcd.get_url("/kv/deleterange"), {"key": _b64(self.prefix + key)}
        done = self._retry("delete", lambda: self.etcd.post(url, json=body))
        return int(done.get("deleted", 0)) > 0

    def compare_and_set(self, key: str, expected: Any, new: Any, lease: int | None = None) -> bool:
        full = _b64(self.prefix + key)
        if expected is None:
            compare = {"key": full, "result": "EQUAL", "target": "CREATE", "create_revision": 0}
        else:
            compare = {"key": full, "result": "EQUAL", "target": "VALUE", "value": _b64(_dumps(expected))}
        if new is None:
            success: dict[str, Any] = {"request_delete_range": {"key": full}}
        else:
            check_value(new)
            success = {"request_put": {"key": full, "value": _b64(_dumps(new)), **({"lease": lease} if lease else {})}}
        txn = {"compare": [compare], "success": [success], "failure": []}
        return bool(self._retry("compare_and_set", lambda: self.etcd.transaction(txn)).get("succeeded", False))

    def incr(self, key: str) -> int:
        while True:
            current = self.get(key)
            if current is not None and (not isinstance(current, int) or isinstance(current, bool)):
                raise ControlError(f"the control plane refused incr: {key!r} holds {current!r}, not an integer")
            if self.compare_and_set(key, current, (current or 0) + 1):
                return (current or 0) + 1

    def range(self, prefix: str) -> dict[str, Any]:
        found = self._retry("range", lambda: self.etcd.get_prefix(self.prefix + prefix))
        cut = len(self.prefix)
        return {meta["key"].decode()[cut:]: json.loads(value) for value, meta in found}

    def grant(self, ttl: float) -> int:
        # etcd counts whole seconds and raises very short TTLs to its minimum.
        return self._retry("grant", lambda: self.etcd.lease(max(1, round(ttl)))).id

    def keep_alive(self, lease: int) -> bool:
        return self._retry("keep_alive", lambda: Lease(lease, self.etcd).refresh()) > 0

    def revoke(self, lease: int) -> bool:
        try:
            return bool(self._retry("revoke", lambda: Lease(lease, self.etcd).revoke()))
        except LeaseGoneError:
            return False

    def close(self) -> None:
        self.etcd.session.close()
