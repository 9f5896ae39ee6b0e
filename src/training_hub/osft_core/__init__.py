"""OSFT (orthogonal subspace fine-tuning, Nayak et al. 2025, arXiv:2504.07097) as a small library.

Typical use inside a training loop::

    summary = apply_osft(model, unfreeze_rank_ratio=0.25)            # once, before the optimizer is built
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=...)
    for batch in batches:
        loss = model(**batch).loss; loss.backward()
        project_gradients(model)                                     # before the step (and before clipping)
        optimizer.step(); optimizer.zero_grad()
        project_parameters(model)                                    # after the step
    model.save_pretrained(out_dir, state_dict=dense_state_dict(model))   # an ordinary HF checkpoint

See docs/osft.md.
"""

from training_hub.osft_core.decompose import apply_osft, frozen_rank, osft_modules, osft_trainable_parameters
from training_hub.osft_core.linear import OSFTLinear
from training_hub.osft_core.project import project_gradients, project_parameters
from training_hub.osft_core.reconstruct import dense_state_dict
from training_hub.osft_core.targets import default_target_patterns, find_targets

__all__ = [
    "OSFTLinear", "apply_osft", "default_target_patterns", "dense_state_dict", "find_targets", "frozen_rank",
    "osft_modules", "osft_trainable_parameters", "project_gradients", "project_parameters",
]
