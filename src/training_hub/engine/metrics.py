"""Run metrics: one JSON object per optimizer step in metrics.jsonl, a progress bar, peak memory."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch


def trim_metrics(path: Path, keep_through_step: int | None) -> None:
    """Start ``path`` afresh, keeping (on resume) the records up to ``keep_through_step``: those logged after the
    state we resume from was saved are dropped, and so is a line cut short by a kill, so the file reads as one
    uninterrupted run. Every writer of a metrics.jsonl (the native loops, the trl backend) starts here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if keep_through_step is not None and path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if isinstance(record, dict) and record.get("step", 0) <= keep_through_step:
                kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def strict_json(record: dict) -> dict:
    """``record`` with NaN and infinities as ``None``: metrics.jsonl stays strict JSON (``null``, not ``NaN``)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class MetricsWriter:
    """Appends one JSON line per record and flushes it, so a killed run keeps every line it logged (see
    :func:`trim_metrics` for what a resumed run keeps)."""

    def __init__(self, path: Path, keep_through_step: int | None = None):
        self.path = Path(path)
        trim_metrics(self.path, keep_through_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class DiscardMetrics:
    """The writer of every rank but rank 0 of a multi-process run: rank 0 alone writes metrics.jsonl."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: max allocated on CUDA, resident-set high-water mark on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # Linux: VmHWM is this program's own high-water mark. getrusage's ru_maxrss also counts the address space
    # of the process that forked us before our exec (e.g. a large parent such as a test runner or notebook).
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def progress_bar(total: int, initial: int, disable: bool, desc: str = "sft"):
    """A tqdm bar on stderr over optimizer steps."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disable, desc=desc, unit="step", file=sys.stderr,
                dynamic_ncols=True)


def step_record(*, step: int, epoch: float, loss: float, lr: float, grad_norm: float, samples: int, tokens: int,
                loss_tokens: int, seconds: float, elapsed: float, max_steps: int | None = None) -> dict:
    """The metrics.jsonl record of one optimizer step (samples/tokens are this step's; elapsed since start;
    ``max_steps`` the run's planned number of steps, which progress readers such as Kubeflow's use)."""
    return {
        "type": "train", "step": step, "max_steps": max_steps, "epoch": round(epoch, 6), "loss": loss, "lr": lr, "grad_norm": grad_norm,
        "samples": samples, "tokens": tokens, "loss_tokens": loss_tokens,
        "tokens_per_second": tokens / max(seconds, 1e-9), "elapsed": round(elapsed, 4),
    }
