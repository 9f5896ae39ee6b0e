"""plot_loss draws one or several runs' metrics.jsonl into a PNG."""

from __future__ import annotations

import json

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
    data = out.read_bytes()
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
