"""Keep the trainable factors orthogonal to the frozen ones: project gradients before, values after each step.

For every ``OSFTLinear`` with k > 0 frozen directions::

    X -= H (H^T X)      for (H, X) in [(U_high, U_low), (V_high, V_low)]

applied to ``X.grad`` by :func:`project_gradients` (after backward, before ``optimizer.step()``) and to the values
of ``X`` by :func:`project_parameters` (after ``optimizer.step()``: Adam's per-element scaling turns a projected
gradient into an update that is not exactly orthogonal any more). With V_low orthogonal to V_high,
W' V_high = U_high diag(S_high): the frozen directions of W are kept exactly.

The parameter projection needs full fp32 matmuls: it is what keeps the frozen directions exact, and TF32's 10-bit
inputs would leave a residual of about 3e-5 per projection where fp32 leaves 6e-8 (docs/osft.md, "bf16"); the
native engine, which allows TF32 on CUDA, runs it without (``engine.osft``). The gradient projection may use TF32:
its residual is removed by the parameter projection after the step.

Each projection is local to its module and written in plain tensor ops; under FSDP2 the factors are DTensors
sharded on dim 0, ``H^T X`` contracts over that dimension, and DTensor adds the (k x rank) all-reduce itself.
"""

from __future__ import annotations

import torch

from training_hub.osft_core.decompose import osft_modules

__all__ = ["project_gradients", "project_parameters", "project_out"]


@torch.no_grad()
def project_out(frozen: torch.Tensor, x: torch.Tensor) -> None:
    """In place: ``x -= frozen (frozen^T x)``, removing from x's columns their part in span(frozen's columns)."""
    if frozen.shape[1] == 0:
        return
    coeff = frozen.transpose(0, 1).to(x.dtype) @ x
    x.sub_(frozen.to(x.dtype) @ coeff)


@torch.no_grad()
def project_gradients(model) -> None:
    """Project the gradients of every U_low / V_low orthogonal to U_high / V_high (before ``optimizer.step()``).

    A factor without a gradient (``.grad is None``) is skipped.
    """
    for module in osft_modules(model).values():
        for frozen, trainable in ((module.U_high, module.U_low), (module.V_high, module.V_low)):
            if trainable.grad is not None:
                project_out(frozen, trainable.grad)


@torch.no_grad()
def project_parameters(model) -> None:
    """Project the values of every U_low / V_low orthogonal to U_high / V_high (after ``optimizer.step()``); in
    full fp32 matmuls (no TF32), see the module docstring."""
    for module in osft_modules(model).values():
        for frozen, trainable in ((module.U_high, module.U_low), (module.V_high, module.V_low)):
            project_out(frozen, trainable.data)
