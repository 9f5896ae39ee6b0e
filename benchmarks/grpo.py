"""GRPO on arithmetic a tiny model half knows: native engine vs TRL's GRPOTrainer, in the same run.

1. The demo's tiny model (``training_hub.tiny``) is taught by ``sft()`` (``demo.py``'s settings, ``--sft-epochs``)
   on the demo data's "What is a plus b?" rows, ``--held-out`` of them removed.
2. ``grpo()`` then trains it on those held-out problems with an exact-answer reward (1.0 when the completion is
   the sum, e.g. "9."), once with ``backend="native"`` and once with ``backend="trl"``, same settings and seed.
3. Greedy accuracy on the held-out problems (and on the sums that are in no data at all) before and after each,
   reward per iteration, and tokens/s (prompt + completion tokens over generation and training time; TRL's from
   its own token count and train time).

    nice -n 19 .venv/bin/python benchmarks/grpo.py                  # 3-8 minutes on 2 shared CPU cores (load)
    nice -n 19 .venv/bin/python benchmarks/grpo.py --iterations 10   # quicker

Writes ``benchmarks/results/grpo.json`` and ``grpo.png`` (reward per iteration, both backends) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SUM = re.compile(r"What is (\d+) plus (\d+)\?")


def exact_answer(data_source, solution_str, ground_truth, **extra):
    """1.0 when the completion is exactly the sum followed by a full stop (the demo data's answer form)."""
    return 1.0 if solution_str.strip() == f"{ground_truth}." else 0.0


def split_demo_data(out: Path, held_out: int, seed: int) -> tuple[Path, list[dict], list[dict]]:
    """(SFT data: the demo's sums but the held-out ones, the held-out sums as GRPO rows, the sums in no data)."""
    from training_hub.tiny import demo_data_path

    lines = demo_data_path().read_text().splitlines()
    sums = [i for i, line in enumerate(lines) if SUM.search(json.loads(line)["messages"][0]["content"])]
    held = set(random.Random(seed).sample(sums, held_out))
    (out / "sft.jsonl").write_text("".join(lines[i] + "\n" for i in sums if i not in held))

    def row(a, b):
        return {"question": f"What is {a} plus {b}?", "ground_truth": str(a + b)}

    seen = {tuple(map(int, SUM.search(json.loads(lines[i])["messages"][0]["content"]).groups())) for i in sums}
    problems = [row(*map(int, SUM.search(json.loads(lines[i])["messages"][0]["content"]).groups()))
                for i in sorted(held)]
    unseen = [row(a, b) for a in range(10) for b in range(10) if (a, b) not in seen]
    return out / "sft.jsonl", problems, unseen


def accuracy(model_dir, rows: list[dict]) -> float:
    """Share of rows whose greedy answer (plain transformers) is exactly right."""
    from training_hub.demo import answer

    if not rows:
        return float("nan")
    answers = answer(model_dir, [[{"role": "user", "content": r["question"]}] for r in rows], max_new_tokens=6)
    return sum(exact_answer("", a, r["ground_truth"]) for a, r in zip(answers, rows)) / len(rows)


def run_grpo(backend: str, model: str, rows: list[dict], out: Path, args) -> dict:
    from training_hub import grpo

    started = time.perf_counter()
    result = grpo(model_path=model, ckpt_output_dir=str(out / backend), tasks=rows, reward_fn=exact_answer,
                  backend=backend, num_iterations=args.iterations, group_size=8, prompt_batch_size=args.prompts,
                  learning_rate=args.lr, warmup_steps=args.warmup, temperature=1.0, max_tokens=6, seed=args.seed,
                  disable_progress_bar=True)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (out / backend / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("type") == "train"]
    if backend == "native":
        tokens = sum(r["tokens"] for r in train)
        busy = sum(r["tokens"] / r["tokens_per_second"] for r in train if r.get("tokens_per_second"))
    else:  # TRL counts prompt + completion tokens as num_tokens (cumulative); its step_time covers the step
        tokens = train[-1]["tokens_seen"]
        busy = sum(r["step_time"] for r in train)
    return {"reward_history": result["reward_history"], "checkpoint": result.checkpoint_path,
            "tokens_per_second": tokens / busy, "seconds": seconds}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for backend, r in results["backends"].items():
        history = r["reward_history"]
        ax.plot(range(1, len(history) + 1), history, marker="o", ms=3,
                label=f"{backend} ({r['tokens_per_second']:.0f} tok/s)")
    ax.set_xlabel(f"iteration ({results['settings']['prompts']} prompts x 8 completions)")
    ax.set_ylabel("mean reward (exact answer)")
    ax.set_title("GRPO on held-out sums, tiny SFT model")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--held-out", type=int, default=30, help="sums removed from the SFT data, trained by GRPO")
    parser.add_argument("--sft-epochs", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=30, help="prompts per iteration (x 8 completions)")
    parser.add_argument("--warmup", type=int, default=5, help="learning-rate warmup, in iterations")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the runs here; an SFT model found here is reused")
    args = parser.parse_args()

    from training_hub import sft
    from training_hub.demo import DEMO_TRAINING
    from training_hub.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.workdir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        data, problems, unseen = split_demo_data(out, args.held_out, args.seed)
        started = time.perf_counter()
        done = sorted((out / "sft" / "hf_format").glob("samples_*"))
        if done:  # --workdir: the SFT model of an earlier run
            taught = str(done[-1])
        else:
            base = make_tiny_model(out / "base", overwrite=True)
            taught = sft(model_path=str(base), data_path=str(data), ckpt_output_dir=str(out / "sft"),
                         disable_progress_bar=True,
                         **{**DEMO_TRAINING, "num_epochs": args.sft_epochs}).checkpoint_path
        for backend in ("native", "trl"):
            shutil.rmtree(out / backend, ignore_errors=True)
        results = {"settings": vars(args), "sft_seconds": round(time.perf_counter() - started, 1),
                   "held_out": len(problems), "unseen": len(unseen),
                   "before": {"held_out": accuracy(taught, problems), "unseen": accuracy(taught, unseen)},
                   "backends": {}}
        for backend in ("native", "trl"):
            r = run_grpo(backend, taught, problems, out, args)
            checkpoint = r.pop("checkpoint")
            r["after"] = {"held_out": accuracy(checkpoint, problems), "unseen": accuracy(checkpoint, unseen)}
            results["backends"][backend] = r
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grpo.json").write_text(json.dumps(results, indent=1))
    plot(results, RESULTS / "grpo.png")
    report(results)
    return 0


def report(results: dict) -> None:
    before = results["before"]
    print(f"SFT (demo settings) in {results['sft_seconds']} s; greedy accuracy before GRPO: held-out "
          f"{before['held_out']:.0%} of {results['held_out']}, unseen {before['unseen']:.0%} of {results['unseen']}")
    print("| backend | reward, first 3 iterations | reward, last 3 | held-out accuracy after | unseen after | "
          "tokens/s | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for backend, r in results["backends"].items():
        h = r["reward_history"]
        print(f"| {backend} | {sum(h[:3]) / 3:.3f} | {sum(h[-3:]) / 3:.3f} | {r['after']['held_out']:.0%} | "
              f"{r['after']['unseen']:.0%} | {r['tokens_per_second']:.0f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
