"""Which linear layers OSFT decomposes: default patterns per architecture, and pattern matching.

A pattern names whole components of a module's dotted name: ``"self_attn.q_proj"`` matches
``model.layers.3.self_attn.q_proj`` but not ``...self_attn.q_proj_extra``; a trailing ``.weight`` is ignored, so
upstream-style parameter names work too. The defaults come from the model's architecture (``config.model_type``),
never from the checkpoint's path.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["default_target_patterns", "find_targets", "ARCHITECTURE_PATTERNS"]

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_GATED_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# model_type -> the attention and MLP projections. Module names checked against transformers 5 (meta-device
# builds). MoE models whose experts are fused 3-D tensors (not nn.Linear) get their attention projections only.
ARCHITECTURE_PATTERNS: dict[str, tuple[str, ...]] = {
    **{t: _ATTN + _GATED_MLP for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "olmo", "olmo2",
        "olmo3", "smollm3", "cohere", "cohere2", "helium", "exaone4", "seed_oss", "stablelm", "ernie4_5", "bitnet")},
    **{t: _ATTN + ("mlp.gate_up_proj", "mlp.down_proj") for t in ("glm", "glm4")},
    **{t: _ATTN + ("mlp.up_proj", "mlp.down_proj") for t in ("arcee", "apertus")},
    **{t: _ATTN for t in ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "granitemoe", "minimax", "phimoe")},
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    "starcoder2": _ATTN + ("mlp.c_fc", "mlp.c_proj"),
    "phi": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"),
    "gptj": ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out"),
    "gpt_neox": ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
}


def default_target_patterns(config) -> list[str]:
    """The attention and MLP projection names for the architecture in ``config`` (``config.model_type``).

    ``config`` may be a ``transformers.PretrainedConfig``, a model with a ``.config``, or a dict with
    ``"model_type"``. Raises ``ValueError`` for an architecture without defaults (pass ``target_patterns``).
    """
    if hasattr(config, "config") and not isinstance(config, dict):
        config = config.config
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type in ARCHITECTURE_PATTERNS:
        return list(ARCHITECTURE_PATTERNS[model_type])
    architectures = (config.get("architectures") if isinstance(config, dict)
                     else getattr(config, "architectures", None)) or []
    raise ValueError(
        f"OSFT has no default target_patterns for model_type {model_type!r} (architectures {list(architectures)}); "
        f"pass target_patterns=[...] naming the linear layers to decompose, e.g. ['self_attn.q_proj', "
        f"'mlp.down_proj']. Architectures with defaults: {', '.join(sorted(ARCHITECTURE_PATTERNS))}")


def _normalise(pattern: str) -> str:
    pattern = pattern.strip().strip(".")
    return pattern[: -len(".weight")] if pattern.endswith(".weight") else pattern


def _matches(name: str, pattern: str) -> bool:
    return f".{pattern}." in f".{name}."


def find_targets(model, target_patterns: Iterable[str], *, require_all: bool = True) -> list[str]:
    """Fully-qualified names of the ``nn.Linear`` modules of ``model`` matched by any of ``target_patterns``.

    With ``require_all`` (the default) every pattern must match at least one linear layer; otherwise at least one
    pattern must. A failure raises ``ValueError`` naming the unmatched patterns and listing linear layer names.
    """
    from torch import nn

    if isinstance(target_patterns, str):
        raise ValueError(f"target_patterns must be a list of strings, got the string {target_patterns!r}")
    patterns = [_normalise(p) for p in target_patterns]
    if not patterns or any(not isinstance(p, str) or not p for p in patterns):
        raise ValueError(f"target_patterns must be a non-empty list of non-empty strings, got {target_patterns!r}")
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    targets = [name for name in linears if any(_matches(name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(_matches(name, p) for name in linears)]
    if (require_all and unmatched) or not targets:
        sample = ", ".join(linears[:12]) + (f", ... ({len(linears)} in all)" if len(linears) > 12 else "")
        raise ValueError(f"OSFT target_patterns {unmatched or patterns} match no nn.Linear module of "
                         f"{type(model).__name__}; its linear layers are: {sample or '(none)'}")
    return targets
