"""Shared fixtures: a clean registry per test, the tiny model built once per session, host reads per step."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEED_GUIDE = REPO.parent / "shared" / "seed" / "000_450ec77a189a5a4b.txt"


@pytest.fixture
def clean_registry():
    """Snapshot the registry and restore it afterwards, so registrations in one test do not leak."""
    from training_hub import AlgorithmRegistry

    AlgorithmRegistry.list_algorithms()  # make sure built-ins and plugins are loaded before the snapshot
    saved = (dict(AlgorithmRegistry._algorithms), copy.deepcopy(AlgorithmRegistry._backends))
    yield AlgorithmRegistry
    AlgorithmRegistry._algorithms.clear()
    AlgorithmRegistry._algorithms.update(saved[0])
    AlgorithmRegistry._backends.clear()
    AlgorithmRegistry._backends.update(saved[1])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """One default tiny model (random Qwen2 + ChatML BPE tokenizer) shared by the whole session."""
    from training_hub.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def host_reads(monkeypatch):
    """``host_reads(Recipe)`` -> a list that gets, per ``Recipe.train_step`` call, the reads of tensor values
    (``item``/``tolist``/``float``/``int``/``bool``) made by training_hub's own code during that step: each one
    is a host sync on a GPU."""
    import inspect

    import torch

    import training_hub

    package = str(Path(training_hub.__file__).parent)
    reads, inside = [], [False]

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = inspect.currentframe().f_back
            if inside[0] and caller.f_code.co_filename.startswith(package):
                reads.append(f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        counted(name)

    def watch(recipe) -> list[list[str]]:
        real_step, per_step = recipe.train_step, []

        def train_step(self, step, stop):
            reads.clear()
            inside[0] = True
            try:
                return real_step(self, step, stop)
            finally:
                inside[0] = False
                per_step.append(list(reads))
        monkeypatch.setattr(recipe, "train_step", train_step)
        return per_step
    return watch
