"""The memory ledger of a run: bytes of parameters, gradients, optimizer state and saved activations.

One set of counting rules serves both sides:

* every run measures it (:class:`MemoryLedger`, in ``engine.run``): the parameter bytes when the run starts, the
  gradients when the first optimizer step begins, the optimizer state right after it, and the peak of the
  activations autograd saves for the backward pass over the watched steps (the first ones and each epoch's step
  with the largest micro-batch); on CUDA also ``torch.cuda.max_memory_allocated``;
* the planner (``engine.plan``) predicts it by running the same forward on a model made of fake tensors
  (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no memory), counted by the same
  :class:`SavedTensorMeter`.

Tensors are counted once per storage (a view and its base share one), parameters never as activations. With
activation checkpointing, autograd keeps only each checkpointed layer's inputs (the layer recomputes the rest in
the backward pass); the meter counts those inputs through a forward pre-hook on every checkpointed layer, whether
transformers checkpoints it or ``engine.compile`` does, around a compiled layer (:func:`is_checkpointed`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch

from training_hub.engine.attention import BOUNDS_KWARG

KEYS = ("parameters", "gradients", "optimizer", "activations")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this process holds (a DTensor's local shard under FSDP2)."""
    return getattr(tensor, "_local_tensor", tensor)


def storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """(identity, bytes) of the storage under ``tensor``: views share it; works for real and fake tensors."""
    storage = _local(tensor).untyped_storage()
    return storage._cdata, storage.nbytes()


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages under ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            key, size = storage_key(t)
            seen[key] = size
    return sum(seen.values())


def parameter_bytes(model: torch.nn.Module) -> int:
    """The model's parameters and buffers (tied weights once)."""
    return unique_bytes([*model.parameters(), *model.buffers()])


def gradient_bytes(parameters: Iterable[torch.Tensor]) -> int:
    return unique_bytes(p.grad for p in parameters)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Every tensor of the optimizer's state (AdamW: exp_avg, exp_avg_sq and the step counter per parameter)."""
    return unique_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


# set on a layer that ``engine.compile`` checkpoints around its compiled forward (transformers' own checkpoint off)
CHECKPOINTED = "_training_hub_checkpointed"


def is_checkpointed(module: torch.nn.Module) -> bool:
    """Whether ``module`` is recomputed in the backward pass: marked by transformers (``gradient_checkpointing``) or
    by ``engine.compile``, which checkpoints a compiled layer outside its compiled call (:data:`CHECKPOINTED`)."""
    return getattr(module, "gradient_checkpointing", False) is True or getattr(module, CHECKPOINTED, False) is True


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules recomputed in the backward pass (:func:`is_checkpointed`)."""
    return [m for m in model.modules() if is_checkpointed(m)]


class SavedTensorMeter:
    """Peak bytes of the tensors autograd saves for backward, per forward/backward pass of a micro-batch.

    Inside :meth:`watch`, every tensor autograd saves is counted by storage (parameters excluded); a pass ends when
    the backward pass starts reading them back, and the next pass's first save closes it. ``peak`` is the largest
    pass seen. Checkpointed layers' inputs count as saved (autograd keeps them for the recomputation).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.peak = 0
        self._current: dict[int, int] = {}
        self._reading = False
        self._exclude: set[int] = set()

    def _close(self) -> None:
        self.peak = max(self.peak, sum(self._current.values()))
        self._current = {}

    def _add(self, tensor: Any) -> None:
        if torch.is_tensor(tensor) and not isinstance(tensor, torch.nn.Parameter):  # FSDP2's gathered weights too
            key, size = storage_key(tensor)
            if key not in self._exclude:
                self._current[key] = size

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._reading:  # the first save after a backward pass: a new micro-batch
            self._reading = False
            self._close()
        self._add(tensor)
        return tensor

    def _unpack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._reading = True
        return tensor

    def _layer_inputs(self, module, args, kwargs) -> None:
        if not self._reading and torch.is_grad_enabled():  # not the recomputation inside the backward pass
            # the sample offsets: a host list, or (compiled layers) a few bytes of CPU tensor; not activations
            kwargs = {k: v for k, v in kwargs.items() if k != BOUNDS_KWARG}
            for value in (*args, *kwargs.values()):
                for t in (value if isinstance(value, (tuple, list)) else (value,)):
                    self._add(t)

    @contextlib.contextmanager
    def watch(self):
        self._exclude = {storage_key(t)[0] for t in [*self.model.parameters(), *self.model.buffers()]}
        self._reading = False
        handles = [m.register_forward_pre_hook(self._layer_inputs, with_kwargs=True)
                   for m in checkpointed_layers(self.model)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self._close()


class MemoryLedger:
    """What a run measures of its own memory (see the module doc); ``metrics()`` goes into the result."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.meter = SavedTensorMeter(model)
        self.values = {"parameters": parameter_bytes(model), "gradients": 0, "optimizer": 0}
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step)]

    @classmethod
    def of(cls, recipe: Any, device: torch.device) -> "MemoryLedger | None":
        """The ledger of a recipe's model (``raw``: the model under DDP/FSDP2 wrapping) and optimizer; None for a
        recipe that has no such attributes."""
        model = getattr(recipe, "raw", None)
        model = getattr(recipe, "model", None) if model is None else model
        optimizer = getattr(recipe, "optimizer", None)
        if not isinstance(model, torch.nn.Module) or not isinstance(optimizer, torch.optim.Optimizer):
            return None
        return cls(model, optimizer, device)

    def _before_step(self, optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.values["gradients"] = max(self.values["gradients"], gradient_bytes(params))

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.values["optimizer"] = max(self.values["optimizer"], optimizer_bytes(optimizer))
        for hook in self._hooks:  # the first step tells it all; later steps hold the same state
            hook.remove()
        self._hooks = []

    def watch(self, active: bool = True):
        """Count the saved activations of one optimizer step (a no-op context when not ``active``)."""
        return self.meter.watch() if active else contextlib.nullcontext()

    def metrics(self) -> dict:
        """Bytes per entry and their ``total``; on CUDA also ``max_memory_allocated``."""
        out = {**self.values, "activations": self.meter.peak}
        out["total"] = sum(out[k] for k in KEYS)
        if self.device.type == "cuda":
            out["max_memory_allocated"] = int(torch.cuda.max_memory_allocated(self.device))
        return out


def allocated_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated above the start while ``fn()`` runs, on the CPU too (CUDA alone has
    ``max_memory_allocated``): from the allocator's running total that ``torch.profiler`` records with every
    allocation and free, inductor's buffers included. For tests and benchmarks; profiling slows ``fn`` down."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.total_allocated, event.extra_fields.alloc_size))
    if not events:
        return 0
    events.sort()
    return max(total for _, total, _ in events) - (events[0][1] - events[0][2])


def steps_to_watch(steps: list, first_global_step: int, already: int = 2) -> set[int]:
    """Indices (in this epoch's ``steps``) whose activations a run measures: the run's first ``already`` steps and
    the epoch's step with the largest micro-batch (where the peak is)."""
    watched = {k for k in range(len(steps)) if first_global_step + k < already}
    if steps:
        watched.add(max(range(len(steps)), key=lambda k: steps[k].largest_micro_batch))
    return watched
