"""Loss curves from ``metrics.jsonl``: ``plot_loss`` and ``training-hub plot``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def read_metrics(run: str | Path) -> list[dict]:
    """Records of a run's ``metrics.jsonl`` (``run`` is the ckpt_output_dir or the file itself)."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl here (pass a run's ckpt_output_dir)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    return records


def plot_loss(runs: str | Path | Sequence[str | Path], output: str | Path = "loss.png", *,
              labels: Sequence[str] | None = None, title: str = "Training loss") -> Path:
    """Draw the training loss (and validation loss, dashed, where logged) of one or several runs on one chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    labels = list(labels) if labels else [Path(r).name or str(r) for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"labels: {len(labels)} given for {len(runs)} runs")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run, label in zip(runs, labels):
        records = read_metrics(run)
        train = [r for r in records if r.get("type", "train") == "train" and "loss" in r]
        if not train:
            raise ValueError(f"{run}: metrics.jsonl has no training loss records")
        line, = ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        val = [r for r in records if r.get("type") == "validation"]
        if val:
            ax.plot([r["step"] for r in val], [r["loss"] for r in val], "--o", color=line.get_color(),
                    label=f"{label} (validation)")
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
