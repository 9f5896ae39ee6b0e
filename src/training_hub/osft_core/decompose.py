"""Turn a model's target ``nn.Linear`` layers into ``OSFTLinear`` in place (one fp32 SVD each)."""

from __future__ import annotations

import math
import numbers
from fractions import Fraction

from training_hub.osft_core.linear import OSFTLinear
from training_hub.osft_core.targets import default_target_patterns, find_targets

__all__ = ["apply_osft", "frozen_rank", "osft_modules", "osft_trainable_parameters", "shaped_like"]


def _check_ratio(unfreeze_rank_ratio) -> Fraction:
    if isinstance(unfreeze_rank_ratio, bool) or not isinstance(unfreeze_rank_ratio, numbers.Real) \
            or not math.isfinite(unfreeze_rank_ratio) or not 0 < unfreeze_rank_ratio <= 1:
        raise ValueError(f"unfreeze_rank_ratio must be a number with 0 < unfreeze_rank_ratio <= 1 (the fraction of "
                         f"singular directions that train), got {unfreeze_rank_ratio!r}")
    # The decimal the user wrote, exactly: 1 - 0.9 in binary floating point is 0.0999..., which would floor
    # 10 * 0.1 = 1 down to 0.
    return Fraction(repr(float(unfreeze_rank_ratio)))


def frozen_rank(rank: int, unfreeze_rank_ratio: float) -> int:
    """k = floor(rank * (1 - unfreeze_rank_ratio)): the number of top singular directions that stay frozen.

    Computed exactly from the ratio's decimal value. Because the ratio is > 0, k <= rank - 1: every target keeps
    at least one trainable direction (a tiny ratio gives k = rank - 1, one direction trains).
    """
    ratio = _check_ratio(unfreeze_rank_ratio)
    return math.floor(rank * (1 - ratio))


def osft_modules(model) -> dict[str, OSFTLinear]:
    """``{qualified name: OSFTLinear}`` for every decomposed layer of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, OSFTLinear)}


def osft_trainable_parameters(model) -> list:
    """The trainable OSFT factors (U_low, S_low, V_low of every ``OSFTLinear``), in module order."""
    return [p for m in osft_modules(model).values() for p in m.trainable_factors()]


def shaped_like(linear, frozen_rank: int, *, dtype=None, forward_mode: str = "auto") -> OSFTLinear:
    """The ``OSFTLinear`` that ``OSFTLinear.from_linear`` makes of ``linear``, without its values: the same factor
    shapes and dtypes, uninitialised, on the weight's device (which may be meta; no SVD). For a process that
    receives the decomposed factors from one that holds the weights (FSDP2 loading, ``training_hub.engine.loading``).
    """
    weight = linear.weight
    if weight.ndim != 2:
        raise ValueError(f"OSFT needs a 2-D weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    module = OSFTLinear(in_features, out_features, frozen_rank, bias=linear.bias is not None, device=weight.device,
                        dtype=dtype or weight.dtype, weight_dtype=weight.dtype, forward_mode=forward_mode)
    if linear.bias is not None:
        module.bias.requires_grad_(linear.bias.requires_grad)
    return module


def _tied_elsewhere(model, module_name: str, weight) -> list[str]:
    return [name for name, p in model.named_parameters(remove_duplicate=False)
            if p is weight and name != f"{module_name}.weight"]


def apply_osft(model, *, unfreeze_rank_ratio: float, target_patterns: list[str] | None = None,
               freeze_non_targets: bool = False, factor_dtype=None, forward_mode: str = "auto") -> dict:
    """Replace each target ``nn.Linear`` of ``model`` by an ``OSFTLinear`` (in place) and return a summary.

    Args:
        unfreeze_rank_ratio: fraction of each target's singular directions that train, 0 < r <= 1. The top
            k = floor(min(out, in) * (1 - r)) directions are frozen; r = 1 gives k = 0 (the layer stays
            decomposed, every direction trains).
        target_patterns: module-name patterns (see ``find_targets``); default: from the model's architecture.
            Each given pattern must match at least one linear layer.
        freeze_non_targets: also freeze every parameter that is not an OSFT trainable factor (embeddings, norms,
            biases, the LM head). Default False: they train as in SFT.
        factor_dtype: dtype of the stored factors (default: each weight's dtype). The SVD itself is always fp32.
        forward_mode: ``"auto"``, ``"dense"`` or ``"factored"`` (see ``training_hub.osft_core.linear``).

    A target whose weight is on the meta device gets uninitialised factors of the same shapes, also on meta (no
    SVD; :func:`shaped_like`): the same structure as on a process that holds the weights, to receive
    the decomposed factors from it (FSDP2 loading).

    Returns:
        ``{"unfreeze_rank_ratio", "target_patterns", "targets": [names], "frozen_rank": {name: k},
        "rank": {name: min(out, in)}, "osft_trainable_parameters", "trainable_parameters", "total_parameters"}``
        (parameter counts are numbers of elements).
    """
    _check_ratio(unfreeze_rank_ratio)
    if osft_modules(model):
        raise ValueError("apply_osft: the model already has OSFTLinear layers (OSFT was applied before)")
    patterns = list(target_patterns) if target_patterns is not None else default_target_patterns(model.config)
    names = find_targets(model, patterns, require_all=target_patterns is not None)

    summary = {"unfreeze_rank_ratio": unfreeze_rank_ratio, "target_patterns": patterns, "targets": names,
               "frozen_rank": {}, "rank": {}}
    for name in names:
        linear = model.get_submodule(name)
        tied = _tied_elsewhere(model, name, linear.weight)
        if tied:
            raise ValueError(f"apply_osft: {name}.weight is tied to {tied}; a tied weight cannot be decomposed "
                             f"(leave {name} out of target_patterns)")
        rank = min(linear.weight.shape)
        k = frozen_rank(rank, unfreeze_rank_ratio)
        build = shaped_like if linear.weight.is_meta else OSFTLinear.from_linear  # meta: structure only
        replacement = build(linear, k, dtype=factor_dtype, forward_mode=forward_mode)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        del linear
        summary["frozen_rank"][name], summary["rank"][name] = k, rank

    factors = {id(p) for p in osft_trainable_parameters(model)}
    if freeze_non_targets:
        for p in model.parameters():
            if id(p) not in factors:
                p.requires_grad_(False)
    params = list(model.parameters())
    summary["osft_trainable_parameters"] = sum(p.numel() for p in params if id(p) in factors)
    summary["trainable_parameters"] = sum(p.numel() for p in params if p.requires_grad)
    summary["total_parameters"] = sum(p.numel() for p in params)
    return summary
