"""The README's demo: a tiny model learns the bundled chat data well enough to answer it word for word."""

from __future__ import annotations

import re

import pytest

from training_hub.cli import main


@pytest.mark.slow
def test_demo_trains_and_answers_most_training_questions(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    right, total = map(int, re.search(r"On all (\d+) training questions the trained model answers (\d+)", out)
                       .groups()[::-1])
    assert total == 336 and right / total >= 0.8, out
    checkpoint = re.search(r"Checkpoint \(Hugging Face format.*\): (\S+)", out).group(1)
    assert (tmp_path / checkpoint).exists() or __import__("pathlib").Path(checkpoint).exists()
    assert (tmp_path / "base_model" / "config.json").exists()
