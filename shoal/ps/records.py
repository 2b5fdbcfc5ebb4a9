"""Where each shard's record lives ("GEN PRIMARY BACKUP": who holds the shard, and the generation
that fences the other replica): the job's control plane when it runs one, else the job's store.

Why the control plane: its compare-and-set is committed by a majority of its members (Raft, or an
etcd cluster), so a claim outlives any one of them and a process cut off from the majority by a
partition cannot win one; the store is one process on machine 0. Either way each value is signed
with the job key (`SignedStore`'s MAC, bound to the job's session and the key's name), so a record
that someone else wrote lets no claim win. Server addresses stay in the store: they are written
once per process and need no consensus.

With `SHOAL_CONTROL` in the environment (`shoal run --control ...`, which passes it to the servers
and the workers alike) every process reads and claims records there; the servers create the first
records (compare-and-set from absent, so whoever comes first) before they publish their addresses,
so a worker that found every address finds every record.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping

from shoal import env
from shoal.control.base import ControlError, ControlPlane
from shoal.errors import ShoalError
from shoal.ps.store import (
    ServerAddress,
    Shard,
    ShardRecord,
    SignedStore,
    backup_key,
    first_record,
    read_replication,
    server_key,
    shard_key,
    wait_published,
)


class Records:
    """The shards' records, in the control plane (`control`) or in the store."""

    def __init__(self, store: SignedStore, control: ControlPlane | None = None) -> None:
        self.store = store
        self.control = control
        self.where = "the control plane" if control is not None else "the job's store"

    def _key(self, shard: int) -> str:
        return f"{shard_key(shard)}/{self.store.session}"  # a control plane may serve several jobs

    def _signed(self, shard: int, record: ShardRecord) -> str:
        return self.store.signed(self._key(shard), record.value)

    def get(self, shard: int) -> ShardRecord:
        """Shard `shard`'s record; ShoalError if it is absent or not signed by this job."""
        if self.control is None:
            return ShardRecord.parse(self.store.get(shard_key(shard)))
        raw = self.control.get(self._key(shard))
        if not isinstance(raw, str):
            raise ShoalError(f"shard {shard} has no record in the control plane")
        record = ShardRecord.parse(raw.partition(" ")[2])
        if not hmac.compare_digest(raw, self._signed(shard, record)):
            raise ShoalError(f"shard {shard}'s record in the control plane is not signed with this job's key")
        return record

    def compare_set(self, shard: int, old: ShardRecord, new: ShardRecord) -> bool:
        """Replace `old` by `new` atomically; whether it did (False: the record was not `old`)."""
        if self.control is None:
            return self.store.compare_set(shard_key(shard), old.value, new.value)
        key, signed_old, signed_new = self._key(shard), self._signed(shard, old), self._signed(shard, new)
        return bool(self.control.compare_and_set(key, signed_old, signed_new))

    def close(self) -> None:
        if self.control is not None:
            self.control.close()

    def create(self, shard: int, count: int, replication: int) -> None:
        """The shard's first record, unless it has one (the launcher wrote the store's already)."""
        if self.control is not None:
            first = first_record(shard, count, replication)
            self.control.compare_and_set(self._key(shard), None, self._signed(shard, first))


def open_records(store: SignedStore, environ: Mapping[str, str] = os.environ) -> Records:
    """The job's records: in the control plane that `SHOAL_CONTROL` names, else in `store`."""
    spec = environ.get(env.CONTROL, "")
    if not spec:
        return Records(store)
    from shoal.control import connect

    try:
        return Records(store, connect(spec, key=environ.get(env.JOB_KEY) or None))
    except ControlError as err:
        raise ShoalError(f"cannot reach the job's control plane {spec!r} for the shards' records: {err}") from None


def read_shards(
    store: SignedStore, count: int, timeout_s: float, environ: Mapping[str, str] = os.environ
) -> list[Shard]:
    """Every shard's replicas and record, once all have published their addresses."""
    replication = read_replication(store)
    keys = [server_key(i) for i in range(count)]
    if replication > 1:
        keys += [backup_key(i) for i in range(count)]
    wait_published(store, keys, count, timeout_s)
    records = open_records(store, environ)
    try:
        shards = []
        for i in range(count):
            addresses = [ServerAddress.parse(i, store.get(server_key(i)), environ)]
            if replication > 1:
                addresses.append(ServerAddress.parse(i, store.get(backup_key(i)), environ))
            shards.append(Shard(addresses, records.get(i)))
        return shards
    finally:
        records.close()
