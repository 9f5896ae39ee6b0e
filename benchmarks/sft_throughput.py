"""Throughput of our native `sft` against TRL's `SFTTrainer`, same model, data, batch and token budget.

    python benchmarks/sft_throughput.py                      # 12.5M-parameter tiny Qwen2, both comparisons
    python benchmarks/sft_throughput.py --size 100m --steps 3  # 110M-parameter Qwen2 (slow on 2 CPU cores)
    python benchmarks/sft_throughput.py --quick              # 3 short steps and short peak measurements
    python benchmarks/sft_throughput.py --skip-trl --compile # ours eager, then ours with torch_compile=True

One run makes two comparisons, each in the same process, one trainer after the other:

* **defaults**: each trainer as it comes. Ours: ``sft()`` with no ``gradient_checkpointing`` and the dtype of
  ``--ours-dtype``, which defaults to what ``engine.precision.autocast_dtype("auto", device, hidden_size)``
  picks (bf16 on CUDA, and on CPUs with AMX/AVX512-BF16 for models at least 512 wide), passed explicitly so
  that the figure shows which dtype ours used (``--ours-dtype auto`` leaves it to ``sft()``).
  TRL: ``SFTConfig`` defaults (bf16 autocast unless fp16, gradient checkpointing on, padded micro-batches of
  ``per_device_train_batch_size=8`` samples), apart from what must match: the effective batch (through
  gradient accumulation), steps, learning rate and schedule, and loss on assistant tokens only.
* **equal**: the same precision (``--equal-dtype``, default the one "auto" picks), padding-free micro-batches on
  both sides (TRL: ``padding_free=True``, one packed row per micro-batch with restarting position ids, like ours), no
  activation checkpointing on either side, SDPA. TRL's micro-batch size in samples is chosen so that its
  micro-batches hold about the same number of tokens as our ``max_tokens_per_gpu`` budget. When ours at its
  defaults already uses these settings, the one run of ours serves both comparisons.

Both trainers get the same model (``make_tiny_model`` with bigger sizes, fp32 master weights), the same
synthetic chat data (loss on assistant turns only), the same samples per optimizer step and the same number of
optimizer steps.

Model-FLOPs utilisation is ``6 * parameters * tokens_per_second / peak``, where the peak is the best rate of
``torch.matmul`` on large square matrices **of the dtype the trainer computes in** (fp32, or bf16 for bf16
autocast), both measured in the same run (before, between and after the training runs).
The last line printed is machine-readable JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

WORDS = ("the quick brown fox jumps over lazy dog small model can learn short answers to simple questions but it "
         "needs clean data and steady learning rate training language means showing text asking predict next "
         "token again until loss goes down once upon time there was little village by river every morning baker "
         "opened his shop children walked school farmers went out their fields evening people met square talk "
         "about weather harvest news from city please write summary following explain reasoning step final "
         "answer if you are not sure say so here example sum two three five ten minus four six numbers").split()


def synthetic_chats(n: int, seed: int, mean_words: int) -> list[dict]:
    """``n`` chats of one or two user/assistant turns with random prose of varied length."""
    rng = random.Random(seed)

    def prose() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(mean_words // 2, mean_words * 3 // 2))) + "."

    chats = []
    for _ in range(n):
        messages = []
        for _ in range(rng.choice((1, 2))):
            messages += [{"role": "user", "content": prose()}, {"role": "assistant", "content": prose()}]
        chats.append({"messages": messages})
    return chats


SIZES = {  # --size: make_tiny_model arguments
    "default": dict(hidden_size=512, num_layers=3, num_heads=8, num_kv_heads=4, vocab_size=4096),
    # 110M parameters with the 8,192-token vocabulary (GPT-2-small widths, Qwen2 layout, 4 KV heads)
    "100m": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, vocab_size=8192),
}


def tokenizer_corpus(size: str, vocab_size: int, seed: int = 0):
    """None (make_tiny_model's own corpus, which supports ~1,280 tokens) for the default size, as in earlier
    runs; for bigger sizes the chats' words plus random letter strings, enough for ``vocab_size`` BPE tokens, so
    that the output layer has a realistic width (the chats themselves still tokenize into the common words)."""
    if size == "default":
        return None
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    junk = [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(64))
            for _ in range(vocab_size // 4)]
    return [" ".join(WORDS)] * 8 + junk


def matmul_peak(dtype=torch.float32, seconds_per_size: float = 1.0, sizes=(1024, 1536, 2048, 3072, 4096)
                ) -> float:
    """Best ``torch.matmul`` rate (FLOP/s) in ``dtype`` on large square matrices, on the device the trainers use.

    The best single multiplication over a few sizes: on a shared machine, the least disturbed moment counts,
    which makes the utilisation figures conservative. (On a 2-core AMX CPU bf16 peaks at 1536-2048: larger
    matrices fall out of the caches and run at less than half that rate; fp32 is flat.)
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        torch.matmul(a, b)
        end = time.perf_counter() + seconds_per_size
        while time.perf_counter() < end:
            sync()
            t0 = time.perf_counter()
            torch.matmul(a, b)
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def run_ours(model_dir: Path, data: Path, out: Path, args, dtype: str, compile: bool = False) -> dict:
    """``sft()`` without gradient checkpointing; ``dtype`` "auto" is not passed at all (sft()'s own choice);
    ``compile``: with ``torch_compile=True`` (compiling happens before the timed loop; ``wall_seconds``, the whole
    ``sft()`` call, includes it)."""
    from training_hub import sft

    extra = {} if dtype == "auto" else {"dtype": dtype}
    if compile:
        extra["torch_compile"] = True
    wall = time.perf_counter()
    sft(model_path=str(model_dir), data_path=str(data), ckpt_output_dir=str(out),
        max_seq_len=args.max_seq_len, max_tokens_per_gpu=args.max_tokens_per_gpu,
        effective_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-4,
        lr_scheduler="constant", save_final_checkpoint=False, disable_progress_bar=True, **extra)
    wall = time.perf_counter() - wall
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r.get("type", "train") == "train" and "tokens" in r]
    tokens = sum(r["tokens"] for r in records)
    seconds = records[-1]["elapsed"]  # from the start of the loop to the end of the last step
    return {"dtype": dtype, "gradient_checkpointing": False, "batches": "packed", "tokens": tokens,
            "seconds": seconds, "tokens_per_second": tokens / seconds,
            "mean_loss": sum(r["loss"] for r in records) / len(records), "steps": len(records),
            "torch_compile": compile, "wall_seconds": wall}


