"""The launcher names, for gloo and NCCL, the interface that routes to the rendezvous host."""

from __future__ import annotations

from shoal import env
from shoal.comm.netif import address_towards, interface_of, interface_towards
from shoal.launch.agent import LaunchSpec, _interfaces


def test_loopback_is_reached_through_lo():
    assert address_towards("127.0.0.1") == "127.0.0.1"
    assert interface_towards("127.0.0.1") == "lo"
    assert interface_of("203.0.113.77") is None  # an address no interface here holds


def test_the_launcher_sets_the_interface_only_on_several_machines_and_only_when_unset(monkeypatch):
    monkeypatch.delenv(env.GLOO_SOCKET_IFNAME, raising=False)
    monkeypatch.delenv(env.NCCL_SOCKET_IFNAME, raising=False)
    assert _interfaces(LaunchSpec(nnodes=1)) == {}
    several = LaunchSpec(nnodes=2, rdzv_endpoint="127.0.0.1:29500")
    assert _interfaces(several) == {env.GLOO_SOCKET_IFNAME: "lo", env.NCCL_SOCKET_IFNAME: "lo"}
    monkeypatch.setenv(env.GLOO_SOCKET_IFNAME, "eth7")
    assert _interfaces(several) == {env.NCCL_SOCKET_IFNAME: "lo"}
