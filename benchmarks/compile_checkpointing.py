"""torch_compile with and without activation checkpointing: CPU time and peak memory of one training micro-batch.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/compile_checkpointing.py [--size default] [--rows 10]

Four copies of ``sft_throughput``'s model (``--size``), set up as the engine does: eager or compiled
(``engine.compile.use_compiled_layers``), with or without ``engine.model.enable_checkpointing``. Packed rows of
random samples of 40-300 tokens up to ``--tokens`` run forward and backward (bf16 autocast, no optimizer) through
each copy in turn, so that load from other processes falls on all four alike; process CPU time per micro-batch
(median, first row left out as warm-up). Then each copy's peak allocated bytes over one more micro-batch
(``engine.ledger.allocated_peak``) and its saved activations as the run's ledger counts them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from profile_step import packed_row
from sft_throughput import SIZES, tokenizer_corpus


def arms(model_dir) -> dict:
    from transformers import AutoModelForCausalLM

    from training_hub.engine.attention import use_packed_attention
    from training_hub.engine.compile import use_compiled_layers
    from training_hub.engine.model import enable_checkpointing

    out = {}
    for checkpointing in (False, True):
        for compiled in (False, True):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
            use_packed_attention(model)
            model.train()
            if checkpointing:
                enable_checkpointing(model)
            if compiled and not use_compiled_layers(model, torch.bfloat16):
                raise SystemExit("the compiled model failed its self-check")
            out[("compiled" if compiled else "eager") + (", checkpointed" if checkpointing else "")] = model
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of a packed micro-batch")
    parser.add_argument("--rows", type=int, default=10, help="micro-batches timed per copy (plus one warm-up)")
    args = parser.parse_args(argv)

    from training_hub.engine.compile import recompiles
    from training_hub.engine.ledger import SavedTensorMeter, allocated_peak
    from training_hub.engine.loss import token_loss_sum
    from training_hub.tiny import make_tiny_model

    size = SIZES[args.size]
    model_dir = make_tiny_model(Path(tempfile.mkdtemp(prefix="compile-ckpt-")) / "model",
                                corpus=tokenizer_corpus(args.size, size["vocab_size"]), **size)
    models = arms(model_dir)
    vocab = next(iter(models.values())).config.vocab_size
    rng = random.Random(0)
    rows = [packed_row(vocab, args.tokens, rng) for _ in range(args.rows + 1)]

    def micro_batch(model, row):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = token_loss_sum(model, row)
        loss.backward()
        model.zero_grad(set_to_none=True)

    times = {name: [] for name in models}
    for k, row in enumerate(rows):
        for name, model in models.items():
            start = time.process_time()
            micro_batch(model, row)
            if k:
                times[name].append(time.process_time() - start)
    print(f"{args.size}, {len(rows) - 1} rows of ~{args.tokens} tokens, {torch.get_num_threads()} threads, "
          f"{recompiles()} graphs compiled")
    for name, model in models.items():
        meter = SavedTensorMeter(model)
        with meter.watch():
            micro_batch(model, rows[0])
        peak = allocated_peak(lambda: micro_batch(model, rows[0]))
        print(f"{name:24s} CPU s/micro-batch median {statistics.median(times[name]):.3f} "
              f"(min {min(times[name]):.3f}); peak allocated {peak / 2**20:.1f} MiB; "
              f"ledger activations {meter.peak / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
