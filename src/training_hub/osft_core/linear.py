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

Precision of the dense path. With fp32 inputs and no autocast everything is fp32, as written above. When the call
computes in bf16 (``x`` is bf16, or bf16 autocast is on for its device; the factors stay fp32 master copies), the
three big products run as bf16 GEMMs, which accumulate in fp32 inside the kernel: the composition of W (one GEMM
over ``[high | low]``, forward and backward), ``dL/dW = grad_out^T x`` and its two projections onto the factors.
Those two projections return fp32 (the factors' gradients; ``torch.mm(..., out_dtype=torch.float32)`` on CUDA,
a cast on CPU, which has no such kernel in torch 2.13). The ``"factored"`` path is ordinary autograd ops on the
factors cast to bf16 (its output is bf16 too, like the dense path's and a plain ``nn.Linear``'s under autocast).
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


def _factor_grads(G, U, S, V, needs, mm=torch.matmul):
    """Gradients of ``U diag(S) V^T`` with respect to (U, S, V) given dL/dW = G (out x in); ``mm`` does the two
    products with G."""
    if not any(needs):
        return None, None, None
    GV = mm(G, V)  # out x rank
    dU = GV * S if needs[0] else None
    dS = (U * GV).sum(0) if needs[1] else None
    dV = mm(G.transpose(0, 1), U) * S if needs[2] else None
    return dU, dS, dV


def _computes_in_bf16(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` computes in bf16: ``x`` is bf16, or bf16 autocast is on for its device."""
    device_type = x.device.type
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled(device_type)
                                         and torch.get_autocast_dtype(device_type) == torch.bfloat16)


def compose_weight_bf16(U_high, S_high, V_high, U_low, S_low, V_low) -> torch.Tensor:
    """The weight of :func:`compose_weight` in bf16, as one bf16 GEMM ``[U_h S_h | U_l S_l] [V_h | V_l]^T``:
    fp32 accumulation inside the kernel and a single rounding of each element of W to bf16."""
    left = torch.cat([(U_high * S_high).to(torch.bfloat16), (U_low * S_low).to(torch.bfloat16)], dim=1)
    right = torch.cat([V_high.to(torch.bfloat16), V_low.to(torch.bfloat16)], dim=1)
    return left @ right.transpose(0, 1)


def _mm_bf16_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with bf16 inputs (``b`` is cast; ``a`` is bf16 already), accumulated in fp32, returned in fp32.

    On CUDA ``torch.mm(..., out_dtype=torch.float32)`` (documented for bf16 inputs on CUDA since torch 2.8; not
    on ROCm here, untested there) writes the fp32 accumulator. CPU has no such kernel in torch 2.13: the bf16
    result is cast, one more bf16 rounding per element, of the size of the input roundings (measured in
    :func:`_backward_bf16`'s comment). No probing at run time: this runs inside ``torch.compile``d graphs."""
    b = b.to(torch.bfloat16)
    if a.device.type == "cuda" and torch.version.hip is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


def _backward_bf16(ctx, grad_out):
    """The backward of :class:`_DenseOSFTLinear` for a bf16 call."""
    x, U_high, S_high, V_high, U_low, S_low, V_low = ctx.saved_tensors
    needs = ctx.needs_input_grad
    g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(torch.bfloat16)
    grad_x = None
    if needs[0]:
        weight = compose_weight_bf16(U_high, S_high, V_high, U_low, S_low, V_low)
        grad_x = (g2 @ weight).reshape(*grad_out.shape[:-1], weight.shape[1])
    grad_high = grad_low = (None, None, None)
    if any(needs[1:7]):
        # G = dL/dW (out x in) is kept in bf16: accumulated over the tokens in fp32 inside the GEMM and rounded
        # once per element, as a plain nn.Linear's weight gradient is under bf16 autocast; it is the bf16 input
        # that the two products below need anyway, and half the memory of an fp32 G. Measured (benchmarks/
        # osft_cost.py --layer 2048x2048 --tokens 4096, k = m/2, CPU), relative Frobenius error of the factor
        # gradients against fp64: 3.7e-3 for each of U_low, S_low, V_low; 2.4e-3 if G were accumulated and kept
        # in fp32 from the same bf16 x and grad_out (those roundings dominate); 2.9e-3 for a plain nn.Linear's
        # weight gradient under bf16 autocast. Per element that is noise far below a mini-batch's, and Adam
        # normalises each element's step anyway: the loss curve of a tiny model tracks its fp32 curve
        # (benchmarks/osft_cost.py --curve; tests/test_osft_api.py).
        G = g2.transpose(0, 1) @ x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        grad_high = _factor_grads(G, U_high, S_high, V_high, needs[1:4], mm=_mm_bf16_fp32)
        grad_low = _factor_grads(G, U_low, S_low, V_low, needs[4:7], mm=_mm_bf16_fp32)
    grad_bias = g2.sum(0, dtype=torch.float32) if ctx.has_bias and needs[7] else None
    return (grad_x, *grad_high, *grad_low, grad_bias, None)


class _DenseOSFTLinear(torch.autograd.Function):
    """``F.linear(x, W, bias)`` with W composed from its factors; the backward recomputes W (saves memory).

    ``bf16``: compute in bf16 (see the module docstring); otherwise in the factors' dtype, then ``x``'s."""

    @staticmethod
    def forward(ctx, x, U_high, S_high, V_high, U_low, S_low, V_low, bias, bf16=False):
        ctx.has_bias, ctx.bf16 = bias is not None, bf16
        if bf16:
            # x is saved as given, not as a bf16 copy: q, k and v (gate and up) share one fp32 input under
            # autocast, which three bf16 copies would outweigh; the backward casts it again (cheap next to G).
            ctx.save_for_backward(x, U_high, S_high, V_high, U_low, S_low, V_low)
            with torch.autocast(x.device.type, enabled=False):
                weight = compose_weight_bf16(U_high, S_high, V_high, U_low, S_low, V_low)
                return F.linear(x.to(torch.bfloat16), weight, None if bias is None else bias.to(torch.bfloat16))
        weight = compose_weight(U_high, S_high, V_high, U_low, S_low, V_low).to(x.dtype)
        ctx.save_for_backward(x, U_high, S_high, V_high, U_low, S_low, V_low)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.bf16:
            return _backward_bf16(ctx, grad_out)
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
        return (grad_x, *grad_high, *grad_low, grad_bias, None)


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
            return _DenseOSFTLinear.apply(x, *factors, self.bias, _computes_in_bf16(x))
        dtype = torch.bfloat16 if _computes_in_bf16(x) else x.dtype  # under autocast: bf16 throughout, as dense
        U_high, S_high, V_high, U_low, S_low, V_low = (f.to(dtype) for f in factors)
        out = ((x @ V_low) * S_low) @ U_low.transpose(0, 1)
        if S_high.numel():
            out = out + ((x @ V_high) * S_high) @ U_high.transpose(0, 1)
        return out if self.bias is None else out + self.bias.to(dtype)

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
