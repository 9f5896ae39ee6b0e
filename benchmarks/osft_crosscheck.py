"""Cross-check our OSFT against the reference implementation (rhai-innovation-mini-trainer), single process, CPU.

Installs nothing. Where ``mini_trainer`` is importable, both implementations decompose the same tiny model, then
take the same projected AdamW steps on the same batches; the script reports the largest differences in the
decomposition (singular values, reconstructed weights), in every weight after each step, and in the logits.
Where it is not importable, it says so and exits 0.

The reference's ``rank_ratio`` is the FROZEN fraction: rank_ratio = 1 - unfreeze_rank_ratio. Its top-k is
floor(min(out, in) * rank_ratio), ours floor(min(out, in) * (1 - unfreeze_rank_ratio)); the default ratios are exact
in binary so both agree, and the script checks that they do.

Only the reference's OSFT module is needed: when the package is present but its ``__init__`` cannot import (e.g.
``pip install --target DIR --no-deps rhai-innovation-mini-trainer`` leaves numba out), ``mini_trainer.osft_utils``
is loaded on its own. Run with the reference on the path, e.g.::

    PYTHONPATH=/tmp/mt .venv/bin/python benchmarks/osft_crosscheck.py
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import tempfile
import types


def import_reference():
    """``mini_trainer.osft_utils`` or None (with the reason printed)."""
    try:
        return importlib.import_module("mini_trainer.osft_utils")
    except ImportError as err:
        first_error = err
    spec = importlib.util.find_spec("mini_trainer") if "mini_trainer" not in sys.modules else None
    if spec is None or not spec.submodule_search_locations:
        print(f"SKIP: rhai-innovation-mini-trainer is not importable here ({first_error}); "
              f"nothing to cross-check. Install it (e.g. `pip install --target /tmp/mt --no-deps "
              f"rhai-innovation-mini-trainer`) and run with PYTHONPATH=/tmp/mt.")
        return None
    # The package is there but its __init__ imports the whole trainer; load only the OSFT module.
    for name in [n for n in sys.modules if n == "mini_trainer" or n.startswith("mini_trainer.")]:
        del sys.modules[name]
    package = types.ModuleType("mini_trainer")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["mini_trainer"] = package
    try:
        module = importlib.import_module("mini_trainer.osft_utils")
    except ImportError as err:
        print(f"SKIP: mini_trainer found at {package.__path__} but its OSFT module cannot import ({err})")
        return None
    print(f"note: `import mini_trainer` failed ({first_error}); loaded mini_trainer.osft_utils on its own")
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unfreeze-rank-ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--arch", default="qwen2", choices=["qwen2", "llama"])
    parser.add_argument("--model-dir", default=None, help="an HF causal LM folder (default: a fresh tiny model)")
    args = parser.parse_args(argv)

    reference = import_reference()
    if reference is None:
        return 0

    import torch
    import transformers

    from training_hub.osft_core import (apply_osft, dense_state_dict, project_gradients, project_parameters)
    from training_hub.tiny import make_tiny_model

    torch.manual_seed(0)
    model_dir = args.model_dir or make_tiny_model(tempfile.mkdtemp() + "/model", arch=args.arch)
    ours = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    summary = apply_osft(ours, unfreeze_rank_ratio=args.unfreeze_rank_ratio)

    base_cls = type(transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    ref_cls = reference.create_osft_model_class(base_cls)
    ref = ref_cls.from_pretrained(model_dir, rank_ratio=1 - args.unfreeze_rank_ratio,
                                  target_patterns=summary["target_patterns"], initialize_osft=True,
                                  dtype=torch.float32)
    ref_keys = {key[: -len(".weight")]: key for key in ref.osft_config}
    result = {"unfreeze_rank_ratio": args.unfreeze_rank_ratio, "steps": args.steps, "lr": args.lr,
              "targets": len(summary["targets"]), "same_targets": sorted(ref_keys) == sorted(summary["targets"]),
              "same_frozen_rank": all(ref.osft_config.get(f"{n}.weight") == k
                                      for n, k in summary["frozen_rank"].items())}

    def weights(model, is_ref):
        if not is_ref:
            return dense_state_dict(model)
        state = {k: v for k, v in model.state_dict().items() if "osft" not in k}
        for name, key in ref_keys.items():
            state[key] = model._reconstruct_weight(key, upcast_dtype=torch.float32, output_dtype=torch.float32)
        return state

    def max_diff(a, b):
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

    def worst_key(a, b):
        return max(a, key=lambda k: (a[k].float() - b[k].float()).abs().max().item())

    # decomposition
    s_diff = 0.0
    for name in summary["targets"]:
        mine = ours.get_submodule(name)
        theirs = ref.get_submodule(name)
        s_ours = torch.cat([mine.S_high, mine.S_low])
        s_ref = torch.cat([theirs.osft_S_high, theirs.osft_params.S_low])
        s_diff = max(s_diff, (s_ours - s_ref).abs().max().item())
    result["decomposition_max_abs_diff_singular_values"] = s_diff
    w_ours, w_ref = weights(ours, False), weights(ref, True)
    assert set(w_ours) == set(w_ref), sorted(set(w_ours) ^ set(w_ref))
    result["decomposition_max_abs_diff_weights"] = max_diff(w_ours, w_ref)

    # the same projected AdamW steps on the same batches
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=args.lr)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    w_start = {k: v.clone() for k, v in weights(ours, False).items()}
    per_step = []
    for _ in range(args.steps):
        ids = torch.randint(0, ours.config.vocab_size, (4, 32), generator=gen)
        losses = []
        for model, opt, is_ref in ((ours, opt_ours, False), (ref, opt_ref, True)):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.project_gradients() if is_ref else project_gradients(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.project_parameters() if is_ref else project_parameters(model)
            losses.append(loss.item())
        w_ours, w_ref = weights(ours, False), weights(ref, True)
        per_step.append({"loss_ours": losses[0], "loss_ref": losses[1],
                         "max_abs_weight_diff": max_diff(w_ours, w_ref),
                         "max_abs_target_weight_diff": max_diff({k: w_ours[k] for k in ref_keys.values()}, w_ref),
                         "max_abs_weight_change": max_diff(w_ours, w_start),
                         "worst_weight": worst_key(w_ours, w_ref)})
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=gen)
    with torch.no_grad():
        result["logits_max_abs_diff_after_steps"] = (ours(input_ids=ids).logits - ref(input_ids=ids).logits
                                                     ).abs().max().item()
    result["per_step"] = per_step
    result["max_abs_weight_diff"] = max(s["max_abs_weight_diff"] for s in per_step)

    print("OSFT_CROSSCHECK " + json.dumps(result))
    print(f"\nours vs mini_trainer, unfreeze_rank_ratio={args.unfreeze_rank_ratio} (reference rank_ratio="
          f"{1 - args.unfreeze_rank_ratio}), {result['targets']} targets, same targets: {result['same_targets']}, "
          f"same k: {result['same_frozen_rank']}")
    print(f"  decomposition: max |dS| = {s_diff:.2e}, max |dW| = {result['decomposition_max_abs_diff_weights']:.2e}")
    print(f"  {'step':>4}  {'loss ours':>10}  {'loss ref':>10}  {'max |dW| all':>13}  {'max |dW| targets':>16}  "
          f"{'max |W - W0| (ours)':>19}")
    for i, s in enumerate(per_step, 1):
        print(f"  {i:>4}  {s['loss_ours']:>10.6f}  {s['loss_ref']:>10.6f}  {s['max_abs_weight_diff']:>13.2e}  "
              f"{s['max_abs_target_weight_diff']:>16.2e}  {s['max_abs_weight_change']:>19.2e}  "
              f"(worst: {s['worst_weight']})")
    print(f"  logits after {args.steps} steps: max |d| = {result['logits_max_abs_diff_after_steps']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
