"""Throughput of our native `sft` against TRL's `SFTTrainer`, same model, data, batch and token budget.

    python benchmarks/sft_throughput.py                 # ~10M-parameter tiny Qwen2, fp32 on CPU (or CUDA)
    python benchmarks/sft_throughput.py --steps 4 --skip-trl   # a quick look at ours only

Both trainers get the same tiny model (``make_tiny_model`` with bigger sizes), the same synthetic chat data
(loss on assistant turns only), the same number of samples per optimizer step and the same number of
optimizer steps, with padding-free batches on both sides (TRL: ``padding_free=True``, which packs each
micro-batch into one row with restarting position ids, like ours), no gradient checkpointing on either side
(TRL's default would turn it on), SDPA attention. TRL's micro-batch size in samples is chosen so that its
micro-batches hold about the same number of tokens as our ``max_tokens_per_gpu`` budget.

Model-FLOPs utilisation is ``6 * parameters * tokens_per_second / peak``, where the peak is the best rate of
``torch.matmul`` on large square fp32 matrices measured in the same run (before, between and after the training runs).
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


def matmul_peak(seconds_per_size: float = 2.0, sizes=(2048, 3072, 4096)) -> float:
    """Best fp32 ``torch.matmul`` rate (FLOP/s) on large square matrices, on the device the trainers use.

    The best single multiplication over a few sizes: on a shared machine, the least disturbed moment counts,
    which makes the utilisation figures conservative.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        torch.matmul(a, b)
        end = time.perf_counter() + seconds_per_size
        while time.perf_counter() < end:
            sync()
            t0 = time.perf_counter()
            torch.matmul(a, b)
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def run_ours(model_dir: Path, data: Path, out: Path, args) -> dict:
    from training_hub import sft

    result = sft(model_path=str(model_dir), data_path=str(data), ckpt_output_dir=str(out),
                 max_seq_len=args.max_seq_len, max_tokens_per_gpu=args.max_tokens_per_gpu,
                 effective_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-4,
                 lr_scheduler="constant", save_final_checkpoint=False, disable_progress_bar=True, dtype="float32")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = sum(r["tokens"] for r in records)
    seconds = records[-1]["elapsed"]  # from the start of the loop to the end of the last step
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "mean_loss": sum(r["loss"] for r in records) / len(records), "steps": len(records)}


def run_trl(model_dir: Path, chats: list[dict], out: Path, args, mean_tokens: float) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    micro = max(1, min(args.batch, int(args.max_tokens_per_gpu // mean_tokens)))
    while args.batch % micro:
        micro -= 1
    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            clock["end"] = time.perf_counter()

    config = SFTConfig(
        output_dir=str(out), max_length=None, assistant_only_loss=True, padding_free=True,  # all samples fit
        per_device_train_batch_size=micro, gradient_accumulation_steps=args.batch // micro, max_steps=args.steps,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, use_cpu=not torch.cuda.is_available(), bf16=False,
        fp16=False, report_to="none", save_strategy="no", logging_steps=max(args.steps, 1),
        dataloader_num_workers=0, disable_tqdm=True, seed=42,
        gradient_checkpointing=False)  # TRL's default is True; ours is False: compare like with like
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(chats),
                         processing_class=tokenizer, callbacks=[Clock()])
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"][:args.steps * args.batch])
    out_metrics = trainer.train().metrics
    seconds = clock["end"] - clock["start"]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "mean_loss": out_metrics.get("train_loss"), "steps": args.steps, "micro_batch_samples": micro}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per trainer")
    parser.add_argument("--batch", type=int, default=32, help="samples per optimizer step (effective batch)")
    parser.add_argument("--max-tokens-per-gpu", type=int, default=4096, help="token budget of one micro-batch")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--mean-words", type=int, default=40, help="mean words per message of the synthetic chats")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from training_hub.tiny import make_tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    model_dir = make_tiny_model(work / "model", hidden_size=args.hidden_size, num_layers=args.num_layers,
                                num_heads=8, num_kv_heads=4, vocab_size=args.vocab_size)
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        model_dir).parameters())
    chats = synthetic_chats(args.steps * args.batch, seed=0, mean_words=args.mean_words)
    data = work / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    mean_tokens = sum(len(tokenizer.apply_chat_template(c["messages"], return_dict=True)["input_ids"])
                      for c in chats) / len(chats)

    peaks = [matmul_peak()]  # measured before, between and after the runs; the best one is the peak
    ours = run_ours(model_dir, data, work / "ours", args)
    peaks.append(matmul_peak())
    trl = None if args.skip_trl else run_trl(model_dir, chats, work / "trl", args, mean_tokens)
    peaks.append(matmul_peak())
    peak = max(peaks)

    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    mfu = lambda r: 6 * params * r["tokens_per_second"] / peak  # noqa: E731
    print(f"\nSFT throughput, {params / 1e6:.1f}M-parameter Qwen2 (hidden {args.hidden_size}, {args.num_layers} "
          f"layers), fp32, {device}; {args.steps} steps x {args.batch} samples, mean {mean_tokens:.0f} "
          f"tokens/sample, micro-batch budget {args.max_tokens_per_gpu} tokens; matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"{'trainer':<22}{'tokens':>9}{'seconds':>9}{'tokens/s':>10}{'MFU':>8}")
    for name, r in (("training_hub native", ours), ("TRL SFTTrainer", trl)):
        if r:
            print(f"{name:<22}{r['tokens']:>9}{r['seconds']:>9.2f}{r['tokens_per_second']:>10.0f}"
                  f"{100 * mfu(r):>7.1f}%")
    ratio = ours["tokens_per_second"] / trl["tokens_per_second"] if trl else None
    if ratio:
        print(f"ours / TRL: {ratio:.2f}x")
    summary = {"benchmark": "sft_throughput", "params": params, "device": device, "steps": args.steps,
               "load_average_1m_after": round(__import__("os").getloadavg()[0], 2),
               "batch": args.batch, "max_tokens_per_gpu": args.max_tokens_per_gpu,
               "mean_tokens_per_sample": round(mean_tokens, 1), "matmul_peak_flops": peak, "matmul_peaks": peaks,
               "ours": {**ours, "mfu": mfu(ours)}, "trl": trl and {**trl, "mfu": mfu(trl)}, "ratio": ratio}
    print(json.dumps(summary))
    shutil.rmtree(work, ignore_errors=True)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
