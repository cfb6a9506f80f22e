"""The learner group on a simulated two-node GPU cluster: ranks away from the driver meet at rank 0's node,
each sees one GPU as its local device 0.

Two real Ray nodes run on this machine (ray.cluster_utils.Cluster): the head, where the driver is, without
GPUs, and a worker node that declares 2 GPUs. The GPUs are only declared (this machine has none): Ray still
assigns them, one per rank, through CUDA_VISIBLE_DEVICES, while the ranks train on CPU with gloo. That is
what a GPU cluster would decide, short of NCCL itself. Both nodes share this machine's address, so the
rendezvous is checked by node id.
"""

import pytest
import ray
from ray.cluster_utils import Cluster
from rich.console import Console

from draft_opd.launch.config import load_config
from draft_opd.launch.learner_group import LearnerGroup


@pytest.fixture
def gpu_node():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    node = cluster.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    yield node
    ray.shutdown()
    cluster.shutdown()


def test_ranks_meet_at_rank_zeros_node_and_use_their_own_gpu(gpu_node):
    cfg = load_config(
        "configs/tiny.yaml",
        [
            "learner.world_size=2",
            "learner.num_gpus=1",
            "learner.num_cpus=1",
            "learner.timeout_s=120",
            "train.stage_timeout_s=120",
        ],
    )
    group = LearnerGroup(cfg, None, Console(stderr=True))
    try:
        ranks = group.call("placement", what="placement")
        assert [r["RANK"] for r in ranks] == ["0", "1"] and {r["WORLD_SIZE"] for r in ranks} == {"2"}
        assert {r["node_id"] for r in ranks} == {gpu_node.node_id}  # the only node with GPUs
        assert ray.get_runtime_context().get_node_id() != gpu_node.node_id  # the driver is elsewhere
        assert group.rendezvous_node == gpu_node.node_id  # chosen on rank 0's node, not the driver's
        assert {r["MASTER_ADDR"] for r in ranks} == {gpu_node.node_ip_address}
        assert {r["LOCAL_RANK"] for r in ranks} == {"0"}  # each rank sees one GPU: its device 0
        devices = [r["CUDA_VISIBLE_DEVICES"] for r in ranks]
        assert sorted(devices) == ["0", "1"], devices
        weights = group.call("full_weights", what="full weights")  # both ranks joined DeepSpeed (a broadcast at init)
        assert weights[0] and weights[1] is None
    finally:
        group.shutdown()
