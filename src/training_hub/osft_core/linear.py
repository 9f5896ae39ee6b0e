"""``OSFTLinear``: a linear layer whose weight is held as a frozen and a trainable SVD part.

For a weight ``W`` (out x in) with thin SVD ``W = U diag(S) V^T`` (U: out x m, V: in x m, m = min(out, in)), the
top ``k`` singular directions are frozen and the remaining ``m - k`` train::

    W = U_high diag(S_high) V_high^T  +  U_low diag(S_low) V_low^T
        (k directions, frozen)           (m - k directions: nn.Parameters)

U and V are stored with the singular vectors as COLUMNS (U_*: out x rank, V_*: in x rank). Both projections then
have the same shape, ``X -= H (H^T X)``, and under FSDP2 (which shards dim 0) both contract over the sharded
dimension, so each needs one small (k x rank) all-reduce, which DTensor inserts by itself.

The frozen factors are ``nn.Parameter(requires_grad=False)``, not buffers: FSDP2 shards parameters but replicates
buffers (the frozen factors are most of the layer's memory), and DDP broadcasts buffers on every forward.

Two forward formulations give the same values:

- ``"dense"``: recompose ``W`` and call ``F.linear`` once; the backward recomputes ``W`` instead of keeping it
  alive between forward and backward, so activation memory is that of a plain ``nn.Linear``. The extra cost is
  O(out x in x m) per call, independent of the number of tokens.
- ``"factored"``: two thin paths ``((x V_high) * S_high) U_high^T + ((x V_low) * S_low) U_low^T``. The cost is
  about twice a dense matmul per token but has no per-call term: cheaper only for very few tokens per call.

``"auto"`` (the default) picks per call the one with fewer floating-point operations (see ``_use_dense``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OSFTLinear", "FORWARD_MODES"]

FORWARD_MODES = ("auto", "dense", "factored")


def compose_weight(U_high, S_high, V_high, U_low, S_low, V_low) -> torch.Tensor:
    """``U_high diag(S_high) V_high^T + U_low diag(S_low) V_low^T`` (out x in), in the factors' dtype."""
    low = (U_low * S_low) @ V_low.transpose(0, 1)
    if S_high.numel() == 0:
        return low
    return torch.addmm(low, U_high * S_high, V_high.transpose(0, 1))


def _factor_grads(G, U, S, V, needs):
    """Gradients of ``U diag(S) V^T`` with respect to (U, S, V) given dL/dW = G (out x in)."""
    if not any(needs):
        return None, None, None
    GV = G @ V  # out x rank
    dU = GV * S if needs[0] else None
    dS = (U * GV).sum(0) if needs[1] else None
    dV = (G.transpose(0, 1) @ U) * S if needs[2] else None
    return dU, dS, dV


class _DenseOSFTLinear(torch.autograd.Function):
    """``F.linear(x, W, bias)`` with W composed from its factors; the backward recomputes W (saves memory)."""

    @staticmethod
    def forward(ctx, x, U_high, S_high, V_high, U_low, S_low, V_low, bias):
        weight = compose_weight(U_high, S_high, V_high, U_low, S_low, V_low).to(x.dtype)
        ctx.save_for_backward(x, U_high, S_high, V_high, U_low, S_low, V_low)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, U_high, S_high, V_high, U_low, S_low, V_low = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = None
        if needs[0]:
            weight = compose_weight(U_high, S_high, V_high, U_low, S_low, V_low).to(grad_out.dtype)
            grad_x = grad_out @ weight
        grad_high = grad_low = (None, None, None)
        if any(needs[1:7]):
            factor_dtype = U_low.dtype
            g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(factor_dtype)
            x2 = x.reshape(-1, x.shape[-1]).to(factor_dtype)
            G = g2.transpose(0, 1) @ x2  # dL/dW, out x in
            grad_high = _factor_grads(G, U_high, S_high, V_high, needs[1:4])
            grad_low = _factor_grads(G, U_low, S_low, V_low, needs[4:7])
        grad_bias = None
        if ctx.has_bias and needs[7]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return (grad_x, *grad_high, *grad_low, grad_bias)


