"""What a trial asks Ray for, and whether and how many trials a cluster holds — without GPUs.

The real placement of trials on (fake) GPUs by a real two-node Ray is checked in
``test_cluster.py``.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import placement, spec
from orchestrator.errors import BadInput
from orchestrator.placement import Node, TrialResources

GPU_BOX = Node("10.0.0.1", cpus=16, gpus=4)
CPU_BOX = Node("10.0.0.2", cpus=8, gpus=0)


def test_nodes_of_cluster_reads_alive_nodes_of_ray_nodes():
    ray_nodes = [
        {"Alive": True, "NodeManagerAddress": "10.0.0.7", "NodeID": "10.0.0.1",
         "Resources": {"CPU": 16.0, "GPU": 4.0, "memory": 1e9, "node:10.0.0.1": 1.0}},
        {"Alive": False, "NodeManagerAddress": "10.0.0.9", "Resources": {"CPU": 64.0}},
        {"Alive": True, "NodeManagerAddress": "10.0.0.7", "NodeID": "10.0.0.2",
         "Resources": {"CPU": 8.0}},
    ]
    assert placement.nodes_of_cluster(ray_nodes) == [GPU_BOX, CPU_BOX]


def test_default_is_one_gpu_when_any_node_has_one_else_none():
    assert placement.trial_resources(None, 1, [CPU_BOX, GPU_BOX]) == TrialResources(1, 1)
    assert placement.trial_resources(None, 2, [CPU_BOX]) == TrialResources(2, 0)
    assert placement.trial_resources(0.25, 1, [GPU_BOX]).as_tune() == {"cpu": 1, "gpu": 0.25}
    assert placement.trial_resources(0, 1, [GPU_BOX]).gpus == 0


def test_whole_gpus_are_exclusive_fractions_share():
    assert not TrialResources(1, 1).shares_gpu and not TrialResources(1, 2).shares_gpu
    assert not TrialResources(1, 0).shares_gpu
    assert TrialResources(1, 0.5).shares_gpu


def test_slots_are_the_tighter_of_cpus_and_gpus_per_node():
    assert placement.slots([GPU_BOX, CPU_BOX], TrialResources(1, 1)) == {"10.0.0.1": 4}
    assert placement.slots([GPU_BOX, CPU_BOX], TrialResources(8, 1)) == {"10.0.0.1": 2}
    assert placement.slots([GPU_BOX, CPU_BOX], TrialResources(2, 0)) == {"10.0.0.1": 8,
                                                                        "10.0.0.2": 4}
    # Fractions: 3 × 0.33 fit in one GPU, and Ray's 1e-4 resolution makes 3 × 0.3333 fit too.
    assert placement.slots([Node("a", 64, 1)], TrialResources(1, 0.33)) == {"a": 3}
    assert placement.slots([Node("a", 64, 1)], TrialResources(1, 0.3333)) == {"a": 3}
    assert placement.slots([Node("a", 64, 2)], TrialResources(1, 0.5)) == {"a": 4}


def test_gpus_of_two_nodes_never_add_up_for_one_trial():
    nodes = [Node("a", 8, 2), Node("b", 8, 2)]
    with pytest.raises(BadInput) as info:
        placement.check_feasible(nodes, TrialResources(1, 4))
    message = str(info.value)
    assert message.startswith("resources.gpus_per_trial is 4 but no node has that many GPUs")
    assert "at most 2 on one node, 4 in the cluster" in message and "\n" not in message
    assert placement.check_feasible(nodes, TrialResources(1, 2)) == {"a": 1, "b": 1}


def test_infeasible_requests_name_the_field_and_the_fix():
    with pytest.raises(BadInput, match=r"^resources.gpus_per_trial is 1 but the cluster has no "
                                       r"GPUs; set it to 0"):
        placement.check_feasible([CPU_BOX], TrialResources(1, 1))
    with pytest.raises(BadInput, match=r"^resources.cpus_per_trial is 32 but no node has that "
                                       r"many CPUs \(at most 16 on one node\); lower it"):
        placement.check_feasible([GPU_BOX, CPU_BOX], TrialResources(32, 0))
    with pytest.raises(BadInput):
        placement.check_feasible([], TrialResources(1, 0))


def test_concurrency_is_capped_by_max_concurrent_trials():
    where = {"a": 4, "b": 2}
    assert placement.concurrency(where, None) == 6
    assert placement.concurrency(where, 3) == 3
    assert placement.concurrency(where, 10) == 6


def test_describe_says_how_many_at_once_and_warns_about_shared_gpus():
    exclusive = placement.describe({"a": 4, "b": 4}, TrialResources(2, 1), None)
    assert exclusive == "up to 8 trials at once on 2 nodes (1 GPU, 2 CPU each)"
    shared = placement.describe({"a": 4}, TrialResources(1, 0.25), 3)
    assert shared.startswith("up to 3 trials at once on 1 node (0.25 GPUs, 1 CPU each); "
                             "4 trials share each GPU, unisolated")
    assert placement.describe({"a": 2}, TrialResources(1, 0), None) == (
        "up to 2 trials at once on 1 node (no GPU, 1 CPU each)")


@given(nodes=st.lists(st.tuples(st.integers(0, 16), st.integers(0, 8)), min_size=1, max_size=4),
       cpus=st.sampled_from([0.5, 1, 2, 3]),
       gpus=st.sampled_from([0, 0.25, 0.5, 1, 2, 3]))
def test_slots_agree_with_packing_trials_one_by_one(nodes, cpus, gpus):
    """Independent check: put trials on each node until the next one does not fit."""
    cluster = [Node(str(i), c, g) for i, (c, g) in enumerate(nodes)]
    expected = {}
    for node in cluster:
        free_cpu, free_gpu = float(node.cpus), float(node.gpus)
        count = 0
        for _ in itertools.repeat(None, 1000):
            if free_cpu + 1e-9 < cpus or free_gpu + 1e-9 < gpus:
                break
            free_cpu -= cpus
            free_gpu -= gpus
            count += 1
        if count:
            expected[node.address] = count
    request = TrialResources(cpus, gpus)
    assert placement.slots(cluster, request) == expected
    if expected:
        assert placement.check_feasible(cluster, request) == expected
    else:
        with pytest.raises(BadInput):
            placement.check_feasible(cluster, request)


@pytest.mark.parametrize("value, ok", [(None, True), (0, True), (0.5, True), (0.3333, True),
                                       (1, True), (2, True), (4.0, True), (1.5, False),
                                       (0.33333, False), (-1, False)])
def test_spec_accepts_whole_gpus_and_fractions_below_one(value, ok):
    data = {"name": "g", "models": [{"id": "builtin:tiny-llama"}],
            "datasets": [{"name": "builtin:pydoc"}], "resources": {"gpus_per_trial": value}}
    if ok:
        assert spec.SweepSpec.model_validate(data).resources.gpus_per_trial == value
    else:
        with pytest.raises(ValueError, match="gpus_per_trial"):
            spec.SweepSpec.model_validate(data)
