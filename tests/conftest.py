"""Shared fixtures: a clean registry per test, and the tiny model built once per session."""

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
