"""In-process tests of the parameter server's parts: wire codec, placement,
consistency rules, strategy options."""

from __future__ import annotations

import itertools
import pickle

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.comm.security import Transport
from shoal.comm.wire import MAX_HEADER, TAG_BYTES, Codec, WireError
from shoal.errors import ConfigError
from shoal.ps.consistency import Gate, Mode, parse_mode, resolve
from shoal.ps.placement import plan

KEY = b"k" * 32


# ------------------------------------------------------------------ wire
def _codec(curve: bool, key: bytes = KEY, **kwargs) -> Codec:
    """A codec for sockets with CURVE (tags, no MAC) or without (HMAC), whatever SHOAL_CURVE says here."""
    return Codec(key, transport=Transport(key, curve=curve), **kwargs)


@pytest.mark.parametrize("curve", [True, False])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool]
)
def test_wire_round_trip_keeps_dtype_shape_and_bytes(dtype, curve):
    codec = _codec(curve)
    tensors = [torch.randn(3, 5).to(dtype), torch.zeros(0, 4, dtype=dtype), torch.tensor(1.5).to(dtype)]
    header, out = codec.decode(codec.encode({"op": "x", "n": [1, 2]}, tensors))
    assert header == {"op": "x", "n": [1, 2]}
    for a, b in zip(tensors, out, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_wire_received_tensors_share_the_frame_memory():
    codec = Codec(KEY)
    frames = [bytearray(f) for f in codec.encode({}, [torch.arange(4.0)])]
    _, (t,) = codec.decode(frames)
    frames[2][0:4] = torch.tensor([9.0]).numpy().tobytes()
    assert t[0].item() == 9.0  # no copy was made


def test_wire_sends_non_contiguous_tensors_correctly():
    codec = Codec(KEY)
    t = torch.arange(12.0).reshape(3, 4).t()
    _, (out,) = codec.decode(codec.encode({}, [t]))
    assert torch.equal(out, t)


def test_wire_signs_only_where_the_transport_is_not_curve(monkeypatch):  # SHOAL_CURVE decides, on both ends
    for name in ("1", "0"):
        monkeypatch.setenv("SHOAL_CURVE", name)
        assert Codec(KEY).signed is (name == "0")


def test_wire_under_curve_computes_no_mac_and_frames_a_message_between_two_tags(monkeypatch):
    def no_mac(*_):
        raise AssertionError("a MAC was computed under CURVE")

    monkeypatch.setattr(Codec, "_buffers_mac", no_mac)
    monkeypatch.setattr(Codec, "_mac", no_mac)
    codec = _codec(True)
    first, second = codec.encode_many([{"op": "push", "n": 1}, {"op": "push", "n": 2}], [torch.ones(4)])
    assert len(first) == 4 and len(first[0]) == TAG_BYTES and first[0] == first[-1] != second[0]
    assert codec.decode(first)[0] == {"op": "push", "n": 1}
    assert codec.decode(codec.encode({"op": "bye"}))[0] == {"op": "bye"}


def _cut_and_spliced(codec: Codec):
    """What an attacker on the path can make of CURVE frames, which it can delete but not change."""
    a, b = (codec.encode({"op": "push", "n": n}, [torch.full((4,), float(n))]) for n in (1, 2))
    yield [*a[:2], *b[2:]]  # the head of one message, the tail of the next, with the same shapes
    yield [*a[:1], *b[1:]]  # another's header and tensors behind this one's tag
    yield [*a[:2], a[3]]  # a tensor dropped
    yield a[:3]  # the closing tag dropped
    yield [a[0], *a]  # the tag twice at the start
    yield [b"", *a[1:-1], b""]  # empty tags (what a sender with neither tag nor MAC would send)


def test_wire_under_curve_refuses_messages_cut_or_spliced_in_transit():
    codec = _codec(True)
    for bad in _cut_and_spliced(codec):
        with pytest.raises(WireError, match="malformed"):
            codec.decode(bad)


def test_wire_a_mismatched_shoal_curve_is_refused_with_a_sentence_naming_it():
    signed, tagged = _codec(False), _codec(True)
    for frames in (tagged.encode({"op": "push"}, [torch.ones(2)]), tagged.encode({"op": "bye"})):
        with pytest.raises(WireError, match="unauthenticated: not signed: is SHOAL_CURVE=0 here"):
            signed.decode(frames)
    for frames in (signed.encode({"op": "push"}, [torch.ones(2)]), signed.encode({"op": "bye"})):
        with pytest.raises(WireError, match="malformed: signed, on a CURVE socket: is SHOAL_CURVE=0 where"):
            tagged.decode(frames)


def _mutations(frames):
    frames = [bytes(f) for f in frames]
    yield "unauthenticated", [frames[0][:-1] + bytes([frames[0][-1] ^ 1]), *frames[1:]]
    yield "unauthenticated", [*frames[:-1], frames[-1][:-4]]  # truncated buffer
    yield "unauthenticated", frames[:-1]  # a frame dropped
    yield "unauthenticated", [*frames, b"more"]
    yield "malformed", [b"", *frames[1:]]  # no MAC at all
    yield "malformed", frames[:1]


def test_wire_without_curve_detects_every_tampering():
    codec = _codec(False)
    frames = codec.encode({"op": "push"}, [torch.ones(4)])
    for reason, bad in _mutations(frames):
        with pytest.raises(WireError) as err:
            codec.decode(bad)
        assert err.value.reason == reason


def test_wire_without_curve_refuses_other_keys():
    with pytest.raises(WireError, match="unauthenticated"):
        _codec(False).decode(_codec(False, b"x" * 32).encode({}, [torch.ones(2)]))


@pytest.mark.parametrize("curve", [True, False])
def test_wire_refuses_size_limit_dtypes_and_pickles_with_or_without_curve(curve):
    codec = _codec(curve, max_bytes=1000)
    with pytest.raises(WireError, match="oversized"):
        codec.decode(_codec(curve).encode({}, [torch.ones(300)]))

    def sealed(header_bytes, *bufs):  # frames that pass the seal, whatever they hold
        return codec._sealed(header_bytes, bufs)

    with pytest.raises(WireError, match="bad_dtype"):
        codec.decode(sealed(msgpack.packb({"tensors": [["object", [1]]]}), b"x" * 8))
    with pytest.raises(WireError, match="bad_size"):
        codec.decode(sealed(msgpack.packb({"tensors": [["float32", [3]]]}), b"x" * 8))
    with pytest.raises(WireError, match="malformed"):
        codec.decode(sealed(pickle.dumps({"tensors": []})))
    with pytest.raises(WireError, match="malformed"):
        codec.decode(sealed(msgpack.packb({"tensors": [["float32", [-1]]]}), b""))
    with pytest.raises(WireError, match="malformed"):  # msgpack extension types are refused
        codec.decode(sealed(msgpack.packb({"tensors": [], "x": msgpack.ExtType(1, b"abc")})))
    roomy = _codec(curve)
    with pytest.raises(WireError, match="malformed"):  # a header over the limit
        roomy.decode(roomy._sealed(b"\x81" * (MAX_HEADER + 1), ()))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), min_size=0, max_size=6), st.booleans())
