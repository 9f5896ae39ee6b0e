"""embedding_sft(): the declaration, the labelled-text reader (file:line problems), and tiny end-to-end runs on
sentence-transformers that must make held-out same-label texts closer than different-label ones."""

from __future__ import annotations

import inspect
import json
import typing
from pathlib import Path

import pytest

import training_hub
from training_hub import EmbeddingSFTAlgorithm, ParameterError, SentenceTransformersBackend, embedding_sft
from training_hub.data.errors import DataValidationError
from training_hub.data.labelled import check_triplet_labels, read_labelled, to_pairs
from training_hub.tiny import labelled_texts, make_tiny_model


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def one_thread():
    """Tiny models train far faster on one thread than on oversubscribed cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("encoder") / "bert", arch="bert")


# ------------------------------------------------------------------------------------------------ declaration


def test_upstream_names_defaults_and_schema():
    sig = inspect.signature(embedding_sft)
    upstream = {"loss_type": "batch_all_triplet", "loss_fn": None, "num_epochs": 20, "batch_size": 32,
                "learning_rate": 2e-5, "warmup_ratio": 0.1, "batch_sampler": None, "eval_data_path": None,
                "text_column": "text", "label_column": "label", "seed": 42}
    assert {n: sig.parameters[n].default for n in upstream} == upstream
    assert list(sig.parameters)[:3] == ["model_path", "data_path", "ckpt_output_dir"]
    algo = EmbeddingSFTAlgorithm(SentenceTransformersBackend())
    assert algo.get_required_params() == {"model_path": str, "data_path": str, "ckpt_output_dir": str}
    assert algo.get_optional_params()["loss_fn"] is typing.Callable
    assert training_hub.AlgorithmRegistry.get_backend("embedding_sft", "sentence-transformers") \
        is SentenceTransformersBackend


def test_every_problem_in_one_error_with_hints(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(ParameterError) as info:
        embedding_sft("m", data, str(tmp_path / "o"), batch_size=0, learing_rate=1e-3, num_epochs="3")
    text = str(info.value)
    assert "did you mean 'learning_rate'" in text and "batch_size: must be > 0" in text and "num_epochs" in text
    with pytest.raises(ParameterError) as info:
        embedding_sft("m", data, str(tmp_path / "o"), loss_type="batch_hard", batch_sampler="group_by")
    assert len(info.value.problems) == 2
    assert "did you mean 'batch_hard_triplet'" in str(info.value) and "did you mean 'group_by_label'" in str(info.value)
    assert not (tmp_path / "o").exists()


def test_non_callable_loss_fn_is_a_type_error_before_anything_loads(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(TypeError, match="loss_fn must be callable") as info:
        embedding_sft("./no/such/model", data, str(tmp_path / "o"), loss_fn=3)
    assert isinstance(info.value, ValueError)  # still a ParameterError


def test_unavailable_without_sentence_transformers(monkeypatch):
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "sentence_transformers", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentence_transformers" else real(name, *a))
    status = SentenceTransformersBackend.is_available()
    assert not status and "pip install training-hub[embedding]" in status.reason


# ------------------------------------------------------------------------------------------------ data


def test_problems_name_file_line_and_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [
        {"text": "ok", "label": 0}, {"label": 1}, {"text": "x", "label": 0.5}, {"text": "y", "label": [1]},
        {"text": "z"}, {"text": "w", "label": None},
    ])
    with pytest.raises(DataValidationError) as info:
        read_labelled(path)
    lines = [(p.line, p.field) for p in info.value.problems]
    assert lines == [(2, "text"), (3, "label"), (4, "label"), (5, "label"), (6, "label")]
    assert "0.5 is not a whole number" in str(info.value) and f"{path}:3" in str(info.value)


def test_class_names_mixed_with_ids_is_a_problem(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "billing"}])
    with pytest.raises(DataValidationError, match=r"d.jsonl:2: label: class name 'billing'.*d.jsonl:1"):
        read_labelled(path)


def test_labels_become_ints_from_every_source(tmp_path):
    from datasets import Dataset

    csv = tmp_path / "d.csv"
    csv.write_text('text,label\n"two\nlines",1\nb,0\n')
    data = read_labelled(str(csv))
    assert [r["label"] for r in data.rows] == [1, 0] and data.location(1) == f"{csv}:4"
    names = read_labelled(_jsonl(tmp_path / "n.jsonl", [{"q": "a", "c": "tech"}, {"q": "b", "c": "billing"}]),
                          text_column="q", label_column="c")
    assert [r["label"] for r in names.rows] == [1, 0] and names.label_names == {0: "billing", 1: "tech"}
    Dataset.from_list([{"text": "a", "label": 2.0}, {"text": "b", "label": 0.0}]).save_to_disk(str(tmp_path / "s"))
    assert [r["label"] for r in read_labelled(str(tmp_path / "s")).rows] == [2, 0]
    (tmp_path / "l.json").write_text('[\n{"text": "a", "label": true},\n{"text": "b", "label": 3}\n]')
    assert [r["label"] for r in read_labelled(str(tmp_path / "l.json")).rows] == [1, 3]


def test_csv_row_with_extra_cells_is_a_problem(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\na,0\nb,1,extra\n")
    with pytest.raises(DataValidationError, match=r"d.csv:3: line: 1 more cell"):
        read_labelled(str(csv))
    csv.write_text("text,label\n")
    with pytest.raises(DataValidationError, match=r"d.csv: file: holds no records"):
        read_labelled(str(csv))


def test_triplet_loss_needs_two_examples_per_label(tmp_path):
    data = read_labelled(_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1},
                                                       {"text": "c", "label": 0}]))
    with pytest.raises(DataValidationError, match=r"d.jsonl:2: label: label 1 has only this example"):
        check_triplet_labels(data, "label", "batch_all_triplet")


def test_pairs_stay_within_a_label_and_are_capped():
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(40)]
    pairs = to_pairs(rows, max_pairs_per_label=30, seed=3)
    assert len(pairs) == 60
    assert all(int(p["anchor"][1:]) % 2 == int(p["positive"][1:]) % 2 for p in pairs)
    assert pairs == to_pairs(rows, max_pairs_per_label=30, seed=3)


def test_data_problems_come_before_the_model_loads(tmp_path, tiny_encoder):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 0},
                                         {"text": "c", "label": 1}])
    with pytest.raises(DataValidationError, match="d.jsonl:3: label: label 1 has only this example"):
        embedding_sft(str(tiny_encoder), path, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ end to end


def _held_out_scores(model_path, rows) -> dict:
    from sentence_transformers import SentenceTransformer

    from training_hub.backends.sentence_transformers import label_metrics

    model = SentenceTransformer(str(model_path))
    return label_metrics(model.encode([r["text"] for r in rows], convert_to_tensor=True), [r["label"] for r in rows])


@pytest.mark.slow
def test_triplet_training_separates_held_out_labels(tmp_path, tiny_encoder, one_thread):
    from training_hub import TrainingHubCallback

    class Events(TrainingHubCallback):
        def __init__(self):
            self.seen = []

        def on_epoch_end(self, ctx):
            self.seen.append(("epoch", ctx.algorithm, ctx.backend))

        def on_evaluate(self, ctx, metrics):
            self.seen.append(("evaluate", metrics["labels_nn_accuracy"]))

        def on_train_end(self, ctx, result):
            self.seen.append(("end", result["model_path"]))

    train = _jsonl(tmp_path / "train.jsonl", labelled_texts(12, seed=1))
    held = labelled_texts(10, seed=2)
    before = _held_out_scores(tiny_encoder, held)
    events = Events()
    out = tmp_path / "out"
    result = embedding_sft(str(tiny_encoder), train, str(out), num_epochs=6, batch_size=16, learning_rate=3e-3,
                           warmup_ratio=0.0, eval_data_path=_jsonl(tmp_path / "eval.jsonl", held),
                           disable_progress_bar=True, callbacks=[events])
    assert {k: result[k] for k in ("status", "model_path", "num_samples", "num_epochs", "loss")} == {
        "status": "success", "model_path": str(out), "num_samples": 48, "num_epochs": 6, "loss": "batch_all_triplet"}
    after = _held_out_scores(out, held)  # the saved model loads with SentenceTransformer(ckpt_output_dir)
    assert after["same_label_similarity"] - after["different_label_similarity"] > 0.05
    assert after["similarity_gap"] > before["similarity_gap"] + 0.05
    assert after["nn_accuracy"] >= before["nn_accuracy"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 19))
    evaluations = [r for r in records if r["type"] == "validation"]
    assert len(evaluations) == 6 and evaluations[-1]["labels_nn_accuracy"] == pytest.approx(after["nn_accuracy"])
    assert events.seen.count(("epoch", "embedding_sft", "sentence-transformers")) == 6
    assert [e[0] for e in events.seen].count("evaluate") == 6 and events.seen[-1] == ("end", str(out))
    assert json.loads((out / "training_metrics.jsonl").read_text())["loss"] == "batch_all_triplet"


@pytest.mark.slow
def test_a_loss_fn_built_on_the_callers_model_trains_the_saved_model(tmp_path, tiny_encoder, one_thread):
    import torch
    from sentence_transformers import SentenceTransformer

    from training_hub.backends.sentence_transformers import _st_module

    losses = _st_module("sentence_transformers.sentence_transformer.losses", "sentence_transformers.losses")
    loss = losses.MatryoshkaLoss(SentenceTransformer(str(tiny_encoder)),  # nested: the inner loss holds it too
                                 losses.BatchSemiHardTripletLoss(SentenceTransformer(str(tiny_encoder))), [64, 32])
    train = _jsonl(tmp_path / "train.jsonl", [{**r, "source": "synthetic"} for r in labelled_texts(4, seed=5)])
    out = tmp_path / "out"
    result = embedding_sft(str(tiny_encoder), train, str(out), loss_fn=loss, num_epochs=1, batch_size=16,
                           learning_rate=1e-2, warmup_ratio=0.0, disable_progress_bar=True)
    assert result["loss"] == "custom (MatryoshkaLoss)" and result["num_samples"] == 16
    before = SentenceTransformer(str(tiny_encoder)).encode(["a refund"], convert_to_tensor=True)
    after = SentenceTransformer(str(out)).encode(["a refund"], convert_to_tensor=True)
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.slow
def test_mnrl_from_a_plain_decoder_directory(tmp_path, one_thread):
    decoder = make_tiny_model(tmp_path / "qwen", hidden_size=32, num_layers=1)
    csv = tmp_path / "train.csv"  # class names, numbered in sorted order
    rows = labelled_texts(6, num_labels=3, seed=4)
    names = ["billing", "tech", "travel"]
    csv.write_text("text,label\n" + "".join(f"{r['text']},{names[r['label']]}\n" for r in rows))
    out = tmp_path / "out"
    result = embedding_sft(str(decoder), str(csv), str(out), loss_type="mnrl", num_epochs=1, batch_size=8,
                           learning_rate=1e-3, disable_progress_bar=True)
    assert result["num_samples"] == 3 * 15 and result["loss"] == "mnrl"  # 6 texts per label give 15 pairs
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(out))
    assert model.encode(["a refund please", "hello"]).shape == (2, 32)
    assert model.tokenizer.pad_token is not None
