"""What a job spanning hosts needs, checked on one host (tests/test_slurm_cluster.py runs it on several):

- the weight group's interface is the one the route to the peer leaves from (GLOO_/NCCL_SOCKET_IFNAME), and a
  name the user set wins; slurm/train.sbatch finds it on each replica's node, toward the trainer (MASTER_ADDR);
- attaching to a server URL waits with back-off up to rollout.sglang.startup_timeout_s and names the URL;
- a URL other hosts use is never loopback: a loopback group_host with servers elsewhere, loopback attached URLs
  or a loopback-bound owned server for ranks on several hosts are refused, naming the field.
"""

from __future__ import annotations

import time

import pytest

from rntp_megatron.config import LOOPBACK, ConfigError, SGLangConfig, build_config
from rntp_megatron.rollout.placement import check_reachable
from rntp_megatron.runtime.netif import interface_toward, is_loopback, socket_ifname_env
from rntp_megatron.runtime.spawn import free_port
from tests.test_launch import _dry_run, _steps


def test_the_interface_toward_a_peer_is_the_one_its_route_leaves_from():
    assert interface_toward(LOOPBACK) == "lo"
    assert socket_ifname_env(LOOPBACK, {}) == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    assert socket_ifname_env(LOOPBACK, {"GLOO_SOCKET_IFNAME": "ib0"})["GLOO_SOCKET_IFNAME"] == "ib0"  # the user's
    with pytest.raises(OSError, match="no-such-host.invalid"):
        interface_toward("no-such-host.invalid")
    assert is_loopback("127.0.0.7") and not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")


def test_sbatch_replicas_take_the_interface_of_their_route_to_the_trainer(tmp_path):
    steps = _steps(_dry_run(tmp_path, {"RNTP_NODES": "n1 n2", "RNTP_SGLANG_NODES": "1"}))
    [replica] = [s for s in steps if "sglang.launch_server" in s]
    assert "rntp_megatron.runtime.netif" in replica and "GLOO_SOCKET_IFNAME" in replica
    assert "NCCL_SOCKET_IFNAME" in replica and " n1 " in replica  # the route toward MASTER_ADDR


def test_attaching_waits_for_the_server_and_names_its_url():
    from rntp_megatron.rollout.sglang.client import SGLangServerError
    from rntp_megatron.rollout.sglang.engine import SGLangEngine

    url = f"http://{LOOPBACK}:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(SGLangServerError, match=f"{url}.*startup_timeout_s=3"):
        SGLangEngine(SGLangConfig(url=url, startup_timeout_s=3))
    assert 1.0 < time.monotonic() - t0 < 10  # asked again (0.5 + 1 s of back-off), gave up within the bound


def test_a_loopback_group_host_is_refused_for_servers_on_other_hosts():
    base = ["rollout.engine=sglang", "rollout.placement=separate", "rollout.sglang.weight_sync=distributed",
            "rollout.sglang.urls=[http://192.0.2.7:30000]"]
    build_config({}, [*base, "rollout.sglang.group_host=192.0.2.1"])
    with pytest.raises(ConfigError, match=r"rollout\.sglang\.group_host: '127\.0\.0\.1'.*192\.0\.2\.7"):
        build_config({}, [*base, "rollout.sglang.group_host=127.0.0.1"])


def test_ranks_on_several_hosts_are_never_told_a_loopback_url():
    sg = SGLangConfig()
    check_reachable(sg, [f"http://{LOOPBACK}:30000"], {"node1"})  # one host: its loopback is everyone's
    with pytest.raises(ConfigError, match=r"rollout\.sglang\.urls: \['http://127\.0\.0\.1:30000'\].*node2"):
        check_reachable(sg, [f"http://{LOOPBACK}:30000"], {"node1", "node2"})
    with pytest.raises(ConfigError, match=r"rollout\.sglang\.host: '127\.0\.0\.1'.*0\.0\.0\.0"):
        check_reachable(sg, [], {"node1", "node2"})  # an owned server bound to rank 0's loopback
    check_reachable(SGLangConfig(host="0.0.0.0"), [], {"node1", "node2"})
    check_reachable(sg, ["http://node3:30000"], {"node1", "node2"})
