"""How many processes a run trains in, resolved once from the config and the environment.

Every part that asks "is this one process or several?" (the launcher, the native and trl backends' refusals, the
upstream ``micro_batch_size`` translation) asks :func:`process_count`, so they cannot disagree.

Parameters left at their defaults take the values cluster launchers put in the environment
(``PET_NPROC_PER_NODE``, ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``,
``PET_RDZV_ENDPOINT``, ``PET_RDZV_ID``, as Kubeflow Trainer sets them). Inside a torchrun worker the world size is
torchrun's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """The torchrun settings of this node, resolved from the config and the environment."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_id: str | None = None
    rdzv_endpoint: str | None = None
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def in_torchrun_worker(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a process started by torchrun (or another launcher that sets the torch.distributed env)."""
    env = os.environ if environ is None else environ
    return "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env


def _int(name: str, value: Any) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a whole number (elastic ranges such as '1:4' are not "
                         "supported)") from None


def launch_plan(config: Any, environ: Mapping[str, str] | None = None) -> LaunchPlan:
    """This node's plan: the config's values, or the cluster launcher's ``PET_*`` values where the config has the
    default. ``nproc_per_node='auto'`` is the number of CUDA devices, 1 without CUDA."""
    env = os.environ if environ is None else environ

    def pick(value, default, name):
        return env[name] if value == default and env.get(name) else value

    nproc = pick(config.nproc_per_node, 1, "PET_NPROC_PER_NODE")
    if nproc in ("auto", "gpu"):
        import torch

        nproc = torch.cuda.device_count() or 1
    port = pick(config.master_port, None, "PET_MASTER_PORT")
    plan = LaunchPlan(
        nproc_per_node=_int("nproc_per_node", nproc) if isinstance(nproc, str) else nproc,
        nnodes=_int("nnodes", pick(config.nnodes, 1, "PET_NNODES")),
        node_rank=_int("node_rank", pick(config.node_rank, 0, "PET_NODE_RANK")),
        rdzv_id=pick(config.rdzv_id, None, "PET_RDZV_ID"),
        rdzv_endpoint=pick(config.rdzv_endpoint, None, "PET_RDZV_ENDPOINT"),
        master_addr=pick(config.master_addr, None, "PET_MASTER_ADDR"),
        master_port=None if port is None else _int("master_port", port),
    )
    if plan.node_rank >= plan.nnodes:
        raise ValueError(f"node_rank={plan.node_rank} must be below nnodes={plan.nnodes}")
    if plan.nnodes > 1 and not (plan.rdzv_endpoint or plan.master_addr):
        raise ValueError(f"nnodes={plan.nnodes}: every node needs the same rendezvous; give rdzv_endpoint "
                         "('host:port' of one node) or master_addr/master_port (with node_rank per node)")
    return plan


def process_count(config: Any, environ: Mapping[str, str] | None = None) -> int:
    """Processes the run trains in: torchrun's world size inside a worker, else what :func:`launch_plan` resolves."""
    env = os.environ if environ is None else environ
    if in_torchrun_worker(env):
        return int(env["WORLD_SIZE"])
    return launch_plan(config, env).world_size
