"""Ray beyond the defaults: a local cluster listens on loopback only, and a run spreads over
two nodes (ray.cluster_utils.Cluster, both on loopback) with the learner on one node and the
rollout worker on the other, so the multi-node path through placement groups is exercised."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    # A dual-stack socket bound to 127.0.0.1 shows as the IPv4-mapped ::ffff:127.0.0.1.
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def test_loopback_classification():
    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("::ffff:127.0.0.1")
    assert not _loopback("0.0.0.0") and not _loopback("::") and not _loopback("::ffff:10.0.0.5")
    assert not _loopback("192.168.1.4")


def test_a_local_cluster_listens_on_loopback_only(ray_local):
    import psutil

    ray = ray_local
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    me = psutil.Process()
    listening, exposed = [], []
    for proc in [me, *me.children(recursive=True)]:  # the GCS, raylet, agents and workers we started
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                listening.append((name, c.laddr))
                if not _loopback(c.laddr.ip):
                    exposed.append((name, c.laddr))
    assert any("gcs_server" in n or "raylet" in n for n, _ in listening), listening
    assert not exposed, f"listening beyond loopback: {exposed}"


# A child process: ray.init can join only one cluster per process, and the session's Ray is another.
_TWO_NODES = """
import json, sys
from rl.cluster import loopback_env
import os
os.environ.update(loopback_env())
import ray
from ray.cluster_utils import Cluster
from rl.config import load_config
from rl.trainer import Trainer

out = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 * 2**20,
                                                         "node_ip_address": "127.0.0.1"})
cluster.add_node(num_cpus=1, object_store_memory=200 * 2**20, node_ip_address="127.0.0.1")
cluster.wait_for_nodes()
cfg = load_config("launch/configs/tiny.yaml", [f"cluster.address={cluster.address}", "cluster.colocate=false",
                  f"logging.output_dir={out}", "logging.run_name=two", "trainer.steps=2", "trainer.eval_size=0",
                  "logging.progress=false", "logging.tensorboard=false"])
trainer = Trainer(cfg, __import__("pathlib").Path(out) / "two")
try:
    trainer.fit()
    learner = trainer.learner._call("node_id")
    rollout = [ray.get(w.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
               for w in trainer.rollout.workers]
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
finally:
    trainer.close()
    ray.shutdown()
    cluster.shutdown()
print("NODES " + json.dumps({"learner": learner, "rollout": rollout, "nodes": nodes}))
"""


def test_learner_and_rollout_on_two_nodes_run_two_steps(tmp_path, tiny_model_path):
    from rl.metrics_log import read_metrics

    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", _TWO_NODES, str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    found = json.loads(r.stdout.split("NODES ", 1)[1])
    assert len(set(found["nodes"])) == 2
    assert set(found["learner"]).isdisjoint(found["rollout"]), found  # one node each
    assert set(found["learner"] + found["rollout"]) == set(found["nodes"])
    assert [m["step"] for m in read_metrics(tmp_path / "two")] == [1, 2]
    assert (tmp_path / "two" / "checkpoints" / "step-000002" / "COMPLETE").exists()
