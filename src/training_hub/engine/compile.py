"""``torch_compile``: regional ``torch.compile`` of the decoder layers, kept only if it computes what eager does.

Each decoder layer is compiled on its own (``layer.compile(dynamic=True)``), not the whole model: every layer runs
the same code, so dynamo traces it once and reuses the graphs for all layers (with ``inline_inbuilt_nn_modules``
the weights are graph inputs), and the embedding, the loss and the optimizer stay eager. Inductor fuses what
eager PyTorch runs op by op: RMSNorm, rotary embeddings, SiLU gating, the residual adds and the bf16 casts
around them, forward and backward.

Packed rows change length every micro-batch, so the shapes are dynamic from the start (``dynamic=True``); what
else would make dynamo recompile per micro-batch is kept out of the graphs:

* Per-sample attention (``attention.packed_sdpa``) loops over the samples of the row in Python. It is registered
  opaque to dynamo (a graph break around attention: the layer compiles as two graphs, before and after it), and
  the row's sample offsets, a host list whose length dynamo would guard on, reach the layers as a CPU tensor (a
  forward pre-hook on the model converts them; ``packed_sdpa`` reads them back with one ``tolist``).
* A few graphs per layer signature (the layer, its attention module, the resumed frames after the graph break)
  and no more: ``recompiles()`` counts them, and ``tests/test_compile.py`` checks that rows of new lengths and
  sample counts add none.

The self-check (:func:`compiled_error`) runs one packed row of three samples through the compiled and the eager
model, in training mode under the run's autocast, and compares the logits and every parameter's gradient
relative to their largest magnitude (the tolerances of the attention self-check: 1e-4 in fp32, 5e-2 in half
precision). That also compiles the graphs the run then reuses (forward and backward), so the check adds one
eager pass of a 21-token row to the compile time (with checkpointing, both passes run through the checkpoint). A
model that fails it, or fails to compile, trains eager, with the reason logged.

With gradient checkpointing, the checkpoint moves outside the compiled layer. transformers checkpoints inside
each layer's forward, and dynamo compiles a checkpointed region only whole, so per-sample attention's graph break
would leave every layer uncompiled. Instead transformers' per-layer checkpointing is turned off and each layer's
compiled forward is called through ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (the same
graphs as without checkpointing, recomputed in the backward pass). The layer is marked ``ledger.CHECKPOINTED``, so
the run's memory ledger and the planner (``ledger.is_checkpointed``) count it as they count eager checkpointing:
on the test model the ledger's activations are the same bytes, and the allocator's peak over a forward and backward
pass drops from 3.59 MB (compiled) to 2.07 MB (compiled and checkpointed; eager checkpointing: the same).

Not combined with FSDP2 (the model stays eager, with a warning), not checked here. Under ``engine.ledger``'s
memory meter the compiled layers save fewer activations than eager ones (inductor recomputes cheap element-wise
results in the backward pass): 1.40 vs 1.77 MB on the test model.

On CPU, compiling takes from seconds to minutes (inductor generates and builds C++), which is why the option is
off by default: see ``docs/benchmarks.md`` for what it buys on this machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch

from training_hub.engine.attention import BOUNDS_KWARG, HALF_DTYPES, HALF_TOLERANCE, TOLERANCE

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CompileChoice:
    """What :func:`use_compiled_layers` did: ``compiled`` layers (0: eager), the self-check ``error`` (nan when
    it could not run), ``seconds`` spent compiling and checking, and ``reason`` when the model stays eager."""

    compiled: int
    error: float = float("nan")
    seconds: float = 0.0
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.compiled > 0


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: transformers' ``GradientCheckpointingLayer`` subclasses (every decoder layer
    of its causal LMs), also inside a PEFT wrapper; empty for a model without them."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _bounds_as_tensor(module, args, kwargs):
    """Forward pre-hook: the sample offsets as a CPU int64 tensor (dynamic in length) instead of a host list
    (whose length and values dynamo would guard on, recompiling for each new number of samples)."""
    bounds = kwargs.get(BOUNDS_KWARG)
    if isinstance(bounds, (list, tuple)):
        kwargs[BOUNDS_KWARG] = torch.tensor(bounds, dtype=torch.int64)
        return args, kwargs
    return None


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> list[torch.nn.Module]:
    """Compile each decoder layer of ``model`` in place (dynamic shapes; a layer transformers checkpoints is
    checkpointed around its compiled forward instead) and install the offsets hook; return the compiled layers (see
    :func:`eager`). ``backend``: torch.compile's ("eager" captures the graphs without generating code, for tests)."""
    from training_hub.engine.attention import register

    register()  # packed_sdpa registered opaque to dynamo (see the module docstring)
    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False) is True:  # transformers' checkpointing: ours, outside
            _checkpoint_outside(layer, backend)
        else:
            layer.compile(dynamic=True, backend=backend)
    if layers and not getattr(model, "_training_hub_bounds_hook", None):
        model._training_hub_bounds_hook = model.register_forward_pre_hook(_bounds_as_tensor, with_kwargs=True)
    return layers


def _checkpointed_call(layer: torch.nn.Module, compiled, *args, **kwargs):
    """``layer``'s compiled forward, recomputed in the backward pass when training (non-reentrant checkpoint)."""
    if layer.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(compiled, *args, use_reentrant=False, **kwargs)
    return compiled(*args, **kwargs)


