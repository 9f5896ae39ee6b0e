"""Retention benchmark: how much general knowledge SFT, OSFT and LoRA forget while learning a narrow new task.

1. Base model (built once, cached): a tiny random Qwen2 with its own BPE tokenizer (``training_hub.tiny``),
   pre-trained with our engine (``sft(..., is_pretraining=True)``) on a synthetic "general" corpus with learnable
   structure: fixed facts about a few dozen people (memorised), small-number arithmetic, counting, comparisons and
   sentences from a small grammar with subject-verb agreement.
2. New task (chat, loss on the assistant turn): translate a two-word phrase of general-corpus words (colours,
   animals, foods) into an invented language through a fixed dictionary, e.g. "translate: red fox" -> "vex qok".
   Its answers use words the base model never saw. Held-out phrases are never trained on.
3. Arms, each over a learning-rate sweep and several seeds, with the same data, steps and schedule:
   SFT; OSFT with unfreeze_rank_ratio 0.5 and 0.25 (non-targets train, as upstream); OSFT with the same ratios
   and ``freeze_non_targets=True``; LoRA (``lora_sft``) with rank 16 (``lora``) or 64 (``lora64``) on every linear
   projection, alpha = 2 x rank, merged into the base (``merge=True``) and the merged checkpoint evaluated. LoRA
   arms run over their own, higher sweep (``--lora-lrs``): at the same learning rate LoRA moves the weights less.
4. Per run, computed here with plain transformers from the saved checkpoint: the token-mean cross-entropy on a
   held-out new-task set (assistant tokens) and on a held-out general set (all tokens); "forgetting" is the rise
   of the general loss over the base model's, also split by kind of general text (facts, arithmetic, ...).
5. The frontier (new-task loss against general-loss rise, one point per arm and learning rate, mean over seeds)
   is drawn to a PNG; a JSON line (``CONTINUAL {...}``) and tables are printed, and the JSON is written. Arms are
   also compared at equal new-task loss, on each arm's Pareto frontier over the learning rates: every arm against
   SFT, and every OSFT arm against every LoRA arm.

    .venv/bin/python benchmarks/continual.py            # full run, 7 arms (~20-30 min on 2 shared CPU cores)
    .venv/bin/python benchmarks/continual.py --quick    # smoke version (~3 min cold: its own smaller base model)
    .venv/bin/python benchmarks/continual.py --quick --arms sft,osft0.5,lora    # any arms in the smoke version
    .venv/bin/python benchmarks/continual.py --hidden-size 256 --layers 4 --pretrain-epochs 3 \
        --arms sft,osft0.5,lora --seeds 0   # a larger base (4.1M parameters) -> results/continual-h256x4.*
    .venv/bin/python benchmarks/continual.py --replot benchmarks/results/continual.json   # redraw, reprint
    .venv/bin/python benchmarks/continual.py --arms sft,osft0.5 --lrs 5e-4,7e-4 --tag continual-extra
    .venv/bin/python benchmarks/continual.py --replot benchmarks/results/continual.json \
        benchmarks/results/continual-extra.json                     # merged -> results/continual-merged.*

Results go to ``benchmarks/results/continual.{json,png}`` (``--quick``: ``continual-quick.*``; a base of another
size: ``continual-h<hidden>x<layers>.*``). ``--plan`` prints the runs without training. See
``docs/benchmarks-continual.md``.

The base model is cached under ``benchmarks/.cache/continual/`` (keyed by its settings); ``--rebuild-base``
rebuilds it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".cache" / "continual"
DEFAULT_OUT = HERE / "results"

# --------------------------------------------------------------------------------------------------------------
# The synthetic world: a fixed set of facts and rules, generated from one seed.

COLORS = ["red", "blue", "green", "black", "white", "brown", "gray", "pink"]
ANIMALS = ["cat", "dog", "fox", "horse", "bird", "fish", "goat", "mouse", "snake", "bear"]
FOODS = ["bread", "rice", "apples", "cheese", "soup", "honey", "beans", "cake", "fish", "milk"]
CITIES = ["paris", "london", "rome", "berlin", "madrid", "oslo", "vienna", "dublin", "prague", "lisbon"]
JOBS = ["baker", "farmer", "teacher", "doctor", "painter", "driver", "singer", "builder"]
ADJS = ["big", "small", "old", "young", "happy", "quiet", "fast", "lazy"]
NOUNS = [("cat", "cats"), ("dog", "dogs"), ("child", "children"), ("farmer", "farmers"), ("bird", "birds"),
         ("king", "kings"), ("girl", "girls"), ("boy", "boys")]
VERBS = [("sees", "see"), ("likes", "like"), ("follows", "follow"), ("helps", "help"), ("finds", "find")]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
KINDS = ("facts", "arithmetic", "sequences", "comparison", "grammar")
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]


class World:
    """People with fixed attributes, and the new task's dictionary; everything from ``seed``."""

    def __init__(self, n_people: int, seed: int = 1234):
        rng = random.Random(seed)
        onsets, vowels = "bdklmnprst", "aeiou"
        names: set[str] = set()
        while len(names) < n_people:
            names.add("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(2)))
        self.people = [{"name": n, "city": rng.choice(CITIES), "food": rng.choice(FOODS),
                        "pet": f"{rng.choice(COLORS)} {rng.choice(ANIMALS)}", "job": rng.choice(JOBS)}
                       for n in sorted(names)]
        # New-task dictionary: general words -> invented words over letters the general corpus hardly uses.
        source = sorted(set(COLORS + ANIMALS + FOODS))
        made: set[str] = set()
        while len(made) < len(source):
            made.add("".join(rng.choice("zqxjvwy") + rng.choice("aeiouy") for _ in range(rng.choice((1, 2))))
                     + rng.choice("zqxkv"))
        targets = sorted(made)  # sorted first: a set's order depends on the process's string-hash seed
        rng.shuffle(targets)
        self.dictionary = dict(zip(source, targets))

    # -- general corpus ---------------------------------------------------------------------------------------
    def sentence(self, rng: random.Random, kind: str | None = None) -> str:
        """One sentence of ``kind`` (one of KINDS), or of a random kind: facts 40%, arithmetic 15%, sequences
        10%, comparison 10%, grammar 25%."""
        if kind is None:
            u = rng.random()
            kind = next(k for k, cut in zip(KINDS, (0.40, 0.55, 0.65, 0.75, 1.01)) if u < cut)
        if kind == "facts":  # memorised: each person's city, food, pet and job are fixed
            p = rng.choice(self.people)
            return rng.choice([f"{p['name']} lives in {p['city']}.", f"{p['name']} likes {p['food']}.",
                               f"{p['name']} has a {p['pet']}.", f"{p['name']} works as a {p['job']}."])
        if kind == "arithmetic":
            a, b = rng.randint(0, 12), rng.randint(0, 12)
            return f"{a} plus {b} is {a + b}."
        if kind == "sequences":
            start, n = rng.randint(0, 20), rng.randint(4, 7)
            if rng.random() < 0.5:
                return "count " + " ".join(str(i) for i in range(start, start + n)) + "."
            s = rng.randint(0, 26 - n)
            return "letters " + " ".join(LETTERS[s:s + n]) + "."
        if kind == "comparison":
            a, b = rng.sample(range(13), 2)
            word = "more" if a > b else "less"
            return f"{NUMBER_WORDS[a]} is {word} than {NUMBER_WORDS[b]}."
        # grammar: agreement between subject number and verb
        subj, obj = rng.choice(NOUNS), rng.choice(NOUNS)
        plural = rng.random() < 0.5
        verb = rng.choice(VERBS)[1 if plural else 0]
        det = "the" if plural else rng.choice(["the", "a"])
        return f"{det} {rng.choice(ADJS)} {subj[1 if plural else 0]} {verb} the {obj[rng.random() < 0.5]}."

    def document(self, rng: random.Random, kind: str | None = None) -> str:
        return " ".join(self.sentence(rng, kind) for _ in range(rng.randint(4, 8)))

    # -- new task ---------------------------------------------------------------------------------------------
    def translation(self, words) -> dict:
        return {"messages": [{"role": "user", "content": "translate: " + " ".join(words)},
                             {"role": "assistant", "content": " ".join(self.dictionary[w] for w in words)}]}

    def task_split(self, n_words: int, n_eval: int, seed: int = 3) -> tuple[list, list]:
        """Every n_words-word phrase, shuffled; the first n_eval are held out, the rest are for training."""
        phrases = list(itertools.product(sorted(self.dictionary), repeat=n_words))
        random.Random(seed).shuffle(phrases)
        if n_eval >= len(phrases):
            raise ValueError(f"only {len(phrases)} phrases of {n_words} words; cannot hold out {n_eval}")
        return phrases[n_eval:], phrases[:n_eval]


# --------------------------------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def quiet_logging() -> None:
    logging.disable(logging.INFO)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Evaluator:
    """Token-mean cross-entropy of a checkpoint on held-out general text and held-out new-task chats."""

    def __init__(self, tokenizer_dir: Path, general_docs: list[str], task_chats: list[dict], block: int,
                 docs_by_kind: dict[str, list[str]] | None = None):
        import torch
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        eos = tok.eos_token_id

        def blocks(docs):  # as in pretraining: each document followed by EOS, concatenated, cut into blocks
            ids: list[int] = []
            for doc in docs:
                ids += tok(doc, add_special_tokens=False)["input_ids"] + [eos]
            n = len(ids) // block
            return torch.tensor(ids[:n * block]).view(n, block)

        self.general = blocks(general_docs)
        self.by_kind = {kind: blocks(docs) for kind, docs in (docs_by_kind or {}).items()}
        rows, masks = [], []
        for chat in task_chats:
            enc = tok.apply_chat_template(chat["messages"], tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            rows.append(enc["input_ids"])
            masks.append(enc["assistant_masks"])
        width = max(map(len, rows))
        pad = tok.pad_token_id
        self.task_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        self.task_labels = torch.tensor([[t if m else -100 for t, m in zip(r, mk)] + [-100] * (width - len(r))
                                         for r, mk in zip(rows, masks)])
        self.task_attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])

    @staticmethod
    def _ce(model, ids, labels, attn, batch=32) -> float:
        import torch
        import torch.nn.functional as F

        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                logits = model(input_ids=ids[i:i + batch], attention_mask=attn[i:i + batch]).logits[:, :-1]
                lab = labels[i:i + batch, 1:]
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), lab.reshape(-1),
                                         ignore_index=-100, reduction="sum").item()
                count += int((lab != -100).sum())
        return total / count

    def __call__(self, checkpoint: str | Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        general = self._ce(model, self.general, self.general, torch.ones_like(self.general))
        task = self._ce(model, self.task_ids, self.task_labels, self.task_attn)
        kinds = {kind: self._ce(model, ids, ids, torch.ones_like(ids)) for kind, ids in self.by_kind.items()}
        return {"general_loss": general, "task_loss": task, "general_by_kind": kinds}


# --------------------------------------------------------------------------------------------------------------

def base_settings(args) -> dict:
    return {"version": 3, "hidden_size": args.hidden_size, "layers": args.layers, "people": args.people,
            "pretrain_docs": args.pretrain_docs, "pretrain_epochs": args.pretrain_epochs,
            "pretrain_lr": args.pretrain_lr, "block": args.block, "pretrain_batch": args.pretrain_batch}


def build_base(args, world: World, cache: Path) -> tuple[Path, dict]:
    """Pre-train the base model once; return its checkpoint and build info (cached by settings)."""
    import training_hub
    from training_hub.tiny import make_tiny_model

    settings = base_settings(args)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = cache / f"base-{key}"
    info_path = root / "base.json"
    if info_path.is_file() and not args.rebuild_base:
        info = json.loads(info_path.read_text())
        print(f"base model: cached at {root}", flush=True)
        return Path(info["checkpoint"]), info
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    rng = random.Random(1)
    docs = [world.document(rng) for _ in range(args.pretrain_docs)]
    write_jsonl(root / "general_train.jsonl", ({"document": d} for d in docs))
    # The tokenizer also sees the new task's words (as a chat would show them), not only the general corpus.
    tok_corpus = docs + [f"translate: {a} {b} " + world.dictionary[a] + " " + world.dictionary[b]
                         for a, b in itertools.product(world.dictionary, repeat=2)]
    init = make_tiny_model(root / "init", hidden_size=args.hidden_size, num_layers=args.layers,
                           num_heads=4, num_kv_heads=2, vocab_size=args.vocab_size, corpus=tok_corpus, seed=0)
    log = io.StringIO()  # the engine's data summary: shown only if pre-training fails
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            result = training_hub.sft(
                model_path=str(init), data_path=str(root / "general_train.jsonl"),
                ckpt_output_dir=str(root / "pretrain"),
                is_pretraining=True, block_size=args.block, max_seq_len=args.block, num_epochs=args.pretrain_epochs,
                effective_batch_size=args.pretrain_batch, max_tokens_per_gpu=args.block * args.pretrain_batch,
                learning_rate=args.pretrain_lr, lr_scheduler="cosine", warmup_steps=20,
                lr_scheduler_kwargs={"min_lr_ratio": 0.1}, weight_decay=0.0, seed=0, disable_progress_bar=True,
                checkpoint_at_epoch=False, save_final_checkpoint=True)
        except BaseException:
            sys.__stderr__.write(log.getvalue())
            raise
    if result.status != "success" or not result.checkpoint_path:  # e.g. stopped by a signal: cache nothing
        raise SystemExit(f"base model: pre-training ended with status {result.status!r} "
                         f"({result.metrics.get('stopped_by', 'no final checkpoint')}); nothing cached")
    losses = [json.loads(line)["loss"] for line in open(root / "pretrain" / "metrics.jsonl")
              if json.loads(line).get("type", "train") == "train" and "loss" in json.loads(line)]
    info = {"checkpoint": result.checkpoint_path, "settings": settings, "steps": len(losses),
            "seconds": time.perf_counter() - t0,
            "loss_curve": [round(sum(losses[i:i + 25]) / len(losses[i:i + 25]), 4)
                           for i in range(0, len(losses), 25)],
            "params": None}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.checkpoint_path)
    info["params"] = sum(p.numel() for p in model.parameters())
    info_path.write_text(json.dumps(info, indent=1))
    print(f"base model: pre-trained {info['steps']} steps in {info['seconds']:.0f} s -> {root}", flush=True)
    return Path(result.checkpoint_path), info