def test_wire_random_frames_only_ever_raise_wire_error(frames, curve):
    codec = _codec(curve, max_bytes=1 << 30)
    try:
        header, tensors = codec.decode(frames)
    except WireError:
        return
    assert curve and isinstance(header, dict) and isinstance(tensors, list)  # unsigned: well-formed is enough


# ------------------------------------------------------------------ placement
def test_placement_balances_very_uneven_tensors():
    sizes = [
        ("embed", 1_000_000, 4),
        ("big", 300_000, 4),
        *[(f"small{i}", 1000 + 37 * i, 4) for i in range(40)],
        ("bias", 10, 4),
    ]
    p = plan(sizes, servers=4, chunk_bytes=1 << 18)
    assert p.imbalance < 1.05, p.describe()
    unsplit = plan(sizes, servers=4, chunk_bytes=1 << 40)
    assert unsplit.imbalance > 2.0  # without chunks the embedding alone overloads one server
    embed_servers = {pc.server for pc in p.pieces if pc.name == "embed"}
    assert len(embed_servers) == 4  # its chunks are spread over all servers


def test_placement_covers_every_element_once_and_is_deterministic():
    sizes = [("a", 1001, 4), ("b", 7, 2), ("c", 50_000, 4)]
    p1, p2 = plan(sizes, 3, 4096), plan(list(sizes), 3, 4096)
    assert p1.pieces == p2.pieces
    for name, numel, _ in sizes:
        ranges = sorted((pc.start, pc.stop) for pc in p1.pieces if pc.name == name)
        assert ranges[0][0] == 0 and ranges[-1][1] == numel
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert len({pc.key for pc in p1.pieces}) == len(p1.pieces)


