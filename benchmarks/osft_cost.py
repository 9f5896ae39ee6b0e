"""OSFT step time and peak memory relative to plain dense training (SFT) of the same model.

A hand-written AdamW loop on random token batches over a tiny random Qwen2 built offline
(``training_hub.tiny.make_tiny_model``). Each arm runs in its own subprocess so peak memory is its own: on CPU the
peak resident set size (``ru_maxrss``) minus the RSS after loading the model, on CUDA
``torch.cuda.max_memory_allocated`` (training state + activations). The OSFT step includes ``project_gradients``
and ``project_parameters``. Arms run interleaved for ``--rounds`` rounds. Step time is, on CPU, the process CPU
time of a step (with the default ``--threads 1`` it does not grow when other programs share the cores), on CUDA
the synchronised wall time; the table shows the fastest timed step over all rounds and the median.

    .venv/bin/python benchmarks/osft_cost.py                       # ~4.3M parameters, CPU, 1 thread
    .venv/bin/python benchmarks/osft_cost.py --device cuda --hidden-size 1024 --layers 8 --batch 8 --seq-len 1024

Prints one ``OSFT_COST {json}`` line and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

ARMS = ("sft", "osft:0.5:auto", "osft:0.25:auto", "osft:0.5:dense", "osft:0.5:factored")


def run_arm(args) -> dict:
    import resource

    import torch
    import transformers

    from training_hub.osft_core import apply_osft, project_gradients, project_parameters

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).to(device)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    is_osft = args.arm != "sft"
    setup_s = 0.0
    if is_osft:
        _, ratio, mode = args.arm.split(":")
        t0 = time.perf_counter()
        apply_osft(model, unfreeze_rank_ratio=float(ratio), forward_mode=mode)
        setup_s = time.perf_counter() - t0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if is_osft:
            project_gradients(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if is_osft:
            project_parameters(model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            # CPU: process CPU time (with --threads 1, insensitive to other load on a shared machine); CUDA: wall.
            times.append(time.process_time() - c0 if device.type == "cpu" else time.perf_counter() - t0)
    result = {"arm": args.arm, "step_s": min(times), "step_median_s": statistics.median(times), "setup_s": setup_s,
              "params": sum(p.numel() for p in model.parameters()),
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if device.type == "cuda":
        result["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20
        result["weights_mib"] = base_alloc / 2**20
    else:  # ru_maxrss is KiB on Linux
        result["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_loaded) / 1024
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    args = parser.parse_args(argv)

    if args.arm:
        print("ARM " + json.dumps(run_arm(args)))
        return 0

    if args.model_dir is None:
        from training_hub.tiny import make_tiny_model

        args.model_dir = str(make_tiny_model(tempfile.mkdtemp() + "/model", hidden_size=args.hidden_size,
                                             num_layers=args.layers, num_heads=max(4, args.hidden_size // 64),
                                             num_kv_heads=max(2, args.hidden_size // 128)))
    arms = args.arms.split(",")
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    passthrough = ["--model-dir", args.model_dir, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--device", args.device]
    for _ in range(args.rounds):
        for arm in arms:
            out = subprocess.run([sys.executable, __file__, "--arm", arm, *passthrough], capture_output=True,
                                 text=True, check=True).stdout
            runs[arm].append(json.loads(next(line[4:] for line in out.splitlines() if line.startswith("ARM "))))
    summary = {}
    for arm, results in runs.items():
        summary[arm] = {"step_s": min(r["step_s"] for r in results),
                        "step_median_s": statistics.median(r["step_median_s"] for r in results),
                        "peak_mib": statistics.median(r["peak_mib"] for r in results),
                        "setup_s": statistics.median(r["setup_s"] for r in results),
                        "params": results[0]["params"], "trainable": results[0]["trainable"]}
    sft = summary.get("sft")
    for arm, s in summary.items():
        if sft:
            s["step_vs_sft"] = s["step_s"] / sft["step_s"]
            s["peak_vs_sft"] = s["peak_mib"] / sft["peak_mib"] if sft["peak_mib"] > 0 else None
    config = {"device": args.device, "threads": args.threads, "hidden_size": args.hidden_size, "layers": args.layers,
              "tokens_per_step": args.batch * args.seq_len, "steps": args.steps, "rounds": args.rounds}
    print("OSFT_COST " + json.dumps({"config": config, "arms": summary}))
    print(f"\n{config}")
    print(f"{'arm':<20} {'params':>10} {'trainable':>10} {'step s':>8} {'x SFT':>6} {'median s':>9} {'peak MiB':>9} "
          f"{'x SFT':>6} {'setup s':>8}")
    for arm, s in summary.items():
        ratio_mem = f"{s['peak_vs_sft']:.2f}" if s.get("peak_vs_sft") else "-"
        print(f"{arm:<20} {s['params']:>10,} {s['trainable']:>10,} {s['step_s']:>8.4f} {s.get('step_vs_sft', 1):>6.2f} "
              f"{s['step_median_s']:>9.4f} {s['peak_mib']:>9.1f} {ratio_mem:>6} {s['setup_s']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
