"""``training-hub demo``: build the tiny model offline, train it with ``sft`` on the bundled chat data, and show
the answers to a few training questions before and after."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

# Settings that make the ~190k-parameter default tiny model learn the bundled Q/A pairs in about a minute on 2 CPU cores.
DEMO_TRAINING = dict(num_epochs=100, effective_batch_size=16, learning_rate=3e-3, warmup_steps=10,
                     lr_scheduler="cosine", max_seq_len=128, max_tokens_per_gpu=1024, weight_decay=0.0)
SHOWN_QUESTIONS = 6


def load_pairs(path: Path) -> list[tuple[list[dict], str]]:
    """(conversation up to the last user turn, expected final assistant answer) for each sample."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        pairs.append((messages[:-1], messages[-1]["content"]))
    return pairs


def answer(model_dir: str | Path, conversations: list[list[dict]], max_new_tokens: int = 24) -> list[str]:
    """Greedy answers from a checkpoint, loaded with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for messages in conversations:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            generated = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
        new_tokens = generated[0, ids["input_ids"].shape[1]:]
        out.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    return out


def run_demo(output_dir: str | Path = "demo_output") -> int:
    from training_hub import sft
    from training_hub.tiny import demo_data_path, make_tiny_model

    root = Path(output_dir)
    run_dir = root / time.strftime("run-%Y%m%d-%H%M%S")
    data = demo_data_path()
    pairs = load_pairs(data)
    shown = pairs[:: max(1, len(pairs) // SHOWN_QUESTIONS)][:SHOWN_QUESTIONS]

    print(f"1/3 Building a tiny random model and tokenizer offline in {root / 'base_model'} ...")
    base = make_tiny_model(root / "base_model", overwrite=True)
    before = answer(base, [c for c, _ in shown])

    print(f"2/3 Training it with sft() on {len(pairs)} bundled chat samples ({data.name}) ...")
    started = time.perf_counter()
    result = sft(model_path=str(base), data_path=str(data), ckpt_output_dir=str(run_dir), **DEMO_TRAINING)
    seconds = time.perf_counter() - started

    print("3/3 Asking the trained checkpoint (loaded with plain transformers) every training question ...")
    answers = answer(result.checkpoint_path, [c for c, _ in pairs])
    exact = (sum(a == expected for a, (_, expected) in zip(answers, pairs)), len(pairs))
    after = [answers[pairs.index(p)] for p in shown]
    _print_report(result, seconds, shown, before, after, exact)
    return 0


def _loss_summary(metrics_path: Path) -> str:
    """Mean training loss of a few epochs, as one line: how the loss fell."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    by_epoch: dict[int, list[float]] = {}
    for r in records:
        if r.get("type", "train") == "train":
            by_epoch.setdefault(math.ceil(r["epoch"] - 1e-9), []).append(r["loss"])
    epochs = sorted(by_epoch)
    shown = sorted({epochs[round(i * (len(epochs) - 1) / 5)] for i in range(6)})
    return "  ".join(f"epoch {e}: {sum(by_epoch[e]) / len(by_epoch[e]):.3f}" for e in shown)


def _print_report(result, seconds: float, shown, before: list[str], after: list[str], exact: tuple[int, int]) -> None:
    metrics = result.metrics
    print(f"\nTrained {metrics['steps']} optimizer steps ({metrics['tokens']} tokens) in {seconds:.0f} s, "
          f"{metrics['tokens_per_second']:.0f} tokens/s.")
    print(f"Mean loss on the answers: {_loss_summary(Path(metrics['metrics_path']))}")
    for (conversation, expected), b, a in zip(shown, before, after):
        verdict = "(the training answer)" if a == expected else f"(training answer: {expected!r})"
        print(f"\nQ: {conversation[-1]['content']}\n   before: {b[:60]!r}\n   after:  {a!r}  {verdict}")
    print(f"\nOn all {exact[1]} training questions the trained model answers {exact[0]} word for word "
          f"({100 * exact[0] / exact[1]:.0f}%).")
    print(f"Checkpoint (Hugging Face format, loads with AutoModelForCausalLM): {result.checkpoint_path}")
    print(f"Per-step metrics: {metrics['metrics_path']}   Plot them: training-hub plot {result.output_dir}")
