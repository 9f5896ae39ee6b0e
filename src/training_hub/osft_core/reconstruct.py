"""Dense weights for an ordinary Hugging Face checkpoint: W' = U_high S_high V_high^T + U_low S_low V_low^T."""

from __future__ import annotations

import torch

from training_hub.osft_core.decompose import osft_modules
from training_hub.osft_core.linear import compose_weight

__all__ = ["dense_state_dict", "FACTOR_NAMES"]

FACTOR_NAMES = ("U_high", "S_high", "V_high", "U_low", "S_low", "V_low")


def dense_state_dict(model, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the original (undecomposed) model: each OSFT layer's six factors become ``<name>.weight``.

    Args:
        model: a model after ``apply_osft`` (unwrapped: pass ``ddp_model.module``).
        state_dict: an OSFT state dict of ``model`` to convert, e.g. a full state dict gathered from FSDP2 shards;
            default ``model.state_dict()``. Its other tensors are passed through unchanged (the same objects, so
            ``save_pretrained`` still recognises tied embeddings).

    The dense weight is composed in fp32 and returned in the original weight's dtype, on the factors' device;
    keys keep the order of the state dict (``weight`` where ``U_high`` was, then ``bias``).
    """
    if state_dict is None:
        state_dict = model.state_dict()
    modules = osft_modules(model)
    by_first_key = {f"{name}.{FACTOR_NAMES[0]}": name for name in modules}
    factor_keys = {f"{name}.{f}" for name in modules for f in FACTOR_NAMES}
    missing = sorted(k for k in factor_keys if k not in state_dict)
    if missing:
        raise ValueError(f"dense_state_dict: the state dict lacks OSFT factors {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in by_first_key:
            name = by_first_key[key]
            factors = [state_dict[f"{name}.{f}"] for f in FACTOR_NAMES]
            factors = [f.full_tensor() if hasattr(f, "full_tensor") else f for f in factors]
            weight = compose_weight(*(f.detach().to(torch.float32) for f in factors))
            out[f"{name}.weight"] = weight.to(modules[name].weight_dtype)
        elif key not in factor_keys:
            out[key] = value
    return out
