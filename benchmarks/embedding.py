"""Embedding fine-tuning benchmark: does ``embedding_sft()`` make held-out texts of the same label neighbours?

1. Model: a tiny random BERT encoder with its own WordPiece tokenizer (``make_tiny_model(arch="bert")``), loaded by
   sentence-transformers as a plain Hugging Face directory (mean pooling added).
2. Data (``training_hub.tiny.labelled_texts``): synthetic requests of 4 topics, each text ``--topic-words`` words
   of its topic among ``--filler-words`` words shared by every topic, shuffled. Training and held-out texts are
   drawn with different seeds.
3. Per loss (batch_all_triplet, batch_hard_triplet, mnrl) and seed: train, then score the held-out texts with the
   saved model (``SentenceTransformer(ckpt_output_dir)``): the share whose nearest other held-out text (cosine) has
   the same label, and the mean cosine similarity of same-label and of different-label pairs
   (``backends.sentence_transformers.label_metrics``). "before" is the untrained encoder.

    .venv/bin/python benchmarks/embedding.py --json benchmarks/results/embedding.json   # ~2 min, 2 shared cores
    .venv/bin/python benchmarks/embedding.py --seeds 0 --losses mnrl --epochs 2

Prints a table and one machine-readable line ``EMBEDDING {...}``; ``--json PATH`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

LOSSES = ("batch_all_triplet", "batch_hard_triplet", "mnrl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--seeds", default="0,1,2", help="training seeds (data and model init follow them)")
    p.add_argument("--per-label", type=int, default=24, help="training texts per label")
    p.add_argument("--held-out", type=int, default=25, help="held-out texts per label")
    p.add_argument("--topic-words", type=int, default=2)
    p.add_argument("--filler-words", type=int, default=6)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the result here")
    return p.parse_args(argv)


def score(model_path, rows) -> dict:
    from sentence_transformers import SentenceTransformer

    from training_hub.backends.sentence_transformers import label_metrics

    model = SentenceTransformer(str(model_path))
    embeddings = model.encode([r["text"] for r in rows], convert_to_tensor=True, show_progress_bar=False)
    return label_metrics(embeddings, [r["label"] for r in rows])


def run_one(args, work: Path, loss: str, seed: int) -> dict:
    from training_hub import embedding_sft
    from training_hub.tiny import labelled_texts, make_tiny_model

    model = make_tiny_model(work / f"bert-{seed}", arch="bert", hidden_size=args.hidden_size,
                            num_layers=args.layers, seed=seed, overwrite=True)
    texts = dict(topic_words=args.topic_words, filler_words=args.filler_words)
    train = labelled_texts(args.per_label, seed=1000 + seed, **texts)
    held = labelled_texts(args.held_out, seed=2000 + seed, **texts)
    data = work / f"train-{seed}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    before = score(model, held)
    start = time.perf_counter()
    out = work / f"out-{loss}-{seed}"
    result = embedding_sft(str(model), str(data), str(out), loss_type=loss, num_epochs=args.epochs,
                           batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_ratio=0.0,
                           seed=seed, disable_progress_bar=True)
    seconds = time.perf_counter() - start
    after = score(result["model_path"], held)
    return {"loss": loss, "seed": seed, "before": before, "after": after, "train_seconds": round(seconds, 2),
            "steps": result.metrics["steps"], "num_samples": result["num_samples"]}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for loss in dict.fromkeys(r["loss"] for r in runs):
        mine = [r for r in runs if r["loss"] == loss]
        row = {}
        for when in ("before", "after"):
            for key in ("nn_accuracy", "same_label_similarity", "different_label_similarity", "similarity_gap"):
                row[f"{when}_{key}"] = round(statistics.mean(r[when][key] for r in mine), 4)
        row["train_seconds"] = round(statistics.mean(r["train_seconds"] for r in mine), 2)
        row["steps"] = mine[0]["steps"]
        out[loss] = row
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRAINING_HUB_LOG_LEVEL", "WARNING")
    import torch

    torch.set_num_threads(args.threads)
    losses = [x for x in args.losses.split(",") if x]
    seeds = [int(x) for x in args.seeds.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="embedding-bench-") as tmp:
        runs = [run_one(args, Path(tmp), loss, seed) for loss in losses for seed in seeds]
    summary = summarise(runs)
    print(f"\nheld-out nearest-neighbour label accuracy and cosine similarity, mean of {len(seeds)} seed(s); "
          f"{4 * args.per_label} training / {4 * args.held_out} held-out texts, 4 labels (chance: 0.25)")
    print(f"{'loss':<20} {'steps':>5} {'nn acc before':>13} {'after':>6} {'same-diff before':>16} {'after':>6} "
          f"{'same / diff after':>17} {'train s':>7}")
    for loss, row in summary.items():
        print(f"{loss:<20} {row['steps']:>5} {row['before_nn_accuracy']:>13.3f} {row['after_nn_accuracy']:>6.3f} "
              f"{row['before_similarity_gap']:>16.3f} {row['after_similarity_gap']:>6.3f} "
              f"{row['after_same_label_similarity']:>8.3f} / {row['after_different_label_similarity']:.3f} "
              f"{row['train_seconds']:>7.1f}")
    record = {"settings": vars(args), "summary": summary, "runs": runs}
    print("EMBEDDING " + json.dumps({"settings": vars(args), "summary": summary}))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
