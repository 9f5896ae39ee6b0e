"""The model of a run, as the loop trains it: loaded, adapted by the training method, wrapped for the strategy.

One process, and DDP (every rank holds the whole model anyway), load the checkpoint on every rank
(``model.load_model``). Under FSDP2 only rank 0 does; every other rank builds the same architecture on the meta
device (no memory) and applies the training method there, which then changes only structure (OSFT's factors of the
right shapes without an SVD, LoRA's adapter layers without values). Every rank shards the model
(``fully_shard``); the others allocate just their shards (``to_empty``) and receive rank 0's values, one tensor
at a time, through ``set_model_state_dict(..., broadcast_from_rank0=True)``. What a state dict leaves out
(non-persistent buffers such as the rotary ``inv_freq``, and the attention implementation rank 0's packing
self-check chose) is broadcast too. So rank 0's decomposed factors and adapter initialisation are every rank's.

Host memory for an N-parameter model: rank 0 holds the full fp32 model until its values are sent (as every rank
did before); each other rank only its shards plus one full tensor in flight.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from training_hub.engine import distributed
from training_hub.engine.method import TrainingMethod
from training_hub.engine.model import checkpointing, enable_checkpointing, load_model, stored_dtype

logger = logging.getLogger(__name__)


def build_model(config: Any, method: TrainingMethod, ranks: distributed.Ranks, device: torch.device, *,
                cpu_offload: bool = False, param_dtype: torch.dtype | None = None):
    """``(raw, model, save_dtype)``: the model with ``method`` applied, what the loop calls (``raw``, DDP around
    it, or ``raw`` made FSDP2; see ``distributed.wrap_model``), and the dtype its checkpoint stores.

    Under FSDP2 every rank must call it; only rank 0 reads the weights (see the module docstring).
    """
    wrap = dict(cpu_offload=cpu_offload, param_dtype=param_dtype)
    if not ranks.fsdp:
        raw, save_dtype = load_model(config, device)
        method.prepare_model(raw)
        return raw, distributed.wrap_model(raw, ranks, device, **wrap), save_dtype
    if ranks.is_main:
        raw, save_dtype = load_model(config, device)
    else:
        raw, save_dtype = meta_model(config, device), stored_dtype(config.model_path, config.trust_remote_code)
    method.prepare_model(raw)  # rank 0: the values (SVD, adapter init); the others: the same structure on meta
    full_state = raw.state_dict() if ranks.is_main else {}
    distributed.barrier(ranks)  # rank 0 may take minutes (reading, decomposing): wait on the CPU group
    attention = distributed.broadcast(ranks, raw.config._attn_implementation if ranks.is_main else None)
    if not ranks.is_main:
        use_attention(raw, attention)
    model = distributed.wrap_model(raw, ranks, device, **wrap)
    if not ranks.is_main:
        materialise_shards(raw, device, cpu_offload)
    receive_from_rank0(raw, full_state)  # rank 0's full copy is dropped on return
    return raw, model, save_dtype


def meta_model(config: Any, device: torch.device) -> torch.nn.Module:
    """The architecture of ``config.model_path`` on the meta device, set up as ``load_model`` sets up the loaded
    model (fp32, SDPA, activation checkpointing, train mode); no weights are read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32, attn_implementation="sdpa",
                                                 trust_remote_code=config.trust_remote_code)
    if checkpointing(config.gradient_checkpointing, device):
        enable_checkpointing(model)
    model.train()
    return model


def use_attention(model: torch.nn.Module, implementation: str) -> None:
    """Switch ``model`` to the attention implementation rank 0's self-check settled on (registered first, in
    case it is the engine's own packed attention)."""
    from training_hub.engine.attention import register

    if model.config._attn_implementation != implementation:
        register()
        model.set_attn_implementation(implementation)


def materialise_shards(model: torch.nn.Module, device: torch.device, cpu_offload: bool) -> None:
    """Allocate (uninitialised) the FSDP2 shards of a model built on the meta device, and its buffers.

    Shards go where FSDP2 keeps them (CPU memory under ``cpu_offload``); buffers, which FSDP2 does not shard, on
    the compute device, as ``fully_shard`` places them for a model that had values.
    """
    model.to_empty(device=torch.device("cpu") if cpu_offload else device)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = torch.empty_like(buffer, device=device)


def receive_from_rank0(model: torch.nn.Module, full_state: dict) -> None:
    """Every rank's shards (and buffers) from rank 0's ``full_state`` (the model's full state dict there, ``{}``
    elsewhere). Every rank must call it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():  # non-persistent buffers are not in a state dict; rank 0 computed them from the config
        for _, buffer in model.named_buffers():
            dist.broadcast(buffer, src=0)
