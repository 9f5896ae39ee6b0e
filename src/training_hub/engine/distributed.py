"""What the training loop needs to run as one rank of a torchrun job: process group, wrapping, reductions, state.

A run with one process uses :data:`SINGLE` and every function here is a no-op that returns its input, so the
one-process loop is the same code with nothing added. Inside a torchrun worker (``RANK``/``WORLD_SIZE`` set and
a world of more than one) :func:`setup` starts the process group: gloo on CPU, NCCL on CUDA with one device per
``LOCAL_RANK``.

Strategies (``DistributedParams.strategy``):

* ``ddp``: ``DistributedDataParallel``; every rank holds the whole model; gradients are all-reduced (averaged)
  in the last backward of a step, the others run under ``no_sync``.
* ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every decoder layer, then on the root; parameters,
  gradients and optimizer state are sharded on dim 0; gradients are reduce-scattered (averaged) in every backward.

Both average gradients over the ranks, so each rank scales its backward by the number of ranks (see
``loss.step_loss_and_backward``). Every rank runs the same number of forward/backward passes per step (FSDP2
all-gathers parameters in each forward); a rank with fewer micro-batches pads with :func:`empty_micro_batch`,
one token without a target, whose gradients are exact zeros.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from training_hub.config.processes import in_torchrun_worker

logger = logging.getLogger(__name__)

# Last resort against a hang (a rank stuck while the others wait in a collective); torchrun normally ends a
# failed run within a second. Long enough for rank 0 to write a large checkpoint while the others wait.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# The CPU phases (rank 0 tokenizes a large data set while the others wait) wait on a gloo group with this timeout
# instead of holding an NCCL barrier for up to COLLECTIVE_TIMEOUT.
CPU_PHASE_TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"
    owns_group: bool = False  # we started the process group (and end it)
    cpu_group: Any = None  # a gloo group for waits in CPU phases (None: the default group is gloo already)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def fsdp(self) -> bool:
        return self.distributed and self.strategy == "fsdp2"


SINGLE = Ranks()


def resolve_strategy(strategy: str, cuda: bool) -> str:
    """``"auto"``: FSDP2 on CUDA (a full fp32 copy per GPU does not fit large models), DDP on CPU."""
    return ("fsdp2" if cuda else "ddp") if strategy == "auto" else strategy


def setup(strategy: str) -> Ranks:
    """Join the torchrun job this process belongs to (or :data:`SINGLE` outside one, or in a world of one)."""
    if not in_torchrun_worker() or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    device_id = None
    if cuda:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before the first allocation
        device_id = torch.device("cuda", cuda_device_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device_id)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT, device_id=device_id)
    cpu_group = dist.new_group(backend="gloo", timeout=CPU_PHASE_TIMEOUT) if dist.get_backend() != "gloo" else None
    return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                 strategy=resolve_strategy(strategy, cuda),
                 owns_group=owns, cpu_group=cpu_group)


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The GPU of this process: ``local_rank`` modulo the GPUs it sees. A launcher that binds one GPU per task (SLURM
    with ``--gpus-per-task``, ``CUDA_VISIBLE_DEVICES`` per process) shows each process one device, numbered 0."""
    if device_count < 1:
        raise RuntimeError("no CUDA device is visible to this process")
    return local_rank % device_count


