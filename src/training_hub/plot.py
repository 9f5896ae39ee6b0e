"""Loss curves from ``metrics.jsonl``: ``plot_loss`` and ``training-hub plot``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


# Where a run's per-step metrics are: ours first, then the upstream engines' files (instructlab-training,
# mini-trainer and older training_hub runs), so upstream runs can be plotted too.
METRICS_FILES = ("metrics.jsonl", "training_params_and_metrics_global0.jsonl", "training_metrics.jsonl",
                 "training_log.jsonl")
NOT_METRICS = ("data.jsonl", "engine_events.jsonl", "upstream_events.jsonl")  # the adapters' event logs (new, old name)
LOSS_KEYS = ("loss", "avg_loss", "train_loss")


def find_metrics_file(run: str | Path, metrics_file: str | None = None) -> Path:
    """The metrics file of a run: ``run`` itself if it is a file, ``run/metrics_file`` if named, else the first of
    :data:`METRICS_FILES` present, else the only other ``*.jsonl`` in the directory."""
    path = Path(run)
    if path.is_file():
        return path
    if metrics_file:
        named = path / metrics_file
        if not named.is_file():
            raise FileNotFoundError(f"{named}: no such metrics file")
        return named
    for name in METRICS_FILES:
        if (path / name).is_file():
            return path / name
    others = sorted(p for p in path.glob("*.jsonl") if p.name not in NOT_METRICS) if path.is_dir() else []
    if len(others) == 1:
        return others[0]
    raise FileNotFoundError(f"{path}: no metrics.jsonl here (pass a run's ckpt_output_dir, or name the file with "
                            f"metrics_file=; looked for {', '.join(METRICS_FILES)})")


def read_metrics(run: str | Path, metrics_file: str | None = None) -> list[dict]:
    """Records of a run's metrics file (``run`` is the ckpt_output_dir or the file itself)."""
    path = find_metrics_file(run, metrics_file)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    return records


def loss_points(records: list[dict], keys: Sequence[str], kind: str = "train") -> tuple[list, list]:
    """(steps, losses) of the records of one kind; a record's loss is its first key of ``keys`` present. Records
    without a ``type`` (upstream engines' files) count as training records; without a ``step``, their position."""
    steps, losses = [], []
    for position, record in enumerate(records, start=1):
        if not isinstance(record, dict) or record.get("type", "train") != kind:
            continue
        key = next((k for k in keys if isinstance(record.get(k), (int, float))), None)
        if key is not None:
            steps.append(record.get("step", position))
            losses.append(float(record[key]))
    return steps, losses


def exponential_moving_average(values: Sequence[float], span: int) -> list[float]:
    """EMA with smoothing factor 2 / (span + 1), started at the first value."""
    alpha, out = 2.0 / (span + 1), []
    for value in values:
        out.append(value if not out else alpha * value + (1 - alpha) * out[-1])
    return out


def plot_loss(ckpt_output_dirs: str | Path | Sequence[str | Path], output_path: str | Path | None = None, *,
              labels: Sequence[str] | None = None, metrics_file: str | None = None, ema: bool = False,
              ema_span: int = 30, metric_keys: Sequence[str] | None = None, show: bool = False,
              title: str = "Training loss") -> str:
    """Draw the training loss (and validation loss, dashed, where logged) of one or several runs on one chart.

    The signature is the upstream Training Hub's: ``output_path`` defaults to ``loss_plot.png`` in the first run's
    directory; ``ema=True`` overlays an exponential moving average (``ema_span``); ``metric_keys`` are the loss
    keys tried in order; ``metrics_file`` names the file inside each run; ``show`` also opens a window. Returns
    the path of the PNG.
    """
    import matplotlib

    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [ckpt_output_dirs] if isinstance(ckpt_output_dirs, (str, Path)) else list(ckpt_output_dirs)
    labels = list(labels) if labels else [Path(r).name or str(r) for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"labels: {len(labels)} given for {len(runs)} runs")
    keys = tuple(metric_keys) if metric_keys else LOSS_KEYS
    if output_path is None:
        first = Path(runs[0])
        output_path = (first.parent if first.is_file() else first) / "loss_plot.png"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run, label in zip(runs, labels):
        records = read_metrics(run, metrics_file)
        steps, losses = loss_points(records, keys)
        if not losses:
            raise ValueError(f"{run}: no training loss records (looked for {', '.join(keys)})")
        line, = ax.plot(steps, losses, label=label)
        if ema:
            ax.plot(steps, exponential_moving_average(losses, ema_span), "-.", color=line.get_color(), alpha=0.8,
                    label=f"{label} (EMA {ema_span})")
        val_steps, val_losses = loss_points(records, keys, kind="validation")
        if val_losses:
            ax.plot(val_steps, val_losses, "--o", color=line.get_color(), label=f"{label} (validation)")
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    if show:
        plt.show()
    plt.close(fig)
    return str(output)