# ------------------------------------------------------------------ consistency
def test_modes_parse_and_first_override_wins():
    assert parse_mode("ssp", 3, "k") == Mode("ssp", 3) and parse_mode("ssp:1", 3, "k") == Mode("ssp", 1)
    modes = resolve(
        ["embedding.weight", "head.weight", "head.bias"], Mode("bsp"), {"head.b*": "asp", "head.*": "ssp:2"}, 0
    )
    assert modes == {"embedding.weight": Mode("bsp"), "head.weight": Mode("ssp", 2), "head.bias": Mode("asp")}
    for bad in ("sync", "asp:1", "ssp:x"):
        with pytest.raises(ConfigError):
            parse_mode(bad, 0, "consistency")


def test_gate_rules():
    bsp = Gate(2, [Mode("bsp")])
    assert bsp.ready(0) and not bsp.ready(1)
    bsp.pushed = [1, 0]
    assert bsp.waiting_on(1) == [1]
    ssp = Gate(3, [Mode("ssp", 2), Mode("asp")])
    ssp.pushed = [5, 3, 4]
    assert ssp.ready(5) and not ssp.ready(6) and ssp.waiting_on(6) == [1]
    ssp.answered(5)
    assert ssp.max_gap == 2
    asp = Gate(2, [Mode("asp")])
    assert asp.ready(100)


# ------------------------------------------------------------------ strategy options
def test_strategy_options_are_checked_before_anything_starts():
    from shoal.strategies.parameter_server import ParameterServer

    for kwargs, key in [
        ({"consistency": "eventual"}, "consistency"),
        ({"overrides": {"a.*": "fast"}}, "overrides.a.*"),
        ({"staleness": -1}, "staleness"),
        ({"compression": "topk:2"}, "compression"),
        ({"compression": "int3"}, "compression"),
        ({"servers": 0}, "servers"),
    ]:
        with pytest.raises(ConfigError) as err:
            ParameterServer(**kwargs)
        assert err.value.key == key
    with pytest.raises(TypeError):  # stragglers are a test hook now (shoal.faults), not a user option
        ParameterServer(debug_slowdown="1:0.1")


def test_servers_default_to_the_launchers_count():
    from shoal.strategies.parameter_server import ParameterServer

    assert ParameterServer().options.servers is None  # resolved at prepare, from the launcher
    assert ParameterServer().options.server_processes(2) == 1  # what `shoal train` starts without the key
    assert ParameterServer(servers=3).options.server_processes(2) == 3


def test_an_override_that_matches_no_parameter_is_a_clear_error_at_prepare():
    from shoal.strategies.parameter_server import ParameterServer

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    strategy = ParameterServer(overrides={"embedding.*": "asp"})
    with pytest.raises(ConfigError, match=r"override 'embedding.\*' matches no parameter.*0.weight, 0.bias") as err:
        strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert err.value.key == "overrides.embedding.*"


def test_unsupported_optimizer_is_a_clear_error_at_prepare():
    from shoal.strategies.parameter_server import ParameterServer

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="LBFGS on its servers because it re-evaluates the whole model"):
        ParameterServer().prepare(model, torch.optim.LBFGS(model.parameters()))


def test_without_servers_prepare_says_how_to_start_them(monkeypatch):
    from shoal.errors import ShoalError
    from shoal.strategies.parameter_server import ParameterServer

    monkeypatch.delenv("SHOAL_PS_STORE", raising=False)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ShoalError, match=r"shoal run -n N --servers S"):
        ParameterServer().prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))