LORA_RANKS = {"lora": 16, "lora64": 64}


def parse_arm(name: str) -> dict:
    """"sft", "osft0.25", "osft0.25-frozen", "lora" (rank 16) or "lora64" -> algorithm and its settings."""
    if name == "sft":
        return {"name": name, "algorithm": "sft", "kwargs": {}}
    if name in LORA_RANKS:  # every linear projection (lora_sft's default), alpha = 2 x rank as upstream's r=16/32
        r = LORA_RANKS[name]
        return {"name": name, "algorithm": "lora_sft",
                "kwargs": {"lora_r": r, "lora_alpha": 2.0 * r, "lora_dropout": 0.0, "merge": True}}
    ratio, _, flag = name[4:].partition("-")
    try:
        ok = name.startswith("osft") and 0 < float(ratio) <= 1 and flag in ("", "frozen")
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"unknown arm {name!r}: use sft, lora, lora64, osft<ratio> or osft<ratio>-frozen "
                         "(ratio in (0, 1], e.g. osft0.5)")
    return {"name": name, "algorithm": "osft",
            "kwargs": {"unfreeze_rank_ratio": float(ratio), "freeze_non_targets": flag == "frozen"}}


def is_lora(arm_name: str) -> bool:
    return arm_name in LORA_RANKS


