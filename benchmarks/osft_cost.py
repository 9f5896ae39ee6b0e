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
    .venv/bin/python benchmarks/osft_cost.py --dtype bfloat16 ...            # every arm under bf16 autocast

Prints one ``OSFT_COST {json}`` line and a table.

Two more modes, in process:

    .venv/bin/python benchmarks/osft_cost.py --layer 2048x2048 --tokens 4096   # one OSFTLinear, fp32 vs bf16
    .venv/bin/python benchmarks/osft_cost.py --curve --steps 30                # tiny Qwen2 loss curve, fp32 vs bf16

``--layer OUTxIN``: forward + backward of one ``OSFTLinear`` (dense path, half the rank frozen) against a plain
``nn.Linear``: fp32; under bf16 autocast with the backward as it was before the bf16 backward (composition and
gradient products in fp32); under bf16 autocast now; and the fp32 projections of one optimizer step. Times are the
best of ``--reps`` (process CPU time on CPU, synchronised wall time on CUDA); errors are the relative Frobenius
errors of the factor gradients against an fp64 run of the same inputs. Prints ``OSFT_LAYER {json}`` and a table.
``--curve``: the same OSFT AdamW steps on the same fixed batches of a tiny random Qwen2 in fp32 and under bf16
autocast; prints both loss curves, their largest gap and the orthogonality of the factors at the end
(``OSFT_CURVE {json}``).
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
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
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


def _timed(fn, reps: int, device) -> float:
    """Best of ``reps`` calls of ``fn`` after one warm-up call (CPU: process time; CUDA: synchronised wall)."""
    import torch

    best = float("inf")
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.process_time() - c0 if device.type == "cpu" else time.perf_counter() - t0)
    return best


def _layer_case(layer, x, grad_out, how: str):
    """One forward + backward of ``layer`` on ``x``; returns the factor gradients. ``how``: 'fp32', 'bf16'
    (under bf16 autocast) or 'bf16-before' (under bf16 autocast, the fp32 backward of before)."""
    import torch

    from training_hub.osft_core.linear import OSFTLinear, _DenseOSFTLinear

    layer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=how != "fp32"):
        if how == "bf16-before" and isinstance(layer, OSFTLinear):
            factors = (layer.U_high, layer.S_high, layer.V_high, layer.U_low, layer.S_low, layer.V_low)
            out = _DenseOSFTLinear.apply(x, *factors, layer.bias, False)
        else:
            out = layer(x)
    out.backward(grad_out.to(out.dtype))
    return [p.grad for p in layer.parameters() if p.requires_grad]


def _rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def layer_bench(args) -> dict:
    """``--layer``: time and gradient error of one OSFTLinear, fp32 vs bf16 (see the module docstring)."""
    import copy

    import torch
    from torch import nn

    from training_hub.osft_core import OSFTLinear, frozen_rank
    from training_hub.osft_core.linear import _factor_grads
    from training_hub.osft_core.project import project_out

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n_out, n_in = (int(v) for v in args.layer.lower().split("x"))
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5)
    linear = linear.to(device)
    k = frozen_rank(min(n_out, n_in), args.ratio)
    layer = OSFTLinear.from_linear(linear, k, forward_mode="dense")
    x = torch.randn(args.tokens, n_in, generator=gen).to(device)
    grad_out = (torch.randn(args.tokens, n_out, generator=gen) / args.tokens).to(device)
    reference = _layer_case(copy.deepcopy(layer).double(), x.double(), grad_out.double(), "fp32")
    times, errors = {}, {}
    for how in ("fp32", "bf16-before", "bf16"):
        times[f"osft {how}"] = _timed(lambda: _layer_case(layer, x, grad_out, how), args.reps, device)
        grads = _layer_case(layer, x, grad_out, how)
        errors[f"osft {how}"] = [_rel_err(g, r) for g, r in zip(grads, reference)]
        if how != "bf16-before":
            times[f"nn.Linear {how}"] = _timed(lambda: _layer_case(linear, x, grad_out, how), args.reps, device)
    # For scale: a plain nn.Linear's weight gradient under bf16 autocast, against fp64.
    w_ref = _layer_case(copy.deepcopy(linear).double(), x.double(), grad_out.double(), "fp32")[0]
    errors["nn.Linear bf16 (weight)"] = [_rel_err(_layer_case(linear, x, grad_out, "bf16")[0], w_ref)]
    # The same bf16 inputs with dL/dW accumulated and kept in fp32 (the alternative to the bf16 G kept now).
    G32 = grad_out.bfloat16().float().T @ x.bfloat16().float()
    errors["bf16 inputs, fp32 G"] = [_rel_err(g, r) for g, r in zip(
        _factor_grads(G32, layer.U_low, layer.S_low, layer.V_low, (True, True, True)), reference)]

    def project_step():  # per optimizer step: gradients before, values after
        for frozen, trainable in ((layer.U_high, layer.U_low), (layer.V_high, layer.V_low)):
            project_out(frozen, trainable.detach().clone())
            project_out(frozen, trainable.detach().clone())

    times["projections fp32 (per step)"] = _timed(project_step, args.reps, device)
    config = {"device": args.device, "threads": args.threads, "layer": f"{n_out}x{n_in}", "tokens": args.tokens,
              "frozen_rank": k, "trainable_rank": min(n_out, n_in) - k, "reps": args.reps}
    return {"config": config, "seconds": times, "grad_rel_err_U_S_V": errors}