# ------------------------------------------------------------------ publish/subscribe
@pytest.mark.parametrize("curve", [True, False])
def test_pubsub_delivers_authenticated_rows_and_drops_strangers(curve):
    import time

    from shoal.comm.pubsub import Publisher, Subscriber

    sub = Subscriber(_codec(curve))
    good = Publisher(sub.endpoint, _codec(curve))
    stranger = Publisher(sub.endpoint, _codec(curve, b"s" * 32))  # another job's key
    # no key, no CURVE, and well-formed messages of the kind a CURVE socket carries (tags, no MAC)
    unsigned = Publisher(sub.endpoint, _codec(False, b"s" * 32))
    unsigned.codec = _codec(True, b"s" * 32)
    got, deadline = [], time.monotonic() + 10
    try:
        while not got and time.monotonic() < deadline:  # PUB drops what it sends before the connection is up
            stranger.publish("metrics", {"rank": 9})
            good.publish("metrics", {"rank": 1, "step": 3})
            got = sub.poll(100)
        for _ in range(10):  # by now the other connections are up too, if they were let in
            stranger.publish("metrics", {"rank": 9})
            unsigned.publish("metrics", {"rank": 8})
            time.sleep(0.05)
        got += sub.poll(200)
    finally:
        for p in (good, stranger, unsigned):
            p.close()
        sub.close()
    assert got and all(m == {"rank": 1, "step": 3, "topic": "metrics"} for m in got)
    if curve:
        assert sub.dropped == 0  # the strangers never got a message in: refused at the connection
    else:
        assert sub.dropped > 0  # they got in, and their rows were refused: another key's MAC, or none


# ------------------------------------------------------------------ non-finite and out-of-range values
@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"timeout_s": float("inf")}, "timeout_s"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"max_message_mb": float("inf")}, "max_message_mb"),
        ({"max_message_mb": float("nan")}, "max_message_mb"),
        ({"max_message_mb": 1e-9}, "max_message_mb"),
    ],
)
def test_strategy_refuses_non_finite_limits(kwargs, key):
    from shoal.strategies.parameter_server import ParameterServer

    with pytest.raises(ConfigError) as err:
        ParameterServer(**kwargs)
    assert err.value.key == key and str(err.value).startswith(f"'{key}' must be")


def test_hyperparameters_out_of_range_are_refused_on_both_sides():
    from shoal.errors import ShoalError
    from shoal.ps import optim

    ok = optim.check_hyperparameters("Adam", {"lr": 1, "betas": [0.9, 0.999], "amsgrad": False})
    assert ok == {"lr": 1.0, "betas": (0.9, 0.999), "amsgrad": False}
    fixed = optim.flags("Adam", ok)
    assert fixed["amsgrad"] is False
    for hp in (
        {"lr": float("nan")},
        {"lr": -1.0},
        {"lr": float("inf")},
        {"lr": True},
        {"eps": -1e-8},
        {"weight_decay": float("nan")},
        {"betas": [1.0, 0.9]},
        {"betas": [0.9, float("nan")]},
        {"amsgrad": 1},
        {"foreach": True},
    ):
        with pytest.raises(ValueError):
            optim.check_hyperparameters("Adam", hp, fixed)
    with pytest.raises(ValueError, match="amsgrad cannot change"):
        optim.check_hyperparameters("Adam", {"amsgrad": True}, fixed)
    # the worker names the problem before it sends anything
    p = torch.zeros(2, requires_grad=True)
    sgd = torch.optim.SGD([p], lr=0.1)
    sgd.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ShoalError, match="lr must be a finite number, not nan"):
        optim.hyperparameters("SGD", sgd.param_groups[0])


def test_restored_optimizer_state_must_be_complete_and_finite():
    from shoal.ps import optim

    p = torch.zeros(3)
    opt = optim.build("Adam", p, {"lr": 0.1, "amsgrad": True})
    step, m = torch.tensor(2.0), torch.ones(3)
    for items in (
        [("step", step)],
        [("step", step), ("exp_avg", m), ("exp_avg_sq", m)],  # amsgrad needs max_exp_avg_sq too
        [("step", step), ("exp_avg", m * float("nan")), ("exp_avg_sq", m), ("max_exp_avg_sq", m)],
    ):
        with pytest.raises(ValueError):
            optim.import_state("Adam", opt, p, items)
    optim.import_state("Adam", opt, p, [("step", step), ("exp_avg", m), ("exp_avg_sq", m), ("max_exp_avg_sq", m)])
    p.grad = torch.ones(3)
    opt.step()  # torch steps from it
    optim.import_state("Adam", opt, p, [])  # no state at all is a fresh start


