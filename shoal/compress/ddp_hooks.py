"""DDP communication hooks that apply a `Compressor` to each gradient bucket.

One `CompressionHook` per DDP model picks the exchange that is correct for
its compressor:

- "none": no hook; DDP's own all-reduce (only the bytes are counted).
- "fp16"/"bf16": cast, all-reduce, cast back, as torch's
  `default_hooks.fp16_compress_hook` / `bf16_compress_hook` do (ours counts
  its callback: `shoal.group_callbacks`).
- "powersgd": `shoal.compress.powersgd_hook` (error feedback and warm
  start; its two all-reduces, of P and of Q, keep one shared factorization
  on all ranks; why not torch's `powerSGD_hook`: see there).
- random-k (`allreduce_safe`): the positions are the same on every rank
  (seeded by key and step), so the ranks all-reduce the selected values.
- int8/qsgd: codes with per-rank scales do not add up, so the ranks reduce
  them in two phases, with an all-reduce's traffic (`ChunkPlan`): the
  bucket's blocks split into N chunks; an all-to-all sends each rank's code
  of chunk j to rank j, which decodes the N codes, sums them in rank order,
  divides by N and rounds the average again (`Quantizer.requantize`); an
  all-gather of these codes lets every rank decode the same N chunks. Each
  rank sends 2(N-1)/N x the compressed size and decodes about two gradients'
  worth (an all-gather of whole payloads sent (N-1) x and decoded N; it made
  int8 slower than fp32 at 10 Gbit/s with 4 ranks). Timed on the 5.3M MLP's
  gradients with gloo on loopback (`benchmarks/dp_exchange.py`), the hook ran
  1.6-2.1x faster than the all-gather at N = 4 and 0.94-1.3x (medians of
  runs: not slower) at N = 2, where the bytes are the same, so it is used at
  every N. Two stochastic roundings, each unbiased: the average
  stays unbiased, with the second rounding's variance added. Blocks are each
  tensor's own and the second rounding's dither is keyed by tensor, position
  and step, not by rank or bucket, so the result does not depend on DDP's
  bucket layout (which changes after the first step and after a restart):
  a resumed run takes the same steps. The all-to-all is waited for in the
  hook, so that the all-gather it leads to starts in bucket order on every
  rank; the all-gather runs on while backward goes on.
- top-k: each rank's payload has its own indices; ranks all-gather the
  encoded payloads (as equal-sized byte buffers: same shapes give same
  layouts) and each decodes all and averages.

Every hook checks the averaged result: a non-finite gradient (fp16
overflow, a NaN loss) is flagged so the strategy skips the step, as
mixed-precision training does. `bytes_sent` counts what the bandwidth-optimal
ring algorithm puts on the wire from this rank: 2(N-1)/N x size for an
all-reduce, (N-1) x size for an all-gather (size: one rank's part), (N-1)/N x
size for an all-to-all (size: the whole buffer); the first two are 1 x size
at N = 2.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shoal.compress.base import Compressor, Payload
from shoal.compress.lowrank import PowerSGD
from shoal.compress.powersgd_hook import PowerSGDHook
from shoal.compress.quantize import BLOCK, Quantizer
from shoal.finite import all_finite
from shoal.group_callbacks import after
from shoal.state import sub_state, with_prefix

POWERSGD = "powersgd/"
"""Prefix of the PowerSGD hook's state in the hook's state dict."""


def wire_bytes(collective: str, size: int, world: int) -> float:
    if world <= 1:
        return 0.0
    if collective == "all_reduce":
        return 2.0 * (world - 1) / world * size
    if collective == "all_to_all":  # `size`: the whole buffer, of which 1/world stays here
        return (world - 1) / world * size
    return float((world - 1) * size)


class ChunkPlan:
    """How a bucket of quantized gradients splits into `world` chunks of whole blocks.

    The blocks are each tensor's own (`quantize.BLOCK` elements; a tensor's last
    may be short), listed tensor after tensor in bucket order, and chunk j is
    the j-th run of ceil(blocks / world) of them (the last runs may be shorter or
    empty). A tensor thus lies in a chunk as one piece (index, first element, end
    element) starting on a block. Chunk j's payload, as bytes, is its pieces'
    scales then their codes, zero-padded to `size` bytes, the largest chunk's
    rounded up to 8: equal-sized buffers for the collectives, and scales aligned.
    Same numels, dtype and world give the same plan on every rank.
    """

    def __init__(
        self, numels: list[int], bits: int, scale_dtype: torch.dtype, world: int, device: torch.device | None = None
    ):
        self.world = world
        self.device = device  # the bucket's: where padding and sums are made
        self.bits = bits
        self.code_dtype = torch.int8 if bits == 8 else torch.uint8  # as `Quantizer._pack` makes them
        self.scale_dtype = scale_dtype
        self.scale_size = scale_dtype.itemsize
        blocks = [-(-n // BLOCK) for n in numels]
        per = max(1, -(-sum(blocks) // world))
        self.chunks: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
        first = 0  # bucket-wide index of this tensor's first block
        for index, (n, b) in enumerate(zip(numels, blocks, strict=True)):
            at = 0  # block within the tensor
            while at < b:
                j = (first + at) // per
                take = min(b - at, (j + 1) * per - first - at)
                self.chunks[j].append((index, at * BLOCK, min((at + take) * BLOCK, n)))
                at += take
            first += b
        self.size = max(self._used(pieces) for pieces in self.chunks)
        self.size += -self.size % 8

    def code_range(self, start: int, end: int) -> tuple[int, int]:
        """Bytes of the packed codes that hold elements start..end (start on a block)."""
        return (start, end) if self.bits == 8 else (start // 2, -(-end // 2))

    def _used(self, pieces) -> int:
        out = 0
        for _, start, end in pieces:
            lo, hi = self.code_range(start, end)
            out += -(-(end - start) // BLOCK) * self.scale_size + hi - lo
        return out

    def _pack(self, j: int, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Chunk j's payload as byte tensors to concatenate: `parts` holds each piece's
        (codes, scales), in the chunk's order."""
        out = [s.contiguous().view(torch.uint8) for _, s in parts] + [c.view(torch.uint8) for c, _ in parts]
        pad = self.size - self._used(self.chunks[j])
        return [*out, torch.zeros(pad, dtype=torch.uint8, device=self.device)] if pad else out

    def _unpack(self, j: int, raw: torch.Tensor) -> list[Payload]:
        """The payload of each piece of chunk j, viewed in `raw` (`size` bytes, 8-byte aligned)."""
        pieces = self.chunks[j]
        at, scales = 0, []
        for _, start, end in pieces:
            nbytes = -(-(end - start) // BLOCK) * self.scale_size
            scales.append(raw[at : at + nbytes].view(self.scale_dtype))
            at += nbytes
        out = []
        for (_, start, end), scale in zip(pieces, scales, strict=True):
            lo, hi = self.code_range(start, end)
            out.append(Payload({}, [raw[at : at + hi - lo].view(self.code_dtype), scale]))
            at += hi - lo
        return out

    # ------------------------------------------------------------ the exchange's steps
    def send(self, payloads: list[Payload]) -> torch.Tensor:
        """Step 1: this rank's encodings of the bucket's tensors as `world` chunk payloads,
        chunk j for rank j (`world` x `size` bytes, for `all_to_all_single`)."""
        parts = []
        for j, pieces in enumerate(self.chunks):
            chunk = []
            for i, start, end in pieces:
                code, scale = payloads[i].tensors
                lo, hi = self.code_range(start, end)
                chunk.append((code[lo:hi], scale[start // BLOCK : -(-end // BLOCK)]))
            parts += self._pack(j, chunk)
        return torch.cat(parts)

    def reduce(
        self,
        rank: int,
        received: torch.Tensor,
        quantizer: Quantizer,
        keys: list[str],
        counts: list[int],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Step 2, on rank `rank`: `received` holds every rank's payload of chunk `rank`
        (rank order); returns the chunk's average, rounded again, as its payload (`size`
        bytes, for the all-gather). The sum runs in rank order, in `dtype`, from rank 0's
        decoded values (a sum from zero differs only in the sign of a zero, which rounds
        to the same code)."""
        raws = [received[r * self.size : (r + 1) * self.size] for r in range(self.world)]
        payloads = [self._unpack(rank, raw) for raw in raws]
        parts = []
        for n, (i, start, end) in enumerate(self.chunks[rank]):
            total = torch.empty(end - start, dtype=dtype, device=self.device)
            quantizer.decode_into(payloads[0][n], total)  # as zeros plus rank 0's: the codes come out the same
            for from_rank in payloads[1:]:
                quantizer.decode_add(from_rank[n], total)
            again = quantizer.requantize(keys[i], counts[i], total.div_(self.world), start)
            parts.append((again.tensors[0], again.tensors[1]))
        return torch.cat(self._pack(rank, parts))

    def decode(
        self,
        gathered: list[torch.Tensor],
        quantizer: Quantizer,
        grads: list[torch.Tensor],
    ) -> None:
        """Step 3: every chunk's reduced payload (chunk j from rank j) decoded into `grads`."""
        for j, raw in enumerate(gathered):
            for (i, start, end), payload in zip(self.chunks[j], self._unpack(j, raw), strict=True):
                quantizer.decode_into(payload, grads[i].view(-1)[start:end])


class CompressionHook:
    """Registers the right hook on `ddp` and keeps this step's byte counts."""

    def __init__(
        self,
        compressor: Compressor,
        ddp: DistributedDataParallel,
        names: dict[int, str],
        group: dist.ProcessGroup | None = None,
    ):
        self.compressor = compressor
        self.names = names  # id(parameter) -> parameter name
        self.world = dist.get_world_size(group)
        self.params = [p for p in ddp.parameters() if p.requires_grad]
        self.powersgd: PowerSGDHook | None = None
        self._plans: dict[tuple, ChunkPlan] = {}
        self.reset()
        family = compressor.family
        if family == "none":
            return
        if family in ("fp16", "bf16"):
            ddp.register_comm_hook(group, self._cast_hook(torch.float16 if family == "fp16" else torch.bfloat16))
        elif isinstance(compressor, PowerSGD):
            self.powersgd = PowerSGDHook(
                compressor.rank, names, lambda nbytes, numel: self.count("all_reduce", nbytes, numel), self._flag
            )
            ddp.register_comm_hook(group, self.powersgd.hook)
        elif isinstance(compressor, Quantizer):
            ddp.register_comm_hook(group, self._two_phase_hook)
        else:
            ddp.register_comm_hook(group, self._payload_hook)

    # ------------------------------------------------------------ accounting
    def reset(self) -> None:
        self.sent = 0.0
        self.uncompressed = 0.0
        self.nonfinite = False

    def take(self) -> dict:
        """This step's figures; called once per synchronized step."""
        if self.compressor.family == "none":
            size = sum(p.numel() * p.element_size() for p in self.params)
            self.sent = self.uncompressed = wire_bytes("all_reduce", size, self.world)
        out = {"bytes_sent": self.sent, "uncompressed": self.uncompressed, "nonfinite": self.nonfinite}
        self.reset()
        return out

    def count(self, collective: str, nbytes: int, numel: int) -> None:
        self.sent += wire_bytes(collective, nbytes, self.world)
        self.uncompressed += wire_bytes("all_reduce", numel * 4, self.world)

    def check(self, result: torch.Tensor) -> torch.Tensor:
        if not all_finite(result):
            self._flag()
        return result

    def _flag(self) -> None:
        self.nonfinite = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.powersgd is not None:
            return with_prefix(self.powersgd.state_dict(), POWERSGD)
        return self.compressor.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.powersgd is not None:
            self.powersgd.load_state_dict(sub_state(state, POWERSGD))
        else:
            self.compressor.load_state_dict(state)

    # ------------------------------------------------------------ hooks
    def _cast_hook(self, dtype: torch.dtype):
        """Cast, all-reduce, cast back: torch's `default_hooks.fp16_compress_hook` (and bf16's), with the
        callback counted (`shoal.group_callbacks`) and the finite check in it."""

        def hook(group, bucket):
            buffer = bucket.buffer()
            n = buffer.numel()
            self.count("all_reduce", n * dtype.itemsize, n)
            sent = buffer.to(dtype).div_(self.world)

            def cast_back(fut):
                buffer.copy_(fut.value()[0])
                return self.check(buffer)

            return after(dist.all_reduce(sent, group=group, async_op=True), cast_back)

        return hook

    def _payload_hook(self, group, bucket):
        group = group if group is not None else dist.group.WORLD
        grads = bucket.gradients()
        keys = [self.names[id(p)] for p in bucket.parameters()]
        payloads = [self.compressor.encode(k, g) for k, g in zip(keys, grads, strict=True)]
        numel = sum(g.numel() for g in grads)
        buffer = bucket.buffer()

        def finish(decoded_sums):
            for g, d in zip(grads, decoded_sums, strict=True):
                g.copy_(d.reshape(g.shape).div_(self.world))
            return self.check(buffer)

        if self.compressor.allreduce_safe:
            flat = torch.cat([t.reshape(-1) for p in payloads for t in p.tensors])
            self.count("all_reduce", flat.numel() * flat.element_size(), numel)

            def reduced(fut):
                summed = fut.value()[0]
                out, at = [], 0
                for p, g in zip(payloads, grads, strict=True):
                    parts = []
                    for t in p.tensors:
                        parts.append(summed[at : at + t.numel()].view(t.shape))
                        at += t.numel()
                    p.tensors = parts
                    out.append(self.compressor.decode(p, g.shape, g.dtype))
                return finish(out)

            return after(dist.all_reduce(flat, group=group, async_op=True), reduced)

        layout = [(t.dtype, t.shape, t.numel() * t.element_size()) for p in payloads for t in p.tensors]
        flat = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for p in payloads for t in p.tensors])
        self.count("all_gather", flat.numel(), numel)
        gathered = [torch.empty_like(flat) for _ in range(self.world)]

        def gathered_all(fut):
            for g in grads:  # encoded already: the sum goes where the gradient was
                g.zero_()
            for raw in gathered:
                tensors, at = [], 0
                for dtype, shape, nbytes in layout:
                    tensors.append(raw[at : at + nbytes].clone().view(dtype).view(shape))  # clone: aligned storage
                    at += nbytes
                i = 0
                for p, g in zip(payloads, grads, strict=True):
                    received = Payload(p.header, tensors[i : i + len(p.tensors)])
                    i += len(p.tensors)
                    self.compressor.decode_add(received, g)
            for g in grads:
                g.div_(self.world)
            return self.check(buffer)

        return after(dist.all_gather(gathered, flat, group=group, async_op=True), gathered_all)

    def _two_phase_hook(self, group, bucket):
        """int8/qsgd: each rank sends its code for chunk j to rank j (all-to-all), which
        sums the N decoded codes, divides by N, rounds the average again and sends that
        code to all (all-gather); every rank decodes all N chunks."""
        compressor = self.compressor
        assert isinstance(compressor, Quantizer)
        group = group if group is not None else dist.group.WORLD
        world, rank = self.world, dist.get_rank(group)
        grads = bucket.gradients()
        keys = [self.names[id(p)] for p in bucket.parameters()]
        buffer = bucket.buffer()
        payloads = [compressor.encode(k, g) for k, g in zip(keys, grads, strict=True)]
        counts = [compressor.counts[k] - 1 for k in keys]  # this encode's: the same on every rank
        scale_dtype = payloads[0].tensors[1].dtype
        numels = [g.numel() for g in grads]
        plan_key = (tuple(numels), scale_dtype, world, buffer.device)
        plan = self._plans.get(plan_key)
        if plan is None:
            plan = self._plans[plan_key] = ChunkPlan(numels, compressor.bits, scale_dtype, world, buffer.device)

        send = plan.send(payloads)
        recv = torch.empty_like(send)
        self.count("all_to_all", send.numel(), sum(numels))
        self.count("all_gather", plan.size, 0)
        # Synchronous, so that every rank starts its collectives in the same order (DDP
        # calls the hooks bucket after bucket); a collective started from a callback
        # could overtake the next bucket's on one rank and not on another.
        dist.all_to_all_single(recv, send, group=group)
        out = plan.reduce(rank, recv, compressor, keys, counts, buffer.dtype)
        gathered = [torch.empty_like(out) for _ in range(world)]

        def gathered_all(fut):
            plan.decode(gathered, compressor, grads)
            return self.check(buffer)

        return after(dist.all_gather(gathered, out, group=group, async_op=True), gathered_all)
