"""One command for a CUDA machine: does the native engine train there, how fast, in how much memory.

    python benchmarks/gpu_check.py                 # CUDA: the runs below; no CUDA: says so, does the dry run, exits 0
    python benchmarks/gpu_check.py --dry-run-only  # only the 8B memory budget on the meta device (any machine)
    python benchmarks/gpu_check.py --quick         # fewer steps, a smaller generated model

On CUDA, on a generated ~1B-parameter Llama-style model (built offline by ``make_tiny_model``; no download):

* sft, osft, lora_sft and dpo on one GPU with the defaults (``dtype="auto"``: bf16 autocast, fp32 master
  weights; activation checkpointing; the chunked output loss), a few optimizer steps each: tokens/s, model-FLOPs utilisation against the bf16 matmul peak measured
  in the same run, peak memory (``torch.cuda.max_memory_allocated``);
* the packed-attention path a bf16 run takes here (a varlen flash kernel, else per-sample SDPA, else the
  position-id mask; ``engine.attention.use_packed_attention``), its self-check errors (a packed sample's logits
  against its logits alone; the varlen kernel against exact per-sample attention, GQA and a sliding window,
  outputs and gradients) and why faster paths were refused; and the varlen kernel's forward + backward time
  against per-sample SDPA on a 16k-token row of 30 samples with Llama-3-8B's attention heads;
* sft again with ``torch_compile=True`` (with the default activation checkpointing, and both eager and compiled
  without it), with
  ``optimizer_state_dtype="bfloat16"`` and, where liger-kernel is installed, with ``use_liger=True``; the first
  sft run also writes its Hugging Face checkpoint and counts the host syncs of each of its steps
  (``torch.cuda.set_sync_debug_mode``; the engine aims at one per step). A run that fails
  is reported with its error and the check goes on;
* with more than one GPU, sft under DDP and under FSDP2 on all of them (``nproc_per_node``), which also load
  on rank 0 only and write their final checkpoint with a sharded training state.

Everywhere, the 8B dry run: Llama-3-8B's shapes built on the meta device (no memory, no weights), its exact
parameter count, and the per-GPU memory the engine's defaults need (see ``dry_run``) for 1 x H200 and 8 x H100
under DDP and FSDP2. The activation figure is an estimate from the shapes, not a measurement; the GPU runs
measure.

The last line printed is machine-readable JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sft_throughput import matmul_peak, synthetic_chats  # noqa: E402  (the same data and peak as the CPU bench)

GIB = 2**30
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False)
GPUS = {"1x H200": (1, 141), "8x H100": (8, 80)}


def dry_run(tokens_per_gpu: int = 16384) -> dict:
    """Llama-3-8B on the meta device: parameters, and the per-GPU bytes the engine's defaults need on CUDA.

    The defaults on CUDA: bf16 autocast with fp32 master weights, fp32 gradients and AdamW moments (16 bytes per
    parameter); activation checkpointing (each layer keeps its bf16 input, one layer's activations live at a time);
    the output loss in chunks of 2**26 logits (engine.loss); strategy 'auto' = FSDP2 with a bf16
    MixedPrecisionPolicy on several GPUs (state sharded, no autocast weight copies), DDP when asked.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    from training_hub.engine.loss import CHUNK_ELEMENTS

    config = LlamaConfig(**LLAMA3_8B)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim  # width of k and of v
    layer_params = params // layers  # about (embeddings and head are not in the layers, a small overestimate)
    # One layer's saved activations per token in bf16 (inputs of every matmul, norms, SwiGLU), recomputed in the
    # backward; with checkpointing every layer keeps only its bf16 input between forward and backward.
    per_token_layer = 2 * (6 * h + 2 * kv + 4 * i)
    activations = tokens_per_gpu * (2 * h * layers + per_token_layer)
    logits = 10 * CHUNK_ELEMENTS  # one chunk: bf16 logits, their fp32 copy and the gradient
    budgets = {}
    for name, (count, memory_gib) in GPUS.items():
        for strategy in (("single", "single+bf16-moments") if count == 1 else ("ddp", "fsdp2")):
            shard = count if strategy == "fsdp2" else 1
            # fp32 weights + grads + AdamW moments (optimizer_state_dtype="bfloat16": moments in bf16, 12 bytes)
            state = (12 if strategy.endswith("bf16-moments") else 16) * params // shard
            copies = 2 * 2 * layer_params if strategy == "fsdp2" else 2 * params  # 2 gathered bf16 layers / autocast
            buckets = 4 * params if strategy == "ddp" else 0  # DDP's gradient buckets
            total = state + copies + buckets + activations + logits
            budgets[f"{name} {strategy}"] = {"per_gpu_gib": round(total / GIB, 1), "gpu_gib": memory_gib,
                                             "fits": total / GIB < memory_gib * 0.95}
    return {"model": "Llama-3-8B shapes (meta device)", "parameters": params, "head_dim": head_dim,
            "tokens_per_gpu": tokens_per_gpu,
            "bytes": {"weights_grads_adamw_fp32": 16 * params, "bf16_weight_copies_unsharded": 2 * params,
                      "activations_checkpointed_est": activations, "logits_one_chunk": logits},
            "activation_bytes_per_token_est": 2 * h * layers + per_token_layer, "budgets": budgets}


def print_dry_run(result: dict) -> None:
    print(f"\n8B dry run: {result['parameters'] / 1e9:.2f}B parameters, {result['tokens_per_gpu']} tokens per GPU "
          f"micro-batch (activations ~{result['activation_bytes_per_token_est'] / 2**20:.1f} MiB/token, estimate)")
    for key, value in result["bytes"].items():
        print(f"  {key:30s} {value / GIB:8.1f} GiB")
    for name, budget in result["budgets"].items():
        verdict = "fits" if budget["fits"] else "does NOT fit"
        print(f"  {name:18s} {budget['per_gpu_gib']:8.1f} GiB per GPU of {budget['gpu_gib']} GiB: {verdict}")


def generated_model(root: Path, quick: bool) -> Path:
    from training_hub.tiny import make_tiny_model

    sizes = dict(hidden_size=1024, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=2816) if quick \
        else dict(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=8, intermediate_size=5632)
    return make_tiny_model(root / "model", arch="llama", vocab_size=4096, max_position_embeddings=4096,
                           corpus=[" ".join(m["content"] for m in c["messages"]) for c in synthetic_chats(4000, 1, 60)],
                           **sizes)


def write_data(root: Path, n: int) -> tuple[Path, Path]:
    chats = synthetic_chats(n, seed=0, mean_words=120)
    chat_path, pair_path = root / "chat.jsonl", root / "pairs.jsonl"
    chat_path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    rng = random.Random(0)
    pairs = [{"prompt": c["messages"][0]["content"], "chosen": c["messages"][1]["content"],
              "rejected": chats[rng.randrange(n)]["messages"][1]["content"]} for c in chats]
    pair_path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return chat_path, pair_path


def one_run(name: str, fn, model: Path, data: Path, out: Path, params: int, peak: float, **kw) -> dict:
    """One training run; a failure is recorded in its row (with the error) and the check goes on to the next run."""
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    kw = {"disable_progress_bar": True, "save_final_checkpoint": False, **kw}
    try:
        result = fn(str(model), str(data), str(out), **kw)
    except Exception as exc:  # noqa: BLE001 - device time is scarce: report it and run the rest
        row = {"run": name, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
               "wall_seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)
        return row
    metrics = result.metrics
    tps = metrics.get("tokens_per_second") or 0.0
    row = {"run": name, "status": result.status, "steps": metrics.get("steps"), "tokens_per_second": round(tps),
           "mfu": round(6 * params * tps / peak, 4) if peak else None,
           "peak_memory_gib": round((metrics.get("peak_memory_bytes") or 0) / GIB, 2),
           "final_loss": metrics.get("final_loss"), "wall_seconds": round(time.perf_counter() - start, 1),
           "checkpoint": result.checkpoint_path}
    print(json.dumps(row), flush=True)
    return row


def count_step_syncs(recipe):
    """Count, per ``recipe.train_step``, the CUDA operations that make the host wait for the device
    (``torch.cuda.set_sync_debug_mode("warn")``); the engine aims at one per step. Returns ``(counts, restore)``:
    the list it fills, one count per step (or the error text where the debug mode could not be used; the step then
    runs as usual), and the function that puts the real ``train_step`` back."""
    import warnings

    real, counts = recipe.train_step, []

    def train_step(self, step, stop):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                torch.cuda.set_sync_debug_mode("warn")
            except Exception as exc:  # noqa: BLE001 - a measurement aid: never cost the run
                counts.append(f"{type(exc).__name__}: {exc}"[:300])
                return real(self, step, stop)
            try:
                return real(self, step, stop)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                counts.append(sum("synchroniz" in str(w.message) for w in caught))

    recipe.train_step = train_step
    return counts, lambda: setattr(recipe, "train_step", real)


def attention_check(model: Path) -> dict:
    """The packed-attention path a bf16 run takes on this GPU, with its self-check errors (see the docstring)."""
    from transformers import AutoModelForCausalLM

    from training_hub.engine.attention import use_packed_attention

    check_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa").cuda()
    choice = use_packed_attention(check_model, compute_dtype=torch.bfloat16)  # what load_model does for bf16 runs
    del check_model
    row = {"attention_path": choice.description, "attention_selfcheck_error": choice.error,
           "attention_kernel_selfcheck_error": choice.kernel_error, "attention_refused": list(choice.refused),
           "attention_speed": attention_speed(choice.implementation)}
    print(json.dumps(row), flush=True)
    return row


def attention_speed(implementation: str, tokens: int = 16384, samples: int = 30) -> dict | None:
    """Forward + backward of one attention call over a packed row of ``samples`` random lengths, with Llama-3-8B's
    heads (32 query heads on 8 kv heads of 128) in bf16: the chosen varlen kernel against per-sample SDPA (ms,
    median of 10 after 3 warm-ups). None when no varlen kernel was chosen."""
    from types import SimpleNamespace

    from training_hub.engine import attention

    kernel = next((k for k in (attention.FLASH_ATTN, attention.TORCH_VARLEN) if k.name == implementation), None)
    if kernel is None:
        return None
    g = torch.Generator().manual_seed(0)
    bounds = [0, *sorted((torch.randperm(tokens - 1, generator=g)[:samples - 1] + 1).tolist()), tokens]
    row = {"sample_bounds": bounds, "cu_seqlens": torch.tensor(bounds, dtype=torch.int32, device="cuda"),
           "max_seqlen": max(b - a for a, b in zip(bounds, bounds[1:]))}
    q, k, v = (torch.randn(1, heads, tokens, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for heads in (32, 8, 8))
    module = SimpleNamespace(training=True)
    calls = {"varlen": lambda: attention.packed_varlen(module, q, k, v, None, kernel=kernel,
                                                       **attention.attention_kwargs(kernel.name, row)),
             "per_sample_sdpa": lambda: attention.packed_sdpa(module, q, k, v, None,
                                                              **attention.attention_kwargs(attention.NAME, row))}
    out = {}
    for name, call in calls.items():
        times = []
        for _ in range(13):
            torch.cuda.synchronize()
            start = time.perf_counter()
            call()[0].float().sum().backward()
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - start))
        out[f"{name}_ms"] = round(sorted(times[3:])[len(times[3:]) // 2], 2)
    out["speedup"] = round(out["per_sample_sdpa_ms"] / out["varlen_ms"], 2)
    return out


def gpu_runs(args, root: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from training_hub import dpo, lora_sft, osft, sft
    from training_hub.engine.trainer import SFTRecipe

    model = generated_model(root, args.quick)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
    attention = attention_check(model)
    peak = matmul_peak(torch.bfloat16)
    chat, pairs = write_data(root, 64 if args.quick else 512)
    common = dict(max_steps=args.steps, effective_batch_size=32, max_seq_len=1024, max_tokens_per_gpu=16384,
                  learning_rate=1e-5)
    syncs, restore = count_step_syncs(SFTRecipe)  # during the first sft run only
    try:
        rows = [one_run("sft", sft, model, chat, root / "sft", params, peak, save_final_checkpoint=True, **common)]
    finally:
        restore()
    rows[0]["host_syncs_per_step"] = list(syncs)
    print(json.dumps({"run": "sft", "host_syncs_per_step": list(syncs)}), flush=True)
    rows += [
        one_run("osft", osft, model, chat, root / "osft", params, peak, unfreeze_rank_ratio=0.25, **common),
        one_run("lora_sft", lora_sft, model, chat, root / "lora", params, peak, **common),
        one_run("dpo", dpo, model, pairs, root / "dpo", params, peak,
                **{**common, "max_tokens_per_gpu": 4096, "max_seq_len": 1024}),
        # the options a large run turns on: regional torch.compile (self-checked), bf16 AdamW moments, Liger
        # compile with the defaults (checkpointed layers: against the first sft run) and without checkpointing
        one_run("sft torch_compile", sft, model, chat, root / "sft-compile", params, peak, torch_compile=True,
                **common),
        one_run("sft no checkpointing", sft, model, chat, root / "sft-nockpt", params, peak,
                gradient_checkpointing=False, **common),
        one_run("sft torch_compile no checkpointing", sft, model, chat, root / "sft-compile-nockpt", params,
                peak, torch_compile=True, gradient_checkpointing=False, **common),
        one_run("sft bf16 moments", sft, model, chat, root / "sft-bf16m", params, peak,
                optimizer_state_dtype="bfloat16", **common)]
    if importlib.util.find_spec("liger_kernel") is not None:
        rows.append(one_run("sft use_liger", sft, model, chat, root / "sft-liger", params, peak, use_liger=True,
                            **common))
    if torch.cuda.device_count() > 1:
        for strategy in ("ddp", "fsdp2"):
            rows.append(one_run(f"sft {strategy} x{torch.cuda.device_count()}", sft, model, chat,
                                root / f"sft-{strategy}", params, peak, nproc_per_node="auto", strategy=strategy,
                                save_final_checkpoint=True, **common))
    return {"parameters": params, "bf16_matmul_peak_flops": peak, **attention,
            "gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "runs": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run-only", action="store_true", help="only the 8B memory budget (meta device)")
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 8, quick 3)")
    parser.add_argument("--tokens-per-gpu", type=int, default=16384, help="micro-batch tokens for the dry run")
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 8)
    out = {"benchmark": "gpu_check", "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not args.dry_run_only:
        if torch.cuda.is_available():
            root = Path(tempfile.mkdtemp(prefix="gpu_check-"))
            try:
                out["gpu_runs"] = gpu_runs(args, root)
            finally:
                shutil.rmtree(root, ignore_errors=True)
        else:
            print("no CUDA device here (torch.cuda.is_available() is False): skipping the GPU runs")
    out["dry_run_8b"] = dry_run(args.tokens_per_gpu)
    print_dry_run(out["dry_run_8b"])
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