def test_server_limits_from_the_environment_are_checked_before_any_server_starts():
    from shoal.ps.servers import server_limits, start_servers

    assert server_limits({}) == (1 << 30, 60.0)
    assert server_limits({"SHOAL_PS_MAX_BYTES": "4096", "SHOAL_PS_TIMEOUT_S": "2.5"}) == (4096, 2.5)
    for environ, key in [
        ({"SHOAL_PS_MAX_BYTES": "1e6"}, "SHOAL_PS_MAX_BYTES"),
        ({"SHOAL_PS_MAX_BYTES": "0"}, "SHOAL_PS_MAX_BYTES"),
        ({"SHOAL_PS_TIMEOUT_S": "inf"}, "SHOAL_PS_TIMEOUT_S"),
        ({"SHOAL_PS_TIMEOUT_S": "nan"}, "SHOAL_PS_TIMEOUT_S"),
        ({"SHOAL_PS_TIMEOUT_S": "-1"}, "SHOAL_PS_TIMEOUT_S"),
        ({"SHOAL_PS_TIMEOUT_S": "soon"}, "SHOAL_PS_TIMEOUT_S"),
    ]:
        with pytest.raises(ConfigError) as err:
            server_limits(environ)
        assert err.value.key == key and str(err.value).startswith(key)
    with pytest.raises(ConfigError, match="SHOAL_PS_TIMEOUT_S"):  # raised before a store or a process
        start_servers(1, "k" * 32, extra_env={"SHOAL_PS_TIMEOUT_S": "inf"})


def _to(server) -> dict:
    """What a request to `server` names besides its own fields: the server and its session."""
    return {"to": server.index, "session": server.session}


@pytest.mark.parametrize(
    "change, words",
    [
        ({"keys": [["w", "float32", [4], "ssp", "3", 0]]}, "staleness '3'"),
        ({"keys": [["w", "float32", [4], "bsp", 0, 1]]}, "param group 1 does not exist"),
        ({"keys": [["w", "float32", [4], "bsp", 0, -1]]}, "param group -1 does not exist"),
        ({"keys": [["w", "float32", [4], "eventual", 0, 0]]}, "mode 'eventual'"),
        ({"keys": [["w", "float32", [4], "bsp", 0]]}, "a key is [name"),
        ({"keys": [["w", "float32", [4], "bsp", 0, 0], ["w", "float32", [4], "bsp", 0, 0]]}, "named twice"),
        ({"code_shapes": [[-2, -2]]}, "is not a list of sizes"),
        ({"optim": "LBFGS"}, "optimizer 'LBFGS' is not one of SGD, Adam, AdamW"),
        ({"groups": {"lr": 0.1}}, "groups must list"),
        ({"groups": [{"lr": float("nan")}]}, "lr must be a finite number"),
        ({"groups": [{"lr": 0.1, "nesterov": True}]}, "Nesterov"),
        ({"compression": 3}, "compression 3 is not a spec"),
        ({"compression": "topk:7"}, "topk"),
    ],
)
def test_a_bad_init_spec_stops_the_server_in_one_sentence(change, words, capsys):
    from shoal.ps.server import Server

    codec = Codec(KEY)
    server = Server(0, codec)
    try:
        spec = {"optim": "SGD", "timeout_s": 5.0, "groups": [{"lr": 0.1}], "keys": [["w", "float32", [4], "bsp", 0, 0]]}
        spec.update(change)
        values = [torch.zeros(4)] * len(spec["keys"])
        server.handle(
            b"w0", codec.encode({"op": "init", "src": 0, "seq": 1, "world": 1, "spec": spec, **_to(server)}, values)
        )
        assert server.done, (server.dropped, server.last_drop)
        assert server.error.startswith("bad initial message from worker 0: ")
        assert words in server.error and "\n" not in server.error, server.error
        assert capsys.readouterr().err == f"shoal: {server.error}\n"
    finally:
        server.close(linger_ms=0)


