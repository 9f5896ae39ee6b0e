"""plot_loss draws one or several runs' metrics.jsonl into a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training_hub.cli import main
from training_hub.plot import plot_loss


def write_run(path, losses, val=()):
    path.mkdir(parents=True)
    lines = [{"type": "train", "step": i + 1, "loss": loss} for i, loss in enumerate(losses)]
    lines += [{"type": "validation", "step": s, "loss": loss} for s, loss in val]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_plot_several_runs(tmp_path):
    write_run(tmp_path / "a", [3.0, 2.0, 1.5], val=[(3, 1.8)])
    write_run(tmp_path / "b", [3.1, 2.5, 2.2])
    out = plot_loss([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp.png")
    data = Path(out).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_cli_and_errors(tmp_path, capsys):
    write_run(tmp_path / "run", [2.0, 1.0])
    assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").stat().st_size > 0
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad/metrics.jsonl:2: not valid JSON"):
        plot_loss(tmp_path / "bad", tmp_path / "y.png")
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_loss(tmp_path / "missing", tmp_path / "z.png")


def test_upstream_signature_and_upstream_metrics_files(tmp_path):
    """Upstream calls: plot_loss(dir) writes <dir>/loss_plot.png; ema, labels, output_path, metric_keys; and the
    upstream engines' metrics files (no 'type', loss under 'avg_loss') are read too."""
    write_run(tmp_path / "ours", [3.0, 2.0, 1.5, 1.2])
    ilab = tmp_path / "ilab"
    ilab.mkdir()
    lines = [{"model_path": "m", "effective_batch_size": 8}] + [{"step": i, "avg_loss": 3.0 / i} for i in (1, 2, 3)]
    (ilab / "training_params_and_metrics_global0.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert plot_loss(str(tmp_path / "ours")) == str(tmp_path / "ours" / "loss_plot.png")
    out = plot_loss([str(tmp_path / "ours"), str(ilab)], labels=["native", "instructlab"], ema=True, ema_span=2,
                    output_path=str(tmp_path / "both.png"))
    assert out == str(tmp_path / "both.png") and Path(out).stat().st_size > 5000
    with pytest.raises(ValueError, match="no training loss records .*looked for val"):
        plot_loss(str(ilab), metric_keys=["val"])


def test_ema_and_loss_points():
    from training_hub.plot import exponential_moving_average, loss_points

    assert exponential_moving_average([1.0, 3.0, 3.0], span=3) == [1.0, 2.0, 2.5]  # alpha = 0.5
    records = [{"type": "train", "step": 5, "loss": 2.0}, {"type": "validation", "step": 5, "loss": 1.0},
               {"avg_loss": 0.5}]
    assert loss_points(records, ["loss", "avg_loss"]) == ([5, 3], [2.0, 0.5])
    assert loss_points(records, ["loss"], kind="validation") == ([5], [1.0])