def run_trl(model_dir: Path, chats: list[dict], out: Path, args, mean_tokens: float, defaults: bool) -> dict:
    """TRL's SFTTrainer at its defaults (``defaults=True``) or with the equal settings (see the module doc)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    if defaults:
        micro = min(args.batch, 8)  # SFTConfig's per_device_train_batch_size
        settings = {}  # bf16, gradient_checkpointing, padding_free, max_length: TRL's defaults
    else:
        micro = max(1, min(args.batch, int(args.max_tokens_per_gpu // mean_tokens)))
        settings = dict(max_length=None, padding_free=True, gradient_checkpointing=False,  # all samples fit
                        bf16=args.equal_dtype == "bfloat16", fp16=False)
    while args.batch % micro:
        micro -= 1
    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            clock["end"] = time.perf_counter()

    config = SFTConfig(
        output_dir=str(out), assistant_only_loss=True,
        per_device_train_batch_size=micro, gradient_accumulation_steps=args.batch // micro, max_steps=args.steps,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, use_cpu=not torch.cuda.is_available(),
        report_to="none", save_strategy="no", logging_steps=max(args.steps, 1),
        dataloader_num_workers=0, disable_tqdm=True, seed=42, **settings)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(chats),
                         processing_class=tokenizer, callbacks=[Clock()])
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"][:args.steps * args.batch])
    out_metrics = trainer.train().metrics
    seconds = clock["end"] - clock["start"]
    return {"dtype": "bfloat16" if config.bf16 else "float32",
            "gradient_checkpointing": bool(config.gradient_checkpointing),
            "batches": "padding-free" if config.padding_free else "padded", "tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds, "mean_loss": out_metrics.get("train_loss"), "steps": args.steps,
            "micro_batch_samples": micro}


def main(argv=None) -> dict:
    from training_hub.engine.precision import autocast_dtype, cpu_has_native_bf16

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default",
                        help="model size: default 12.5M parameters, 100m 110M (overridden by the three below)")
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--vocab-size", type=int)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per trainer")
    parser.add_argument("--batch", type=int, default=32, help="samples per optimizer step (effective batch)")
    parser.add_argument("--max-tokens-per-gpu", type=int, default=4096, help="token budget of one micro-batch")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--mean-words", type=int, default=40, help="mean words per message of the synthetic chats")
    parser.add_argument("--ours-dtype", choices=("auto", "bfloat16", "float32"),
                        help="dtype passed to our sft() in the defaults comparison (default: what "
                             "precision.autocast_dtype('auto') picks for this device and model width; 'auto' passes "
                             "none)")
    parser.add_argument("--equal-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="precision of both trainers in the equal-settings comparison (default: what "
                             "precision.autocast_dtype('auto') picks, bf16 where the hardware does it natively)")
    parser.add_argument("--peak-seconds", type=float, default=1.0, help="seconds per matrix size and dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="3 steps of 16 samples, short peak measurements")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--only", choices=("defaults", "equal"), help="run one comparison only")
    parser.add_argument("--compile", action="store_true",
                        help="also run ours with torch_compile=True (the dtype of the defaults comparison), after "
                             "ours at its defaults, and report compiled / eager")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.peak_seconds = min(args.steps, 3), min(args.batch, 16), 0.3
    size = {**SIZES[args.size], **{k: v for k, v in (("hidden_size", args.hidden_size),
                                                     ("num_layers", args.num_layers),
                                                     ("vocab_size", args.vocab_size)) if v}}
    auto = "bfloat16" if autocast_dtype("auto", torch.device(device_type),
                                        hidden_size=size["hidden_size"]) is torch.bfloat16 else "float32"
    args.ours_dtype = args.ours_dtype or auto
    if args.equal_dtype == "auto":
        args.equal_dtype = auto
    # Without bf16 instructions (an AVX2-only CPU) torch emulates bf16 matmuls, tens of times slower than fp32:
    # measure that peak on small matrices only (a 4096 square would take minutes), and say so.
    native_bf16 = device_type == "cuda" or cpu_has_native_bf16()

    from transformers import AutoConfig, AutoTokenizer

    from training_hub.tiny import make_tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    model_dir = make_tiny_model(work / "model", corpus=tokenizer_corpus(args.size, size["vocab_size"]), **size)
    model_config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_config(
            model_config).parameters())
    chats = synthetic_chats(args.steps * args.batch, seed=0, mean_words=args.mean_words)
    data = work / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    mean_tokens = sum(len(tokenizer.apply_chat_template(c["messages"], return_dict=True)["input_ids"])
                      for c in chats) / len(chats)

    peaks = {"float32": [], "bfloat16": []}  # measured before, between and after the runs; the best is the peak

    def measure_peaks():
        peaks["float32"].append(matmul_peak(torch.float32, args.peak_seconds))
        peaks["bfloat16"].append(matmul_peak(torch.bfloat16, args.peak_seconds) if native_bf16 else
                                 matmul_peak(torch.bfloat16, min(args.peak_seconds, 0.5), sizes=(256, 512)))

    ours_equal_dtype = auto if args.ours_dtype == "auto" else args.ours_dtype  # what "auto" should give
    plan = []  # (comparison, trainer, thunk)
    if args.only != "equal":
        plan.append(("defaults", "ours", lambda: run_ours(model_dir, data, work / "ours-defaults", args,
                                                          args.ours_dtype)))
        if not args.skip_trl:
            plan.append(("defaults", "trl", lambda: run_trl(model_dir, chats, work / "trl-defaults", args,
                                                            mean_tokens, defaults=True)))
    if args.only != "defaults":
        if args.only == "equal" or ours_equal_dtype != args.equal_dtype or args.ours_dtype == "auto":
            plan.append(("equal", "ours", lambda: run_ours(model_dir, data, work / "ours-equal", args,
                                                           args.equal_dtype)))
        if not args.skip_trl:
            plan.append(("equal", "trl", lambda: run_trl(model_dir, chats, work / "trl-equal", args, mean_tokens,
                                                         defaults=False)))
    if args.compile:
        plan.append(("compiled", "ours", lambda: run_ours(model_dir, data, work / "ours-compiled", args,
                                                          args.ours_dtype, compile=True)))
    results = {"defaults": {}, "equal": {}, "compiled": {}}
    measure_peaks()
    for comparison, trainer, thunk in plan:
        results[comparison][trainer] = thunk()
        measure_peaks()
    if args.only != "defaults" and "ours" not in results["equal"]:
        results["equal"]["ours"] = {**results["defaults"]["ours"], "same_run_as": "defaults"}
    peak = {name: max(values) for name, values in peaks.items()}

    device = "cuda" if device_type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    for r in (r for c in results.values() for r in c.values()):
        used = auto if r["dtype"] == "auto" else r["dtype"]
        r["mfu"] = 6 * params * r["tokens_per_second"] / peak[used]
        r["mfu_of"] = f"{used} peak"
    print(f"\nSFT throughput, {params / 1e6:.1f}M-parameter Qwen2 (hidden {size['hidden_size']}, "
          f"{size['num_layers']} layers, vocabulary {model_config.vocab_size}), {device}; {args.steps} steps x "
          f"{args.batch} samples, mean {mean_tokens:.0f} tokens/sample, micro-batch budget "
          f"{args.max_tokens_per_gpu} tokens")
    print(f"matmul peaks in this run: fp32 {peak['float32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bfloat16'] / 1e9:.0f} "
          f"GFLOP/s; MFU is against the peak of the dtype each trainer computes in")
    if not native_bf16:
        print("this CPU has no native bf16 (no AMX-BF16 or AVX512-BF16): torch emulates bf16 matmuls, so a trainer "
              "in bf16 autocast runs far below fp32 here (our dtype='auto' picks fp32; TRL's SFTConfig defaults to "
              "bf16)")
    print(f"ours at defaults used dtype={args.ours_dtype!r}"
          + (" (not passed: sft()'s own choice)" if args.ours_dtype == "auto" else
             f" (passed explicitly; precision.autocast_dtype('auto') gives {auto} on this {device_type})"))
    print(f"{'comparison':<11}{'trainer':<22}{'dtype':<10}{'ckpt':<6}{'batches':<14}{'tokens':>8}{'seconds':>9}"
          f"{'tokens/s':>10}{'MFU':>8}")
    ratios = {}
    for comparison, pair in results.items():
        for trainer, name in (("ours", "training_hub native"), ("trl", "TRL SFTTrainer")):
            r = pair.get(trainer)
            if r:
                note = " (same run)" if r.get("same_run_as") else ""
                print(f"{comparison:<11}{name:<22}{r['dtype']:<10}{'yes' if r['gradient_checkpointing'] else 'no':<6}"
                      f"{r['batches']:<14}{r['tokens']:>8}{r['seconds']:>9.2f}{r['tokens_per_second']:>10.0f}"
                      f"{100 * r['mfu']:>7.1f}%{note}")
        if "ours" in pair and "trl" in pair:
            ratios[comparison] = pair["ours"]["tokens_per_second"] / pair["trl"]["tokens_per_second"]
    for comparison, ratio in ratios.items():
        print(f"ours / TRL, {comparison}: {ratio:.2f}x")
    if "ours" in results["compiled"] and "ours" in results["defaults"]:
        eager, comp = results["defaults"]["ours"], results["compiled"]["ours"]
        ratios["compiled_vs_eager"] = comp["tokens_per_second"] / eager["tokens_per_second"]
        print(f"ours torch_compile=True / eager: {ratios['compiled_vs_eager']:.2f}x in the training loop; whole sft() "
              f"call (loading, compiling) {comp['wall_seconds']:.0f} s vs {eager['wall_seconds']:.0f} s")
    summary = {"benchmark": "sft_throughput", "size": args.size, "params": params,
               "vocab_size": model_config.vocab_size, "device": device, "steps": args.steps, "batch": args.batch,
               "max_tokens_per_gpu": args.max_tokens_per_gpu, "mean_tokens_per_sample": round(mean_tokens, 1),
               "ours_dtype": args.ours_dtype, "auto_dtype": auto, "native_bf16": native_bf16,
               "equal_dtype": args.equal_dtype,
               "matmul_peak_flops": peak, "matmul_peaks": peaks,
               "load_average_1m_after": round(__import__("os").getloadavg()[0], 2),
               "defaults": results["defaults"], "equal": results["equal"], "compiled": results["compiled"],
               "ratios": ratios}
    print(json.dumps(summary))
    shutil.rmtree(work, ignore_errors=True)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