def test_init_timeout_and_size_must_be_finite_and_positive():
    from shoal.ps.server import Server

    codec = Codec(KEY)
    server = Server(0, codec)
    try:
        for field, value in [
            ("timeout_s", float("inf")),
            ("timeout_s", float("nan")),
            ("timeout_s", 0),
            ("timeout_s", "60"),
            ("max_bytes", 0),
            ("max_bytes", 1.5),
            ("max_bytes", True),
        ]:
            spec = {"optim": "SGD", "groups": [{"lr": 0.1}], "keys": [], field: value}
            server.handle(
                b"w0", codec.encode({"op": "init", "src": 0, "seq": 1, "world": 2, "spec": spec, **_to(server)})
            )
        assert server.dropped == {"malformed": 7} and not server.joined and not server.done
    finally:
        server.close(linger_ms=0)


def test_a_bsp_average_that_overflows_drops_its_clock():
    from shoal.ps.server import Server

    codec = Codec(KEY)
    server = Server(0, codec)
    try:
        spec = {"optim": "SGD", "timeout_s": 5.0, "groups": [{"lr": 1.0}], "keys": [["w", "float16", [2], "bsp", 0, 0]]}
        w0 = torch.ones(2, dtype=torch.float16)
        for src in (0, 1):
            init = {"op": "init", "src": src, "seq": 1, "world": 2, "spec": spec, **_to(server)}
            server.handle(b"w%d" % src, codec.encode(init, [w0] if src == 0 else []))
        big = torch.full((2,), 60000.0, dtype=torch.float16)  # finite, but two of them sum past float16's 65504
        for clock, grad in enumerate((big, torch.ones(2, dtype=torch.float16))):
            for src in (0, 1):
                push = {
                    "op": "push",
                    "src": src,
                    "seq": 2 + clock,
                    "clock": clock,
                    "keys": ["w"],
                    "hp": [{}],
                    **_to(server),
                }
                server.handle(b"w%d" % src, codec.encode(push, [grad.clone()]))  # frames of its own, as off a socket
        assert server.nonfinite == 1 and server.skipped == 0 and not server.dropped
        assert server.gate is not None and server.gate.bsp_done == 2 and server.pieces["w"].steps == 1
        torch.testing.assert_close(server.pieces["w"].param, w0 - 1, rtol=0, atol=0)
    finally:
        server.close(linger_ms=0)


# ------------------------------------------------------------------ connection security and replay
def test_curve_keys_come_from_the_job_key_and_a_stranger_gets_no_message_in():
    import zmq

    ours, again, theirs = Transport(KEY, curve=True), Transport(KEY, curve=True), Transport(b"s" * 32, curve=True)
    assert (ours.server_public, ours.client_public) == (again.server_public, again.client_public)
    assert len({ours.server_public, ours.client_public, theirs.server_public, theirs.client_public}) == 4
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    ours.listen(server)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    socks = []
    for who in (theirs, ours):  # the stranger first: had it got in, its message would arrive first
        s = ctx.socket(zmq.DEALER)
        who.connect(s)
        s.connect(f"tcp://127.0.0.1:{port}")
        s.send(b"from ours" if who is ours else b"from theirs")
        socks.append(s)
    try:
        assert server.poll(5000)
        assert server.recv_multipart()[1] == b"from ours"
        assert not server.poll(500)
    finally:
        for s in [*socks, server]:
            s.close(linger=0)
        ours.close(ctx)
        ctx.term()


def test_one_time_ids_pass_once_and_only_near_the_servers_clock():
    import time

    from shoal.comm.replay import Once, addressed, one_time_id

    once = Once(window_s=60)
    first = one_time_id()
    assert once.fresh(first) and not once.fresh(first)
    assert not once.fresh(first - 61 * 10**9) and not once.fresh(first + 61 * 10**9)
    assert not once.fresh("1") and not once.fresh(True)
    assert once.fresh(one_time_id() + 1)
    assert addressed({"to": 2, "session": "ab"}, "ab", 2)
    assert not addressed({"to": 1, "session": "ab"}, "ab", 2) and not addressed({"to": 2, "session": "x"}, "ab", 2)
    assert not addressed({"to": True, "session": "ab"}, "ab", 1) and time.time_ns() > first
