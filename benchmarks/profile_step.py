"""Where one training micro-batch of our engine goes: torch.profiler over forward, backward and the AdamW step.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --size 100m              # eager
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --size 100m --compile    # torch_compile's layers
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --size 100m --matmuls    # the model's matmul shapes alone

The model is ``sft_throughput``'s (``--size``), loaded and set up as the engine does (per-sample attention after
its self-check; with ``--compile``, ``engine.compile.use_compiled_layers``). One packed row of random samples of
40-300 tokens up to ``--tokens``, bf16 autocast, one warm-up micro-batch before the profiled one. ``--matmuls``
instead times, in bf16 on as many rows, each decoder-layer projection's forward, input-gradient and
weight-gradient matmul alone (best of 5, process CPU time).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from sft_throughput import SIZES, tokenizer_corpus


def packed_row(vocab: int, tokens: int, rng: random.Random) -> dict:
    from training_hub.engine.batching import pack

    samples, total = [], 0
    while True:
        length = rng.randint(40, 300)
        if total + length > tokens:
            return pack(samples, samples, device="cpu")
        samples.append([rng.randrange(vocab) for _ in range(length)])
        total += length


def matmul_rates(model, rows: int) -> None:
    """GFLOP/s of each distinct (in, out) projection shape of the model's first layer, alone."""
    def best(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        return min(times)

    layer = model.model.layers[0]
    shapes = sorted({(m.in_features, m.out_features) for m in layer.modules() if isinstance(m, torch.nn.Linear)})
    for d_in, d_out in shapes:
        x, w, g = (torch.randn(*shape).bfloat16() for shape in ((rows, d_in), (d_out, d_in), (rows, d_out)))
        flops = 2 * rows * d_in * d_out / 1e9
        rates = {name: flops / best(fn) for name, fn in (("forward x@W.T", lambda: x @ w.t()),
                                                           ("input grad g@W", lambda: g @ w),
                                                           ("weight grad g.T@x", lambda: g.t() @ x))}
        print(f"{d_in:>5} -> {d_out:<5}" + "".join(f"  {name} {rate:6.0f} GFLOP/s" for name, rate in rates.items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="100m")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the packed micro-batch")
    parser.add_argument("--compile", action="store_true", help="compile the decoder layers (torch_compile)")
    parser.add_argument("--matmuls", action="store_true", help="time the model's matmul shapes alone instead")
    parser.add_argument("--rows", type=int, default=28, help="rows of the profile table")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from training_hub.engine.attention import use_packed_attention
    from training_hub.engine.compile import use_compiled_layers
    from training_hub.engine.loss import token_loss_sum
    from training_hub.tiny import make_tiny_model

    size = SIZES[args.size]
    model_dir = make_tiny_model(Path(tempfile.mkdtemp(prefix="profile-step-")) / "model",
                                corpus=tokenizer_corpus(args.size, size["vocab_size"]), **size)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if args.matmuls:
        return matmul_rates(model, args.tokens)
    print(use_packed_attention(model).description)
    model.train()
    if args.compile:
        print(use_compiled_layers(model, torch.bfloat16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    rng = random.Random(0)

    def step(row):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = token_loss_sum(model, row)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(packed_row(model.config.vocab_size, args.tokens, rng))
    row = packed_row(model.config.vocab_size, args.tokens, rng)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step(row)
    print(f"{row['input_ids'].shape[1]} tokens, {len(row['sample_bounds']) - 1} samples, "
          f"{torch.get_num_threads()} threads, {'compiled' if args.compile else 'eager'}")
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