def fine_tune(arm: dict, lr: float, seed: int, base: Path, data: Path, work: Path, args) -> tuple[str, Path, dict]:
    """Train one run; return the checkpoint to evaluate (LoRA: the merged one), the run's folder and its metrics."""
    import training_hub

    out = work / f"{arm['name']}-lr{lr:g}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    train_fn = getattr(training_hub, arm["algorithm"])
    log = io.StringIO()  # the engine's data summary and warnings: shown only if the run fails
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            result = train_fn(
                model_path=str(base), data_path=str(data), ckpt_output_dir=str(out), max_seq_len=args.task_max_len,
                num_epochs=1000, max_steps=args.steps, effective_batch_size=args.batch,
                max_tokens_per_gpu=args.task_max_len * args.batch, learning_rate=lr, lr_scheduler="cosine",
                warmup_steps=max(1, args.steps // 10), lr_scheduler_kwargs={"min_lr_ratio": 0.1}, seed=seed,
                disable_progress_bar=True, save_final_checkpoint=True, **arm["kwargs"])
        except BaseException:
            sys.__stderr__.write(log.getvalue())
            raise
    if result.status != "success":
        raise SystemExit(f"{out.name}: training ended with status {result.status!r}")
    checkpoint = result["merged_path"] if arm["kwargs"].get("merge") else result.checkpoint_path
    return checkpoint, out, dict(result.metrics)


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (new-task loss, general rise) points no other point beats on both, by rising new-task loss."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def interpolate_rise(points: list[tuple[float, float]], task_loss: float) -> float | None:
    """General-loss rise on the Pareto frontier of ``points`` at ``task_loss`` (linear between its points)."""
    front = pareto(points)
    if len(front) == 1:
        return front[0][1] if math.isclose(front[0][0], task_loss) else None
    for (x0, y0), (x1, y1) in zip(front, front[1:]):
        if x0 <= task_loss <= x1:
            return y0 + (y1 - y0) * (task_loss - x0) / (x1 - x0)
    return None


def plot(summary: list[dict], base_eval: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=110)
    styles = {"sft": ("black", "o", "-")}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    arms = list(dict.fromkeys(row["arm"] for row in summary))
    for i, arm in enumerate(arms):
        rows = sorted((r for r in summary if r["arm"] == arm), key=lambda r: r["lr"])
        if is_lora(arm):  # LoRA: diamonds, dotted, in its own colours
            color, marker, line = ("tab:cyan" if arm == "lora" else "tab:olive"), "D", ":"
        else:
            color, marker, line = styles.get(arm, (palette[i % len(palette)], "s" if "frozen" in arm else "^",
                                                   "--" if "frozen" in arm else "-"))
        xs = [r["task_loss"] for r in rows]
        ys = [r["general_rise"] for r in rows]
        ax.errorbar(xs, ys, xerr=[r["task_loss_sd"] for r in rows], yerr=[r["general_rise_sd"] for r in rows],
                    color=color, marker=marker, linestyle=line, capsize=2, label=arm)
        for r in rows:
            ax.annotate(f"{r['lr']:g}", (r["task_loss"], r["general_rise"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=color)
    ax.set_xlabel(f"new-task loss (held-out; base model: {base_eval['task_loss']:.2f})")
    ax.set_ylabel(f"general-loss rise, symlog (base model: {base_eval['general_loss']:.3f})")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def comparison_pairs(arms: list[str]) -> list[tuple[str, str]]:
    """(arm, reference) pairs to compare at equal new-task loss: every arm against SFT, every OSFT arm against
    every LoRA arm."""
    pairs = [(arm, "sft") for arm in arms if arm != "sft" and "sft" in arms]
    pairs += [(arm, ref) for ref in arms if is_lora(ref) for arm in arms if arm.startswith("osft")]
    return pairs


def compare_at_equal_task_loss(summary: list[dict], levels=()) -> list[dict]:
    """For each pair of ``comparison_pairs``: the general-loss rise of both on their Pareto frontiers at the
    new-task losses both reach (the lowest, the middle and the highest of the overlap, and those of ``levels``
    inside it)."""
    curves: dict[str, list] = {}
    for r in summary:
        curves.setdefault(r["arm"], []).append((r["task_loss"], r["general_rise"]))
    rows = []
    for arm, ref in comparison_pairs(list(curves)):
        front, ref_front = pareto(curves[arm]), pareto(curves[ref])
        lo = max(front[0][0], ref_front[0][0])
        hi = min(front[-1][0], ref_front[-1][0])
        if lo > hi:
            rows.append({"arm": arm, "reference": ref, "task_loss": None, "reference_rise": None, "arm_rise": None,
                         "arm_range": [front[0][0], front[-1][0]], "reference_range": [ref_front[0][0],
                                                                                      ref_front[-1][0]]})
            continue
        for level in sorted({lo, (lo + hi) / 2, hi} | {x for x in levels if lo <= x <= hi}):
            rows.append({"arm": arm, "reference": ref, "task_loss": round(level, 4),
                         "reference_rise": round(interpolate_rise(curves[ref], level), 5),
                         "arm_rise": round(interpolate_rise(curves[arm], level), 5)})
    return rows


def merge_results(results: list[dict]) -> dict:
    """One result holding every (arm, lr) of several runs of this script on the same base and settings."""
    same = ("steps", "batch", "task_words", "task_train", "eval_general_docs", "eval_task", "hidden_size", "layers",
            "people")
    first = results[0]
    for other in results[1:]:
        if other["base"]["general_loss"] != first["base"]["general_loss"] or any(
                other["setup"][k] != first["setup"][k] for k in same):
            raise SystemExit("--replot: these results are not from the same base model and fine-tuning settings")
    order = list(dict.fromkeys(r["arm"] for res in results for r in res["summary"]))
    summary = {(r["arm"], r["lr"]): r for res in results for r in res["summary"]}  # later files win
    merged = dict(first)
    merged["summary"] = sorted(summary.values(), key=lambda r: (order.index(r["arm"]), r["lr"]))
    merged["runs"] = [r for res in results for r in res["runs"]]
    merged["merged_from"] = [res.get("command") for res in results]
    merged["setup"] = {**first["setup"], "lrs": "per arm, see summary", "lora_lrs": "per arm, see summary",
                       "arms": ",".join(order)}
    merged["fine_tune_seconds"] = round(sum(res["fine_tune_seconds"] for res in results), 1)
    merged["total_seconds"] = round(sum(res["total_seconds"] for res in results), 1)
    return merged


def report(result: dict, json_path: Path, levels=()) -> None:
    """Write the JSON and the PNG next to it; print the CONTINUAL line and the tables."""
    summary, base = result["summary"], result["base"]
    result.pop("sft_vs_arm_at_equal_task_loss", None)  # the name of this table before the LoRA arms
    result["at_equal_task_loss"] = compare_at_equal_task_loss(summary, levels)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    png = json_path.with_suffix(".png")
    result["png"] = png.name
    setup = result["setup"]
    title = (f"Retention: {base['params'] / 1e6:.2f}M-param Qwen2 pre-trained on synthetic general text, then "
             f"{setup['steps']} steps on a new task\nmean ± sd over seeds {setup['seeds']}; point labels: "
             "learning rate")
    plot(summary, base, png, title)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print("CONTINUAL " + json.dumps({k: v for k, v in result.items() if k != "runs"}))
    print()
    print(f"base model: general loss {base['general_loss']:.4f}, new-task loss {base['task_loss']:.3f}")
    print()
    print("| arm | lr | new-task loss | general-loss rise |")
    print("|---|---|---|---|")
    for r in summary:
        print(f"| {r['arm']} | {r['lr']:g} | {r['task_loss']:.3f} ± {r['task_loss_sd']:.3f} | "
              f"{r['general_rise']:+.4f} ± {r['general_rise_sd']:.4f} |")
    kinds = list(summary[0].get("rise_by_kind") or {})
    if kinds:
        print()
        print("general-loss rise by kind of general text (held-out documents of one kind; base model's loss in "
              "the header):")
        base_kinds = base.get("general_by_kind", {})
        print("| arm | lr | " + " | ".join(f"{k} ({base_kinds.get(k, float('nan')):.3f})" for k in kinds) + " |")
        print("|---|---|" + "---|" * len(kinds))
        for r in summary:
            print(f"| {r['arm']} | {r['lr']:g} | " + " | ".join(f"{r['rise_by_kind'][k]:+.3f}" for k in kinds) + " |")
    print()
    print("general-loss rise at equal new-task loss (on each arm's Pareto frontier over learning rates, linear "
          "between its points, where both frontiers reach); ratio = arm rise / reference rise:")
    print("| arm | reference | new-task loss | reference rise | arm rise | ratio |")
    print("|---|---|---|---|---|---|")
    for r in result["at_equal_task_loss"]:
        if r["task_loss"] is None:
            ranges = (f": {r['arm']} {r['arm_range'][0]:.2f}-{r['arm_range'][1]:.2f}, {r['reference']} "
                      f"{r['reference_range'][0]:.2f}-{r['reference_range'][1]:.2f}" if "arm_range" in r else "")
            print(f"| {r['arm']} | {r['reference']} | (no new-task loss that both reach{ranges}) | | | |")
        else:
            ratio = f"{r['arm_rise'] / r['reference_rise']:.2f}" if r["reference_rise"] > 0 else "-"
            print(f"| {r['arm']} | {r['reference']} | {r['task_loss']:.3f} | {r['reference_rise']:+.4f} | "
                  f"{r['arm_rise']:+.4f} | {ratio} |")
    print(f"\ntotal {result['total_seconds']:.0f} s (fine-tuning {result['fine_tune_seconds']:.0f} s); "
          f"wrote {json_path} and {png}")


FULL = {"arms": "sft,osft0.5,osft0.25,osft0.5-frozen,osft0.25-frozen,lora,lora64", "lrs": "3e-4,1e-3,3e-3,1e-2",
        "lora_lrs": "1e-4,3e-4,1e-3,3e-3", "seeds": "0,1,2", "steps": 150}
QUICK = {"arms": "sft,osft0.25,osft0.25-frozen", "lrs": "1e-4,3e-4,1e-3,3e-3", "lora_lrs": "3e-4,1e-3,3e-3", "seeds": "0",
         "steps": 60}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke version: 1 seed, 60 steps, 3-4 learning rates, its own smaller base (~3 min); "
                        "--arms, --lrs, --lora-lrs, --seeds and --steps still apply")
    p.add_argument("--plan", action="store_true", help="print the runs this command would do, and stop")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--rebuild-base", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    # base model
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--people", type=int, default=48)
    p.add_argument("--pretrain-docs", type=int, default=8000)
    p.add_argument("--pretrain-epochs", type=int, default=None, help="default 6 (--quick: 2)")
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--block", type=int, default=128)
    # fine-tuning
    p.add_argument("--arms", default=None, help=f"comma-separated; default {FULL['arms']} (--quick: {QUICK['arms']})")
    p.add_argument("--lrs", default=None, help=f"learning rates of the SFT and OSFT arms; default {FULL['lrs']} "
                                               f"(--quick: {QUICK['lrs']})")
    p.add_argument("--lora-lrs", default=None, help=f"learning rates of the LoRA arms; default {FULL['lora_lrs']} "
                                                    f"(--quick: {QUICK['lora_lrs']})")
    p.add_argument("--seeds", default=None, help=f"default {FULL['seeds']} (--quick: {QUICK['seeds']})")
    p.add_argument("--task-train", type=int, default=800)
    p.add_argument("--task-words", type=int, default=2)
    p.add_argument("--task-max-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help=f"default {FULL['steps']} (--quick: {QUICK['steps']})")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-general-docs", type=int, default=None, help="default 300 (--quick: 100)")
    p.add_argument("--eval-task", type=int, default=None, help="default 200 (--quick: 100)")
    p.add_argument("--eval-kind-docs", type=int, default=60, help="held-out documents per kind of general text")
    p.add_argument("--only-base", action="store_true")
    p.add_argument("--replot", type=Path, nargs="+", default=None,
                   help="redraw the PNG and tables from a result JSON; with several, merge their arms and learning "
                        "rates (same base model and fine-tuning settings) into <out-dir>/<tag>.json")
    p.add_argument("--levels", default="", help="more new-task losses at which the table at equal new-task loss "
                                                "compares arms (where both reach), e.g. 2.56,4.9")
    p.add_argument("--tag", default=None, help="name of the result files (default: continual or continual-quick, "
                                               "with -h<hidden>x<layers> for a base of another size)")
    args = p.parse_args(argv)
    defaults = {**(QUICK if args.quick else FULL), "pretrain_epochs": 2 if args.quick else 6,
                "eval_general_docs": 100 if args.quick else 300, "eval_task": 100 if args.quick else 200}
    for key, value in defaults.items():  # --quick changes only what the command line leaves unset
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.plan_runs = plan(args)
    except ValueError as e:
        p.error(str(e))
    if args.tag is None and not args.replot:
        size = "" if (args.hidden_size, args.layers) == (128, 2) else f"-h{args.hidden_size}x{args.layers}"
        args.tag = ("continual-quick" if args.quick else "continual") + size
    return args


def plan(args) -> list[tuple[dict, list[float]]]:
    """The arms to run, each with its learning rates (LoRA arms: --lora-lrs); ValueError on a bad value."""
    def numbers(option: str, text: str, kind=float) -> list:
        try:
            values = [kind(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(f"{option} {text!r}: expected comma-separated numbers, e.g. 1e-3,3e-3") from None
        if kind is float and any(v <= 0 for v in values):
            raise ValueError(f"{option} {text!r}: values must be > 0")
        return values

    lrs, lora_lrs = numbers("--lrs", args.lrs), numbers("--lora-lrs", args.lora_lrs)
    args.level_values = numbers("--levels", args.levels) if args.levels else []
    numbers("--seeds", args.seeds, int)
    arms = [parse_arm(a.strip()) for a in args.arms.split(",")]
    if len({a["name"] for a in arms}) != len(arms):
        raise ValueError(f"--arms {args.arms!r}: an arm is named twice")
    return [(arm, lora_lrs if is_lora(arm["name"]) else lrs) for arm in arms]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plan:
        seeds = args.seeds.split(",")
        for arm, lrs in args.plan_runs:
            print(f"{arm['name']:>16}: {arm['algorithm']}({', '.join(f'{k}={v}' for k, v in arm['kwargs'].items())})"
                  f" at lr {', '.join(f'{lr:g}' for lr in lrs)}, seeds {', '.join(seeds)}")
        n = sum(len(lrs) for _, lrs in args.plan_runs) * len(seeds)
        print(f"{n} runs of {args.steps} steps -> {args.out_dir / args.tag}.json")
        return 0
    if args.replot:
        results = [json.loads(path.read_text()) for path in args.replot]
        if len(results) == 1:
            report(results[0], args.replot[0], args.level_values)
        else:
            report(merge_results(results), args.out_dir / f"{args.tag or 'continual-merged'}.json", args.level_values)
        return 0
    tag = args.tag

    quiet_logging()
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    world = World(args.people)
    base_ckpt, base_info = build_base(args, world, args.cache_dir)
    if args.only_base:
        print(json.dumps(base_info))
        return 0

    work = args.cache_dir / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train_phrases, eval_phrases = world.task_split(args.task_words, args.eval_task)
    rng = random.Random(3)
    write_jsonl(work / "task_train.jsonl", (world.translation(rng.choice(train_phrases))
                                            for _ in range(args.task_train)))
    task_eval = [world.translation(ph) for ph in eval_phrases]  # held out: phrases never trained on
    general_rng = random.Random(5)
    general_eval = [world.document(general_rng) for _ in range(args.eval_general_docs)]
    # The same held-out text split by kind (documents of one kind only), to see what is forgotten.
    kind_rng = random.Random(6)
    by_kind = {k: [world.document(kind_rng, k) for _ in range(args.eval_kind_docs)] for k in KINDS}
    evaluator = Evaluator(base_ckpt, general_eval, task_eval, args.block, by_kind)
    base_eval = evaluator(base_ckpt)
    print(f"base model: general loss {base_eval['general_loss']:.4f}, new-task loss {base_eval['task_loss']:.4f}, "
          "by kind " + ", ".join(f"{k} {v:.3f}" for k, v in base_eval["general_by_kind"].items()), flush=True)

    seeds = [int(x) for x in args.seeds.split(",")]
    runs = []
    t_ft = time.perf_counter()
    for seed in seeds:
        for arm, lrs in args.plan_runs:
            for lr in lrs:
                t0 = time.perf_counter()
                ckpt, out, metrics = fine_tune(arm, lr, seed, base_ckpt, work / "task_train.jsonl", work, args)
                ev = evaluator(ckpt)
                run = {"arm": arm["name"], "lr": lr, "seed": seed, "task_loss": ev["task_loss"],
                       "general_loss": ev["general_loss"],
                       "general_rise": ev["general_loss"] - base_eval["general_loss"],
                       "rise_by_kind": {k: round(v - base_eval["general_by_kind"][k], 5)
                                        for k, v in ev["general_by_kind"].items()},
                       "train_loss": metrics.get("final_loss"), "seconds": round(time.perf_counter() - t0, 1)}
                runs.append(run)
                shutil.rmtree(out, ignore_errors=True)
                print(f"  {arm['name']:>16} lr {lr:<7g} seed {seed}: new-task {ev['task_loss']:.4f}  general "
                      f"{ev['general_loss']:.4f} (+{run['general_rise']:.4f})  [{run['seconds']:.0f} s]", flush=True)
    ft_seconds = time.perf_counter() - t_ft

    summary = []
    for arm, lrs in args.plan_runs:
        for lr in lrs:
            rs = [r for r in runs if r["arm"] == arm["name"] and r["lr"] == lr]
            t_m, t_sd = mean_sd([r["task_loss"] for r in rs])
            g_m, g_sd = mean_sd([r["general_rise"] for r in rs])
            summary.append({"arm": arm["name"], "lr": lr, "seeds": len(rs), "task_loss": t_m, "task_loss_sd": t_sd,
                            "general_rise": g_m, "general_rise_sd": g_sd,
                            "rise_by_kind": {k: round(statistics.fmean(r["rise_by_kind"][k] for r in rs), 5)
                                             for k in rs[0]["rise_by_kind"]}})
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rnd = lambda row: {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}  # noqa: E731
    result = {"benchmark": "continual", "quick": args.quick,
              "command": "benchmarks/continual.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "base": {**base_eval, "params": base_info["params"], "pretrain_steps": base_info["steps"],
                       "pretrain_seconds": round(base_info["seconds"], 1),
                       "pretrain_loss_every_25_steps": base_info["loss_curve"]},
              "setup": {k: getattr(args, k) for k in ("hidden_size", "layers", "people", "steps", "batch", "lrs",
                                                      "lora_lrs", "seeds", "arms", "task_words", "task_train",
                                                      "eval_general_docs", "eval_task", "threads")},
              "summary": [rnd(r) for r in summary], "runs": [rnd(r) for r in runs],
              "fine_tune_seconds": round(ft_seconds, 1), "total_seconds": round(time.perf_counter() - t_start, 1)}
    report(result, args.out_dir / f"{tag}.json", args.level_values)
    return 0


if __name__ == "__main__":
    sys.exit(main())