class OSFTLinear(nn.Module):
    """A ``nn.Linear`` replacement with ``k`` frozen and ``min(out, in) - k`` trainable singular directions.

    Build one from an existing layer with :meth:`from_linear`; the plain constructor makes empty (uninitialised)
    factors of the right shapes, e.g. to load a saved OSFT state dict into.

    Attributes:
        U_high, S_high, V_high: frozen top-k factors (``requires_grad=False``); U_high: out x k, V_high: in x k.
        U_low, S_low, V_low: trainable factors; U_low: out x (m-k), V_low: in x (m-k).
        bias: the original layer's bias (trainable as usual) or None.
        weight_dtype: dtype of the original weight; :meth:`dense_weight` returns this dtype by default.
        forward_mode: ``"auto"``, ``"dense"`` or ``"factored"`` (see the module docstring).
    """

    def __init__(self, in_features: int, out_features: int, frozen_rank: int, *, bias: bool = True,
                 device=None, dtype=None, weight_dtype: torch.dtype | None = None, forward_mode: str = "auto"):
        super().__init__()
        rank = min(in_features, out_features)
        if not 0 <= frozen_rank < rank:
            raise ValueError(f"OSFTLinear: frozen_rank must be in [0, {rank}) for a {out_features}x{in_features} "
                             f"weight (at least one direction must train), got {frozen_rank}")
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"OSFTLinear: forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.frozen_rank = in_features, out_features, frozen_rank
        self.forward_mode = forward_mode
        self.U_high = nn.Parameter(torch.empty(out_features, frozen_rank, **kw), requires_grad=False)
        self.S_high = nn.Parameter(torch.empty(frozen_rank, **kw), requires_grad=False)
        self.V_high = nn.Parameter(torch.empty(in_features, frozen_rank, **kw), requires_grad=False)
        self.U_low = nn.Parameter(torch.empty(out_features, rank - frozen_rank, **kw))
        self.S_low = nn.Parameter(torch.empty(rank - frozen_rank, **kw))
        self.V_low = nn.Parameter(torch.empty(in_features, rank - frozen_rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.weight_dtype = weight_dtype or self.U_low.dtype

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, frozen_rank: int, *, dtype: torch.dtype | None = None,
                    forward_mode: str = "auto") -> "OSFTLinear":
        """Decompose ``linear.weight`` with one fp32 SVD (on the weight's device) into an ``OSFTLinear``.

        ``dtype``: dtype to store the factors in (default: the weight's dtype). The bias is copied as is and
        keeps its ``requires_grad``.
        """
        weight = linear.weight
        if weight.ndim != 2 or weight.is_meta:
            raise ValueError("OSFTLinear.from_linear needs a materialised 2-D weight (not on the meta device)")
        out_features, in_features = weight.shape
        dtype = dtype or weight.dtype
        module = cls(in_features, out_features, frozen_rank, bias=linear.bias is not None, device=weight.device,
                     dtype=dtype, weight_dtype=weight.dtype, forward_mode=forward_mode)
        U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
        V = Vh.transpose(0, 1)
        k = frozen_rank
        for name, value in [("U_high", U[:, :k]), ("S_high", S[:k]), ("V_high", V[:, :k]),
                            ("U_low", U[:, k:]), ("S_low", S[k:]), ("V_low", V[:, k:])]:
            getattr(module, name).copy_(value)
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
            module.bias.requires_grad_(linear.bias.requires_grad)
        return module

    def trainable_factors(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """``(U_low, S_low, V_low)``."""
        return self.U_low, self.S_low, self.V_low

    def _use_dense(self, x: torch.Tensor) -> bool:
        """Whether recomposing W costs fewer FLOPs (forward + backward) than the two thin paths for ``x``."""
        if self.forward_mode != "auto":
            return self.forward_mode == "dense"
        tokens = x.numel() // self.in_features
        n_out, n_in, m, r = self.out_features, self.in_features, min(self.out_features, self.in_features), \
            self.U_low.shape[1]
        dense = 3 * tokens * n_out * n_in + n_out * n_in * (2 * m + 2 * r)   # 2 compositions, 3 matmuls, 2 grads
        factored = 2 * tokens * (n_in + n_out) * m + tokens * (n_in + n_out) * r  # fwd + dx, then low grads
        return dense <= factored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = (self.U_high, self.S_high, self.V_high, self.U_low, self.S_low, self.V_low)
        if self._use_dense(x):
            return _DenseOSFTLinear.apply(x, *factors, self.bias)
        U_high, S_high, V_high, U_low, S_low, V_low = (f.to(x.dtype) for f in factors)
        out = ((x @ V_low) * S_low) @ U_low.transpose(0, 1)
        if S_high.numel():
            out = out + ((x @ V_high) * S_high) @ U_high.transpose(0, 1)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``W'`` (out x in, detached), composed in fp32 and cast to ``dtype``
        (default: the original weight's dtype)."""
        with torch.no_grad():
            factors = (f.detach().to(torch.float32) for f in
                       (self.U_high, self.S_high, self.V_high, self.U_low, self.S_low, self.V_low))
            return compose_weight(*factors).to(dtype or self.weight_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, frozen_rank={self.frozen_rank}, "
                f"trainable_rank={self.U_low.shape[1]}, bias={self.bias is not None}, "
                f"forward_mode={self.forward_mode!r}")
