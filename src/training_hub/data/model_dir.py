"""A local model directory checked before any data work: a missing, empty or half-copied model fails at once with
its real cause, not with an error from deep inside ``transformers`` (or a 49-second Hub lookup of a local path).

Stdlib only (no torch, no transformers). A name that looks like a Hub id (``org/name`` that does not exist here)
is left alone: the Hugging Face cache may hold it.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class ModelDirectoryError(ValueError):
    """``model_path`` is a local directory that cannot hold a loadable model (the message says why)."""


def looks_local(model_path: str) -> bool:
    """True for a path meant as a local directory: absolute, starting with ``.`` or ``~``, containing a path
    separator (other than a Hub ``org/name``), or existing."""
    if os.path.exists(os.path.expanduser(model_path)):
        return True
    if HUB_ID.match(model_path):
        return False
    return (os.path.isabs(model_path) or model_path.startswith((".", "~")) or os.sep in model_path
            or (os.altsep is not None and os.altsep in model_path))


def check_safetensors(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (None when its header and size agree)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes, not even a safetensors header)"
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len > size:
                return (f"{path.name} is truncated or not a safetensors file (its header claims {header_len} bytes, "
                        f"the file has {size})")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name} is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{path.name} is not a safetensors file (its header is not a JSON object)"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets") or ()) == 2]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"{path.name} is truncated ({size} bytes, its header describes {expected})"
    return None


def _problems(root: Path, need_chat_template: bool, trust_remote_code: bool) -> list[str]:
    names = {p.name for p in root.iterdir()}
    problems = []
    if "config.json" not in names:
        problems.append("no config.json")
    has_tokenizer = any(n in names for n in TOKENIZER_FILES) or {"vocab.json", "merges.txt"} <= names
    if not has_tokenizer and not trust_remote_code:  # remote code may bring its own tokenizer files
        problems.append("no tokenizer files (tokenizer.json, tokenizer.model, vocab.json + merges.txt or "
                        "tokenizer_config.json)")
    weights = sorted(n for n in names if n.endswith(".safetensors")
                     or (n.startswith("pytorch_model") and n.endswith(".bin")))
    indexes = [n for n in INDEX_FILES if n in names]
    if not weights and not indexes:
        problems.append("no weights (*.safetensors, pytorch_model*.bin or their index json)")
    for index in indexes:
        try:
            weight_map = json.loads((root / index).read_text()).get("weight_map") or {}
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, AttributeError) as exc:
            problems.append(f"{index} cannot be read ({exc})")
            continue
        missing = [s for s in shards if s not in names]
        if missing:
            problems.append(f"{index} names {len(missing)} missing shard(s): {', '.join(missing[:5])}")
    for name in weights:
        if name.endswith(".safetensors"):
            why = check_safetensors(root / name)
            if why:
                problems.append(why)
    if need_chat_template and has_tokenizer and not trust_remote_code \
            and not any(n in names for n in CHAT_TEMPLATE_FILES):
        try:
            template = json.loads((root / "tokenizer_config.json").read_text()).get("chat_template") \
                if "tokenizer_config.json" in names else None
        except (OSError, ValueError, AttributeError):
            template = None
        if not template:
            problems.append("no chat template (tokenizer_config.json has no chat_template and there is no "
                            "chat_template.jinja); chat data needs one, or use is_pretraining=True for documents")
    return problems


def _check_hub_id_offline(repo_id: str) -> None:
    """Offline (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), a Hub id must already be in the local cache."""
    offline = any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
                  for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if not offline:
        return  # online: transformers downloads it (or says why it cannot)
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        raise ModelDirectoryError(f"model_path {repo_id}: not a local directory, and not in the Hugging Face cache "
                                  "while offline (HF_HUB_OFFLINE is set); download it first (huggingface-cli download "
                                  f"{repo_id}) or give the path of a model directory")


def check_model_dir(model_path: str, *, need_chat_template: bool, trust_remote_code: bool) -> None:
    """Raise :class:`ModelDirectoryError` when ``model_path`` is meant as a local directory and cannot hold a
    loadable model: missing (no Hub lookup follows), a file, no config.json, no tokenizer files, no weights, a
    truncated safetensors file or a shard its index names that is missing. A Hub id is left alone."""
    path = str(model_path)
    if not looks_local(path):
        _check_hub_id_offline(path)
        return
    root = Path(os.path.expanduser(path))
    if not root.exists():
        raise ModelDirectoryError(f"model_path {path}: no such directory (a local path is not looked up on the "
                                  "Hugging Face Hub; a Hub model is named org/name)")
    if not root.is_dir():
        raise ModelDirectoryError(f"model_path {path} is a file, not a model directory (the directory that holds "
                                  "config.json, the tokenizer and the weights)")
    try:
        problems = _problems(root, need_chat_template, trust_remote_code)
    except OSError as exc:
        raise ModelDirectoryError(f"model_path {path} cannot be read: {exc}") from None
    if problems:
        raise ModelDirectoryError(f"model_path {path} is not a complete model directory: " + "; ".join(problems))
