"""How close ``training_hub.plan()`` comes to the run the same parameters then perform, on CPU.

    nice -n 19 python benchmarks/plan_accuracy.py            # 8 configurations, two model sizes (a few minutes)
    nice -n 19 python benchmarks/plan_accuracy.py --quick    # 4 configurations, tiny model only

For each configuration (sft, osft, lora_sft, dpo; a 0.19M- and a 4.2M-parameter Qwen2 built offline by
``make_tiny_model``; with and without activation checkpointing) it calls ``plan(algo, **params)`` (calibrated:
a few of the run's own steps timed here), then ``algo(**params)``, and compares:

* steps: ``plan.steps`` with ``result.metrics["steps"]`` (target: exact);
* memory: ``plan.memory["total"]["expected"]`` with the run's own ledger ``result.metrics["memory"]["total"]``
  (parameters + gradients + optimizer state + peak saved activations; target: within 15%);
* time: ``plan.time_seconds["expected"]`` with ``result.metrics["elapsed_seconds"]`` (the training loop, its saves
  and validations; target: within 1.5x).

Upstream's estimator (``training_hub.profiling`` of Training Hub 0.11) is not compared: it is not installed here
(and is not to be). The last line printed is machine-readable JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

SIZES = {"tiny": dict(hidden_size=64, num_layers=2), "small": dict(hidden_size=256, num_layers=4, num_heads=4,
                                                                   num_kv_heads=2)}
CONFIGS = [  # (name, algorithm, size, extra parameters)
    ("sft", "sft", "tiny", {}),
    ("sft+ckpt", "sft", "tiny", {"gradient_checkpointing": True}),
    ("osft", "osft", "tiny", {"unfreeze_rank_ratio": 0.5}),
    ("lora+ckpt", "lora_sft", "tiny", {"gradient_checkpointing": True, "lora_r": 8}),
    ("dpo", "dpo", "tiny", {}),
    ("sft", "sft", "small", {}),
    ("osft+ckpt", "osft", "small", {"unfreeze_rank_ratio": 0.25, "gradient_checkpointing": True}),
    ("lora", "lora_sft", "small", {"lora_r": 16}),
    ("dpo+ckpt", "dpo", "small", {"gradient_checkpointing": True}),
]


def preference_pairs(chat_path: Path, out: Path) -> Path:
    """Pairs from the demo chats: the answer as chosen, the next chat's answer as rejected."""
    chats = [json.loads(line)["messages"] for line in chat_path.read_text().splitlines() if line.strip()]
    with out.open("w") as f:
        for k, messages in enumerate(chats):
            other = chats[(k + 1) % len(chats)]
            f.write(json.dumps({"prompt": messages[:-1], "chosen": [messages[-1]], "rejected": [other[-1]]}) + "\n")
    return out


def measure(name: str, algorithm: str, model: Path, data: Path, out: Path, extra: dict) -> dict:
    import training_hub

    params = dict(model_path=str(model), data_path=str(data), ckpt_output_dir=str(out), max_seq_len=256,
                  effective_batch_size=8, num_epochs=1, disable_progress_bar=True, **extra)
    t0 = time.perf_counter()
    planned = training_hub.plan(algorithm, **params)
    plan_seconds = time.perf_counter() - t0
    assert not out.exists(), "plan() wrote into ckpt_output_dir"
    backend = {"backend": "native"} if algorithm == "dpo" else {}
    result = getattr(training_hub, algorithm)(**params, **backend)
    metrics = result.metrics
    row = {"config": name, "algorithm": algorithm, "steps_plan": planned.steps, "steps_run": metrics["steps"],
           "memory_plan": planned.memory["total"]["expected"], "memory_run": metrics["memory"]["total"],
           "time_plan": planned.time_seconds["expected"], "time_run": metrics["elapsed_seconds"],
           "plan_seconds": plan_seconds}
    row["memory_error"] = row["memory_plan"] / row["memory_run"] - 1
    row["time_ratio"] = row["time_plan"] / row["time_run"]
    shutil.rmtree(out, ignore_errors=True)
    return row


def table(rows: list[dict], sizes: dict) -> str:
    lines = ["| config | model | steps plan / run | memory plan / run (MiB) | error | time plan / run (s) | ratio |",
             "|---|---|---|---|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['size']} ({sizes[r['size']]}) | {r['steps_plan']} / {r['steps_run']} | "
                     f"{r['memory_plan'] / 2**20:.2f} / {r['memory_run'] / 2**20:.2f} | {r['memory_error']:+.1%} | "
                     f"{r['time_plan']:.1f} / {r['time_run']:.1f} | {r['time_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model's first four configurations only")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from training_hub.tiny import demo_data_path, make_tiny_model

    configs = CONFIGS[:4] if args.quick else CONFIGS
    rows, sizes = [], {}
    with tempfile.TemporaryDirectory(prefix="plan_accuracy_") as tmp:
        tmp = Path(tmp)
        chat = demo_data_path()
        pairs = preference_pairs(chat, tmp / "pairs.jsonl")
        models = {}
        for k, (name, algorithm, size, extra) in enumerate(configs):
            if size not in models:
                models[size] = make_tiny_model(tmp / size, **SIZES[size])
                from transformers import AutoModelForCausalLM
                n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(models[size]).parameters())
                sizes[size] = f"{n / 1e6:.2f}M"
            data = pairs if algorithm == "dpo" else chat
            row = measure(name, algorithm, models[size], data, tmp / f"run{k}", extra)
            rows.append({**row, "size": size})
            print(f"{name} {size}: steps {row['steps_plan']}/{row['steps_run']}, memory {row['memory_error']:+.1%}, "
                  f"time {row['time_plan']:.1f}s/{row['time_run']:.1f}s", file=sys.stderr, flush=True)
    print(table(rows, sizes))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(json.dumps({"rows": rows, "load_average": load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