def curve_bench(args) -> dict:
    """``--curve``: OSFT loss curves of a tiny Qwen2, fp32 and bf16 autocast, same batches, same seed."""
    import torch
    import transformers

    from training_hub.osft_core import apply_osft, osft_modules, project_gradients, project_parameters

    torch.set_num_threads(args.threads)
    curves, ortho = {}, {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        apply_osft(model, unfreeze_rank_ratio=args.ratio)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=gen)
                   for _ in range(4)]
        curves[name] = []
        for step in range(args.steps):
            ids = batches[step % len(batches)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            project_gradients(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            project_parameters(model)
            curves[name].append(round(loss.item(), 5))
        with torch.no_grad():
            ortho[name] = max(max(float((m.U_high.T @ m.U_low).abs().max()),
                                  float((m.V_high.T @ m.V_low).abs().max())) for m in osft_modules(model).values())
    gap = max(abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"]))
    return {"config": {"hidden_size": args.hidden_size, "layers": args.layers, "ratio": args.ratio, "lr": args.lr,
                       "tokens_per_step": args.batch * args.seq_len, "steps": args.steps},
            "loss": curves, "max_abs_gap": gap, "max_orthogonality_error": ortho}


def print_layer(result: dict) -> None:
    print("OSFT_LAYER " + json.dumps(result))
    print(f"\n{result['config']}")
    for name, sec in result["seconds"].items():
        print(f"{name:<30} {sec * 1e3:>10.1f} ms")
    print(f"{'relative error vs fp64':<30} {'U_low':>9} {'S_low':>9} {'V_low':>9}")
    for name, errs in result["grad_rel_err_U_S_V"].items():
        print(f"{name:<30} " + " ".join(f"{e:>9.2e}" for e in errs))


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
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of the arms (bfloat16: autocast over fp32 master weights)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--layer", default=None, metavar="OUTxIN", help="time one OSFTLinear, fp32 vs bf16")
    parser.add_argument("--tokens", type=int, default=4096, help="--layer: tokens per call")
    parser.add_argument("--reps", type=int, default=3, help="--layer: timed repetitions")
    parser.add_argument("--ratio", type=float, default=0.5, help="--layer/--curve: unfreeze_rank_ratio")
    parser.add_argument("--curve", action="store_true", help="tiny-model OSFT loss curve, fp32 vs bf16")
    parser.add_argument("--lr", type=float, default=1e-3, help="--curve: learning rate")
    parser.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    args = parser.parse_args(argv)

    if args.arm:
        print("ARM " + json.dumps(run_arm(args)))
        return 0
    if args.layer:
        print_layer(layer_bench(args))
        return 0

    if args.model_dir is None:
        from training_hub.tiny import make_tiny_model

        args.model_dir = str(make_tiny_model(tempfile.mkdtemp() + "/model", hidden_size=args.hidden_size,
                                             num_layers=args.layers, num_heads=max(4, args.hidden_size // 64),
                                             num_kv_heads=max(2, args.hidden_size // 128)))
    if args.curve:
        result = curve_bench(args)
        print("OSFT_CURVE " + json.dumps(result))
        return 0
    arms = args.arms.split(",")
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    passthrough = ["--model-dir", args.model_dir, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--device", args.device, "--dtype", args.dtype]
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
    config = {"device": args.device, "dtype": args.dtype, "threads": args.threads, "hidden_size": args.hidden_size,
              "layers": args.layers,
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
