"""Data-processing throughput: our pipeline (validation + exact loss masks + length policy) against a plain
``datasets.map`` that calls ``tokenizer.apply_chat_template`` (no masks, no validation), in the same run.

    .venv/bin/python benchmarks/data_processing.py              # 50,000 synthetic chat samples
    .venv/bin/python benchmarks/data_processing.py --samples 5000 --tokenizer path/to/model

Prints a human table and one machine-readable line starting with ``BENCH_JSON``. Without ``--tokenizer`` the
tokenizer of ``training_hub.tiny.make_tiny_model`` (byte-level BPE, ChatML) is built offline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the of and to in is was for on that with as by at from this be have are not or it an which one you "
         "all were her she there would their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much "
         "your way well down should because each just those people how too little state good very make world "
         "model data train loss token answer question reason step number value table river city 42 2024 3.14"
         ).split()


def _text(rng: random.Random, low: int, high: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(low, high))
    return " ".join(words).capitalize() + rng.choice([".", "?", "!", "."])


def synthetic_chat(path: Path, samples: int, seed: int = 0) -> None:
    """50% single turn with a system prompt, 30% single turn without, 20% multi-turn (2-3 exchanges)."""
    rng = random.Random(seed)
    systems = [_text(rng, 8, 30) for _ in range(20)]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(samples):
            kind = rng.random()
            messages = [{"role": "system", "content": rng.choice(systems)}] if kind < 0.5 else []
            for _ in range(1 if kind < 0.8 else rng.randint(2, 3)):
                messages.append({"role": "user", "content": _text(rng, 5, 60)})
                messages.append({"role": "assistant", "content": _text(rng, 10, 150)})
            f.write(json.dumps({"messages": messages}) + "\n")


def run_baseline(path: Path, tokenizer, workdir: str) -> tuple[float, int]:
    """``load_dataset`` + batched ``map`` with ``apply_chat_template`` (token ids only)."""
    import datasets

    start, cpu = time.perf_counter(), time.process_time()
    source = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=workdir)

    def encode(batch):
        return {"input_ids": tokenizer.apply_chat_template(batch["messages"], tokenize=True, return_dict=False)}

    out = source.map(encode, batched=True, batch_size=1000, remove_columns=source.column_names,
                     load_from_cache_file=False, desc="baseline")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, cpu, sum(len(ids) for ids in out["input_ids"])


def run_ours(path: Path, tokenizer, cache_dir: str | None, num_proc: int | None = None):
    from training_hub.data import prepare_sft_data

    start, cpu = time.perf_counter(), time.process_time()
    prepared = prepare_sft_data(str(path), tokenizer, max_seq_len=8192, cache_dir=cache_dir, num_proc=num_proc)
    return time.perf_counter() - start, time.process_time() - cpu, prepared


def load_tokenizer(name: str | None, workdir: str):
    from transformers import AutoTokenizer

    if name is None:
        from training_hub.tiny import make_tiny_model

        name = str(make_tiny_model(Path(workdir) / "tiny"))
    return AutoTokenizer.from_pretrained(name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--tokenizer", default=None, help="model folder or hub name (default: tiny model)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the best is reported")
    parser.add_argument("--num-proc", type=int, default=None, help="also time ours with this many processes")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = load_tokenizer(args.tokenizer, workdir)
        path = Path(workdir) / "chat.jsonl"
        synthetic_chat(path, args.samples)
        base, ours, multi = [], [], []  # (wall seconds, CPU seconds of this process) per run
        for _ in range(args.repeats):  # alternate, so both see the same background load
            *timing, base_tokens = run_baseline(path, tokenizer, str(Path(workdir) / "hf"))
            base.append(timing)
            *timing, prepared = run_ours(path, tokenizer, None)
            ours.append(timing)
            if args.num_proc:
                multi.append(run_ours(path, tokenizer, None, num_proc=args.num_proc)[0])
        cache = str(Path(workdir) / "cache")
        cold_s = run_ours(path, tokenizer, cache)[0]
        hit_s, _, hit = run_ours(path, tokenizer, cache)
    n = args.samples
    base_s, ours_s = min(t[0] for t in base), min(t[0] for t in ours)
    base_cpu, ours_cpu = min(t[1] for t in base), min(t[1] for t in ours)
    summary = prepared.summary
    result = {
        "benchmark": "data_processing", "samples": n, "tokenizer": args.tokenizer or "tiny (ChatML BPE)",
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
        "repeats": args.repeats,
        "baseline_s": round(base_s, 2), "baseline_samples_per_s": round(n / base_s),
        "ours_s": round(ours_s, 2), "ours_samples_per_s": round(n / ours_s),
        "baseline_cpu_s": round(base_cpu, 2), "ours_cpu_s": round(ours_cpu, 2),
        "baseline_runs": [[round(w, 2), round(c, 2)] for w, c in base],
        "ours_runs": [[round(w, 2), round(c, 2)] for w, c in ours],
        "ours_cold_cache_s": round(cold_s, 2), "ours_cache_hit_s": round(hit_s, 2), "cache_hit": hit.from_cache,
        "speedup_vs_baseline": round(base_s / ours_s, 2), "cpu_ratio_baseline_over_ours": round(base_cpu / ours_cpu, 2),
        "tokens": summary.tokens, "baseline_tokens": base_tokens, "loss_tokens": summary.loss_tokens,
    }
    if multi:
        result.update(ours_num_proc=args.num_proc, ours_num_proc_s=round(min(multi), 2),
                      ours_num_proc_samples_per_s=round(n / min(multi)))
    print_table(result)
    print("BENCH_JSON " + json.dumps(result))
    return result


def print_table(r: dict) -> None:
    n = r["samples"]
    rows = [("baseline: load_dataset + map(apply_chat_template), ids only", r["baseline_s"], r["baseline_cpu_s"]),
            ("ours: validate + render + exact masks + length policy", r["ours_s"], r["ours_cpu_s"]),
            ("ours, first run writing the cache", r["ours_cold_cache_s"], None),
            ("ours, cache hit", r["ours_cache_hit_s"], None)]
    if "ours_num_proc" in r:
        rows.append((f"ours, num_proc={r['ours_num_proc']}", r["ours_num_proc_s"], None))
    print(f"\n{n:,} chat samples, tokenizer {r['tokenizer']}, {r['cpus']} CPUs (load {r['load_avg_1m']}), "
          f"best of {r['repeats']}")
    print(f"{'pipeline':<62}{'wall s':>8}{'samples/s':>11}{'CPU s':>8}")
    for name, seconds, cpu in rows:
        print(f"{name:<62}{seconds:>8.2f}{round(n / max(seconds, 1e-9)):>11,}{'' if cpu is None else f'{cpu:.2f}':>8}")
    print(f"ours / baseline speed: {r['speedup_vs_baseline']:.2f}x wall, {r['cpu_ratio_baseline_over_ours']:.2f}x CPU; "
          f"tokens {r['tokens']:,} (baseline {r['baseline_tokens']:,}), loss-bearing {r['loss_tokens']:,}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
