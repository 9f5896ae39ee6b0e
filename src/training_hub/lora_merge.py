"""Merge a LoRA adapter (PEFT format) into its base model and save a plain Hugging Face checkpoint.

``merge_adapter(adapter_dir, out_dir)`` reads the base model named in ``adapter_config.json``
(``base_model_name_or_path``; pass ``base_model_path`` to override, e.g. when the base moved), folds the adapter
into its weights (``W + B @ A * alpha / r``; DoRA's magnitudes too) and writes config, safetensors weights,
generation config and the tokenizer (from the adapter directory if it has one, else from the base), so that
``AutoModelForCausalLM.from_pretrained(out_dir)`` needs neither PEFT nor the adapter. The folder is written under a
temporary name and renamed when complete.

The CLI equivalent is ``training-hub merge ADAPTER_DIR OUT_DIR``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["merge_adapter"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _base_model_path(adapter_dir: Path, override: str | os.PathLike | None) -> str:
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"merge_adapter: {adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    if override is not None:
        return str(override)
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"merge_adapter: {config_file} names no base model; pass base_model_path=")
    return base


def merge_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                  base_model_path: str | os.PathLike | None = None, dtype: str = "auto",
                  overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Write ``base + adapter`` as a merged Hugging Face checkpoint in ``out_dir``; return its path.

    Args:
        adapter_dir: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        out_dir: where to write the merged checkpoint; must not exist (or be empty) unless ``overwrite=True``.
        base_model_path: the base model (default: the one recorded in ``adapter_config.json``).
        dtype: dtype of the saved weights: ``"auto"`` keeps the base model's, or ``"float32"``/``"bfloat16"``/
            ``"float16"``. The merge itself is done in float32.
        overwrite: replace an existing non-empty ``out_dir``.
        trust_remote_code: allow model code from the base model directory.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base = _base_model_path(adapter_dir, base_model_path)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ValueError(f"merge_adapter: {out_dir} exists and is not empty (pass overwrite=True)")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"merge_adapter: dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training_hub.engine.checkpoint import atomic_directory
    from training_hub.engine.model import stored_dtype

    save_dtype = stored_dtype(base, trust_remote_code) if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged = merged.to(save_dtype)
    has_tokenizer = any((adapter_dir / name).exists() for name in TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir) if has_tokenizer else base,
                                              trust_remote_code=trust_remote_code)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    with atomic_directory(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