def _checkpoint_outside(layer: torch.nn.Module, backend: str) -> None:
    """Move transformers' checkpoint of ``layer`` outside its compiled forward: its own checkpointing off, the
    forward compiled and called through :func:`_checkpointed_call` (an instance attribute, so forward hooks such as
    the memory meter's run outside both), and the layer marked :data:`ledger.CHECKPOINTED` for the ledger and plan."""
    import functools

    from training_hub.engine.ledger import CHECKPOINTED

    layer.gradient_checkpointing = False
    compiled = torch.compile(layer.forward, dynamic=True, backend=backend)
    layer.forward = functools.partial(_checkpointed_call, layer, compiled)
    setattr(layer, CHECKPOINTED, True)


def eager(model: torch.nn.Module, layers: list[torch.nn.Module]) -> None:
    """Undo :func:`compile_layers` (a layer checkpointed outside its compiled call: transformers' checkpoint back)."""
    from training_hub.engine.ledger import CHECKPOINTED

    for layer in layers:
        layer._compiled_call_impl = None
        if getattr(layer, CHECKPOINTED, False):
            del layer.forward
            delattr(layer, CHECKPOINTED)
            layer.gradient_checkpointing = True
    hook = getattr(model, "_training_hub_bounds_hook", None)
    if hook is not None:
        hook.remove()
        del model._training_hub_bounds_hook


def _check_row(model: torch.nn.Module) -> dict:
    """Three samples of 5, 7 and 9 random tokens packed in one row, every position a target."""
    from training_hub.engine.batching import pack

    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 7, 9)]
    return pack(samples, samples, device=device)


def _forward_backward(model, row: dict, dtype: torch.dtype | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of ``row`` at its target positions and the gradients of their cross-entropy, in training mode."""
    from training_hub.engine.loss import packed_logits

    params = [p for p in model.parameters() if p.requires_grad]
    precision = (torch.autocast(row["input_ids"].device.type, dtype=dtype) if dtype is not None
                 else contextlib.nullcontext())
    with precision:
        logits = packed_logits(model, row, row["loss_index"])
    loss = torch.nn.functional.cross_entropy(logits.float(), row["targets"][0, row["loss_index"]])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return logits.detach().float(), [g.float() for g in grads if g is not None]


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def compiled_error(model: torch.nn.Module, dtype: torch.dtype | None) -> float:
    """The compiled model (:func:`compile_layers`) against itself run eagerly on one packed row, under autocast to
    ``dtype`` (None: fp32), in training mode: the larger of the logits' and the gradients' largest difference,
    each relative to its largest magnitude (logits: at least 1)."""
    row = _check_row(model)
    with torch.compiler.set_stance("force_eager"):
        logits, grads = _forward_backward(model, row, dtype)
    compiled_logits, compiled_grads = _forward_backward(model, row, dtype)
    if len(grads) != len(compiled_grads):
        return float("inf")
    errors = [float((compiled_logits - logits).abs().max() / logits.abs().max().clamp_min(1.0))]
    errors += [_relative(torch.cat([g.flatten() for g in compiled_grads]), torch.cat([g.flatten() for g in grads]))]
    return max(errors)


def use_compiled_layers(model: torch.nn.Module, dtype: torch.dtype | None, backend: str = "inductor") -> CompileChoice:
    """Compile ``model``'s decoder layers if the compiled model passes :func:`compiled_error` (tolerance: 1e-4 in
    fp32, 5e-2 under half-precision autocast); else leave it eager and say why (logged)."""
    import time

    start = time.perf_counter()
    layers = decoder_layers(model)
    if not layers:
        return _eager(model, [], float("nan"), start, f"{type(model).__name__} has no decoder layers to compile")
    tolerance = HALF_TOLERANCE if dtype in HALF_DTYPES else TOLERANCE
    try:
        compile_layers(model, backend)
        error = compiled_error(model, dtype)
    except Exception as exc:  # no C++ compiler, an op inductor cannot lower, ...
        return _eager(model, layers, float("nan"), start, f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    if not error <= tolerance:
        return _eager(model, layers, error, start,
                      f"compiled and eager differ by {error:.2e} (tolerance {tolerance:g})")
    seconds = time.perf_counter() - start
    logger.info("torch_compile: %d decoder layers compiled (self-check error %.1e, %.0f s)", len(layers), error,
                seconds)
    return CompileChoice(len(layers), error, seconds)


def _eager(model, layers, error: float, start: float, reason: str) -> CompileChoice:
    import time

    eager(model, layers)
    logger.warning("torch_compile: the model stays eager (%s)", reason)
    return CompileChoice(0, error, time.perf_counter() - start if start else 0.0, reason)


def compile_model(model: torch.nn.Module, config: Any, device: torch.device, fsdp: bool = False) -> CompileChoice:
    """The run's ``torch_compile`` setting applied to ``model`` (the raw model, after the training method adapted
    it): compiled layers when asked for and the self-check passes, else eager. Not under FSDP2 (``fsdp``), whose
    sharded parameters and hooks this path has not been checked with: eager, with a warning."""
    if not getattr(config, "torch_compile", False):
        return CompileChoice(0, reason="torch_compile is off")
    if fsdp:
        return _eager(model, [], float("nan"), 0.0, "not combined with FSDP2 yet (strategy='ddp' compiles)")
    from training_hub.engine.model import compute_dtype

    return use_compiled_layers(model, compute_dtype(config, device))


def recompiles() -> int:
    """Graphs dynamo has compiled in this process so far (frames compiled, first compilations included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
