"""The one result shape every built-in backend returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator


@dataclass
class TrainingResult(Mapping):
    """What a training run produced; readable as attributes and as a mapping (``result["checkpoint_path"]``).

    status:          "success" (or "stopped" when interrupted after saving state)
    checkpoint_path: the newest Hugging Face checkpoint written (None if none was saved)
    metrics:         final_loss, steps, tokens, tokens_per_second, peak_memory_bytes, memory (the native
                     engine's ledger: parameters, gradients, optimizer, activations, total bytes), ...
    output_dir:      the run's ckpt_output_dir (holds metrics.jsonl and the training state)

    A backend may add keys computed on first access (:meth:`set_lazy`; ``lora_sft``: ``"model"`` and
    ``"tokenizer"``, as upstream's result has them). ``result["model"]`` loads it once and keeps it;
    ``"model" in result`` and :meth:`lazy_keys` do not load anything. Iterating the result (``dict(result)``,
    ``json.dumps``, the CLI's summary) lists the stored keys only, so nobody pays for a load they did not ask for.
    """

    status: str
    checkpoint_path: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    output_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lazy: dict[str, Callable[[], Any]] = {}  # not dataclass fields: results are written as JSON
        self._loaded: dict[str, Any] = {}

    def set_lazy(self, key: str, load: Callable[[], Any]) -> None:
        """Answer ``result[key]`` with ``load()``, called on the first access only."""
        self._lazy[key] = load
        self._loaded.pop(key, None)

    def lazy_keys(self) -> list[str]:
        """Keys computed on first access (not listed when iterating)."""
        return list(getattr(self, "_lazy", {}))

    def _as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    def __getitem__(self, key: str) -> Any:
        stored = self._as_dict()
        if key in stored:
            return stored[key]
        lazy = getattr(self, "_lazy", {})
        if key in lazy:
            if key not in self._loaded:
                self._loaded[key] = lazy[key]()
            return self._loaded[key]
        raise KeyError(f"{key!r}; available: {', '.join([*stored, *lazy])}")

    def __contains__(self, key: object) -> bool:
        return key in self._as_dict() or key in getattr(self, "_lazy", {})

    def __iter__(self) -> Iterator[str]:
        return iter(self._as_dict())

    def __len__(self) -> int:
        return len(self._as_dict())
