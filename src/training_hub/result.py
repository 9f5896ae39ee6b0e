"""The one result shape every built-in backend returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Iterator


@dataclass
class TrainingResult(Mapping):
    """What a training run produced; readable as attributes and as a mapping (``result["checkpoint_path"]``).

    status:          "success" (or "stopped" when interrupted after saving state)
    checkpoint_path: the newest Hugging Face checkpoint written (None if none was saved)
    metrics:         final_loss, steps, tokens, tokens_per_second, peak_memory_bytes, ...
    output_dir:      the run's ckpt_output_dir (holds metrics.jsonl and the training state)
    """

    status: str
    checkpoint_path: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    output_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def _as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    def __getitem__(self, key: str) -> Any:
        try:
            return self._as_dict()[key]
        except KeyError:
            raise KeyError(f"{key!r}; available: {', '.join(self._as_dict())}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._as_dict())

    def __len__(self) -> int:
        return len(self._as_dict())
