"""The local multi-node Ray cluster the ``--engine ray`` tests run on (``ray.cluster_utils``):
nodes on this machine, the test process its driver."""

from __future__ import annotations

import pytest

NODE_MEMORY = 80 * 1024**2  # each node's object store


@pytest.fixture(scope="module", name="cluster")
def two_node_cluster():
    """Two nodes, two (logical) CPUs each; the test process connected as a driver. Module
    scoped: a test that removes a node runs last in its module."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'xmodal[ray]')")
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 2, "object_store_memory": NODE_MEMORY, "include_dashboard": False}
    local = Cluster(initialize_head=True, head_node_args=head)
    local.add_node(num_cpus=2, object_store_memory=NODE_MEMORY)
    local.wait_for_nodes()
    ray.init(address=local.address, log_to_driver=False)
    yield local
    ray.shutdown()
    local.shutdown()
