"""What each trial asks Ray for, and whether and how many trials the cluster can hold.

Ray places a trial on one node and gives it ``gpus_per_trial`` of that node's GPUs: a
whole number of GPUs is the trial's alone (Ray sets ``CUDA_VISIBLE_DEVICES`` in its worker
to those GPUs, so two such trials never share one), a fraction below 1 is a share of one
GPU that other trials use at the same time — Ray isolates nothing, neither memory nor
compute, so their speed figures measure the sharing too. A request no node can satisfy
is not an error to Ray: Tune waits for a node that never comes. :func:`check_feasible`
turns that into an error before anything runs.

Everything here works on plain node descriptions (:class:`Node`), so the logic is tested
without GPUs; :func:`nodes_of_cluster` reads them from a running Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import BadInput

# Ray keeps resource quantities in units of 1/10000.
_RESOLUTION = 1e-4


@dataclass(frozen=True)
class Node:
    """One alive node: its Ray node id and the CPUs and GPUs Ray may hand out on it."""

    address: str  # the node id
    cpus: float
    gpus: float


@dataclass(frozen=True)
class TrialResources:
    """The resources one trial asks Ray for."""

    cpus: float
    gpus: float

    @property
    def shares_gpu(self) -> bool:
        """Trials get a fraction of a GPU: several run on one GPU at once, unisolated."""
        return 0 < self.gpus < 1

    def as_tune(self) -> dict[str, float]:
        return {"cpu": self.cpus, "gpu": self.gpus}


def nodes_of_cluster(ray_nodes: list[dict[str, Any]]) -> list[Node]:
    """The alive nodes of ``ray.nodes()``."""
    nodes = []
    for info in ray_nodes:
        if not info.get("Alive"):
            continue
        resources = info.get("Resources") or {}
        # The node id, not the address: several raylets may share one machine's address.
        nodes.append(Node(address=str(info.get("NodeID") or info.get("NodeManagerAddress")),
                          cpus=float(resources.get("CPU", 0)),
                          gpus=float(resources.get("GPU", 0))))
    return nodes


def trial_resources(gpus_per_trial: float | None, cpus_per_trial: float,
                    nodes: list[Node]) -> TrialResources:
    """The request of one trial: ``gpus_per_trial`` (default: 1 when any node has a GPU,
    else 0) and ``cpus_per_trial``."""
    if gpus_per_trial is None:
        gpus_per_trial = 1.0 if any(node.gpus > 0 for node in nodes) else 0.0
    return TrialResources(cpus=float(cpus_per_trial), gpus=float(gpus_per_trial))


def _fits(have: float, want: float) -> int:
    """How many requests of ``want`` fit in ``have`` (unbounded → a large number)."""
    if want <= 0:
        return 1 << 30
    return int(math.floor(have / want + _RESOLUTION))


def slots(nodes: list[Node], request: TrialResources) -> dict[str, int]:
    """Trials that can run at once on each node (nodes that hold none are left out)."""
    out = {}
    for node in nodes:
        count = min(_fits(node.cpus, request.cpus), _fits(node.gpus, request.gpus))
        if count > 0:
            out[node.address] = count
    return out


def check_feasible(nodes: list[Node], request: TrialResources) -> dict[str, int]:
    """The slots per node; :class:`BadInput` when no single node can run one trial.

    Ray places a trial on one node, so the GPUs of two nodes never add up for one trial.
    """
    where = slots(nodes, request)
    if where:
        return where
    most_gpus = max((node.gpus for node in nodes), default=0.0)
    most_cpus = max((node.cpus for node in nodes), default=0.0)
    if request.gpus > most_gpus + _RESOLUTION:
        total = sum(node.gpus for node in nodes)
        if total <= 0:
            raise BadInput(f"resources.gpus_per_trial is {request.gpus:g} but the cluster "
                             "has no GPUs; set it to 0 (or remove it), or add GPU workers")
        raise BadInput(
            f"resources.gpus_per_trial is {request.gpus:g} but no node has that many GPUs "
            f"(at most {most_gpus:g} on one node, {total:g} in the cluster; a trial runs on "
            "one node); lower it or add a node with more GPUs")
    raise BadInput(
        f"resources.cpus_per_trial is {request.cpus:g} but no node has that many CPUs "
        f"(at most {most_cpus:g} on one node); lower it")


def concurrency(where: dict[str, int], max_concurrent: int | None) -> int:
    """How many trials run at once: what the nodes hold, capped by ``max_concurrent``."""
    held = sum(where.values())
    return min(held, max_concurrent) if max_concurrent else held


def describe(where: dict[str, int], request: TrialResources,
             max_concurrent: int | None) -> str:
    """One line for the launch: how many trials at once, where, and on what."""
    at_once = concurrency(where, max_concurrent)
    per_trial = (f"{request.gpus:g} GPU" + ("" if request.gpus == 1 else "s")
                 if request.gpus else "no GPU") + f", {request.cpus:g} CPU"
    nodes = len(where)
    line = (f"up to {at_once} trial{'s' if at_once != 1 else ''} at once on "
            f"{nodes} node{'s' if nodes != 1 else ''} ({per_trial} each)")
    if request.shares_gpu:
        line += (f"; {_fits(1.0, request.gpus)} trials share each GPU, unisolated: their "
                 "speed figures include the sharing")
    return line