def teardown(ranks: Ranks, wait: bool = True) -> None:
    """End the process group this run started. ``wait=False`` (a failing rank): no barrier, another rank may be gone."""
    if ranks.owns_group:
        import torch.distributed as dist

        if wait:
            dist.barrier(group=ranks.cpu_group)  # no rank tears down while another still talks to it
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, ranks: Ranks, device: torch.device,
               cpu_offload: bool = False, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The module the loop calls: the model itself (one process), DDP around it, or the model made FSDP2 in place.

    Call after the model is complete (OSFT's decomposition included) and before the optimizer is built.
    ``cpu_offload`` (``fsdp_options={"cpu_offload_params": True}``): FSDP2 keeps the parameter shards, their
    gradients and so the optimizer state in CPU memory (``CPUOffloadPolicy``), copying each layer to the device
    for its forward and backward; without FSDP2 (one process, or DDP) it has no effect, with a warning.
    """
    if cpu_offload and not ranks.fsdp and ranks.is_main:
        import warnings

        why = ("the run has one process" if not ranks.distributed else
               f"strategy={ranks.strategy!r} (CPU offload needs strategy='fsdp2')")
        warnings.warn(f"fsdp_options cpu_offload_params=True has no effect: {why}", UserWarning, stacklevel=3)
    if not ranks.distributed:
        return model
    if ranks.strategy == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary tables) are computed identically on every rank; nothing to broadcast per forward.
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       **no_buffer_sync)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (ranks.world_size,))
    # Pinned host memory makes the copies asynchronous; it needs CUDA.
    options = {"offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda")} if cpu_offload else {}
    if param_dtype is not None:  # bf16 runs: layers gathered and computed in bf16, gradients reduced in fp32, the
        # sharded master weights and the optimizer stay fp32 (no fp32 all-gather, no autocast copy of the weights)
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"strategy='fsdp2': cannot find the decoder layers of {type(model).__name__} "
                         "(no _no_split_modules); use strategy='ddp'")
    for layer in layers:
        fully_shard(layer, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DDP wrapper (an FSDP2 model is its own)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def no_sync(model: torch.nn.Module):
    """A context factory for the backward passes that should only accumulate (DDP: skip the all-reduce)."""
    return model.no_sync if hasattr(model, "no_sync") else contextlib.nullcontext


def empty_micro_batch(device: torch.device) -> dict:
    """One token and no target: a forward/backward that keeps a rank in step with the others and adds nothing."""
    from training_hub.engine.batching import IGNORE_INDEX, pack

    return pack([[0]], [[IGNORE_INDEX]], device=device)


def all_sum(ranks: Ranks, *values: float) -> tuple[float, ...]:
    """The sums of ``values`` over all ranks (one all-reduce, float64: integer counts stay exact)."""
    if not ranks.distributed:
        return values
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tuple(tensor.tolist())


def broadcast(ranks: Ranks, value):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not ranks.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    """Wait for every rank, on the CPU group (a wait in a CPU phase must not hold an NCCL collective)."""
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier(group=ranks.cpu_group)


@contextlib.contextmanager
def main_first(ranks: Ranks):
    """Rank 0 runs the block first (e.g. fills a cache), then the other ranks (who then hit the cache)."""
    if not ranks.is_main:
        barrier(ranks)
    yield
    if ranks.is_main:
        barrier(ranks)


def all_sum_on_device(ranks: Ranks, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all ranks, left on its device: no host sync (NCCL queues the all-reduce on the
    stream), unlike :func:`all_sum`. A no-op in one process."""
    if ranks.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def host_floats(*values: torch.Tensor) -> list[float]:
    """0-d (or one-element) device tensors as floats, read in one host sync; a DTensor (``clip_grad_norm_``'s
    result under FSDP2) counts as its full value, the norm over all shards."""
    values = [v.full_tensor() if hasattr(v, "full_tensor") else v for v in values]
    device = values[0].device  # (with FSDP2's CPU offload the norm is on the CPU, the loss on the GPU)
    return torch.cat([v.detach().float().reshape(-1).to(device) for v in values]).tolist()


# ------------------------------------------------------------------------------------------------- state

def _full_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def _retie(model: torch.nn.Module, state: dict) -> dict:
    """Gathered tensors of tied parameters (embeddings and LM head) are copies; make them one tensor again, as
    in ``model.state_dict()``, so ``save_pretrained`` stores the weight once."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first and name in state and first[id(param)] in state:
            state[name] = state[first[id(param)]]
        first.setdefault(id(param), name)
    return state


def full_model_state(model: torch.nn.Module, ranks: Ranks) -> dict | None:
    """FSDP2: the whole model's state dict gathered to rank 0 on CPU (every rank must call; others get {}).

    None otherwise: the model in this process already holds every weight.
    """
    if not ranks.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return _retie(model, get_model_state_dict(model, options=_full_options()))


def _trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the optimizer's parameters, in its order (the loop builds it from ``requires_grad`` parameters)."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def _optimizer_state_keys(state: dict, mapping: dict) -> dict:
    return {"state": {mapping[k]: v for k, v in state["state"].items()},
            "param_groups": [{**group, "params": [mapping[k] for k in group["params"]]}
                             for group in state["param_groups"]]}


def full_training_state(model: torch.nn.Module, optimizer, ranks: Ranks) -> tuple[dict | None, dict | None]:
    """FSDP2: model and optimizer state gathered to rank 0 (every rank must call). (None, None) otherwise.

    Stored as a one-process run stores them (the optimizer state keyed by parameter index), so a training state
    resumes under any strategy and process count. FSDP2 runs write sharded states instead (``engine.sharded``, no
    gather); this is for ranks that do not share the output directory.
    """
    if not ranks.fsdp:
        return None, None
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_full_options())
    if not ranks.is_main:
        return None, None
    index = {name: i for i, name in enumerate(_trainable_names(model))}
    return _retie(model, model_state), _optimizer_state_keys(optimizer_state, index)


def load_full_training_state(model: torch.nn.Module, optimizer, path, ranks: Ranks) -> None:
    """FSDP2: load a full training state (read on rank 0) into the shards of every rank (every rank must call)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model_state, optimizer_state = {}, {}
    if ranks.is_main:
        model_state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer_state = _optimizer_state_keys(saved, dict(enumerate(_trainable_names(model))))
    # Two calls: set_state_dict() skips the model on ranks that pass an empty model state (all but rank 0).
    set_model_state_dict(model, model_state, options=_full_options(broadcast_from_rank0=True))
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_full_options(broadcast_from_rank0=True))
