"""GRPO's two formulas as small pure functions: group-relative advantages and the clipped policy-ratio loss.

Advantages (Shao et al., 2024): each prompt's ``G`` completions form a group; a completion's advantage is its
reward minus the group's mean reward, divided by the group's standard deviation (Bessel-corrected, plus 1e-4) for
GRPO, and not divided for Dr. GRPO (Liu et al., 2025), which removes that per-group scaling.

Loss, per completion token ``t`` of completion ``i`` (PPO's clipped surrogate, with an optional KL term)::

    ratio_t = exp(logp_t - old_logp_t)
    loss_t  = -min(ratio_t * A_i, clip(ratio_t, 1 - epsilon, 1 + epsilon) * A_i) + beta * kl_t
    kl_t    = ratio_t * (exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1)          (only when beta > 0)

(``kl_t``: the k3 estimator of KL(policy || reference), weighted by the ratio because the tokens were sampled from
the old policy; TRL's default ``use_bias_correction_kl=True``.)

and the step's loss is ``sum_t weight_t * loss_t`` over all completion tokens of the step:

* GRPO: ``weight_t = 1 / (N * len_i)``: each completion's mean token loss, averaged over the step's N completions;
* Dr. GRPO: ``weight_t = 1 / (N * max_tokens)``: a constant normaliser, so long completions are not favoured.

With one update per batch ``old_logp`` is ``logp`` detached (ratio 1, nothing clipped, the plain policy gradient);
with more, it is the log-prob under the policy that generated the batch. TRL's ``GRPOTrainer`` computes the same
quantities for ``loss_type="grpo"`` / ``"dr_grpo"`` (tests/test_grpo.py compares them).

Torch is imported lazily so importing :mod:`training_hub` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["group_advantages", "policy_loss", "token_weights"]


def group_advantages(rewards: "torch.Tensor", group_size: int, scale: bool) -> "torch.Tensor":
    """``rewards``: (num_prompts * group_size,), grouped consecutively. Returns the advantages, same shape."""
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else grouped.new_zeros(grouped.shape[0], 1)
        centred = centred / (std + 1e-4)
    return centred.view(-1)


def token_weights(lengths: list[int], num_sequences: int, max_tokens: int, dr_grpo: bool) -> list[float]:
    """One weight per completion token (sequences in order) that turns token losses into the step's loss."""
    weights: list[float] = []
    for n in lengths:
        weights.extend([1.0 / (num_sequences * (max_tokens if dr_grpo else max(n, 1)))] * n)
    return weights


def policy_loss(logps: "torch.Tensor", old_logps: "torch.Tensor", advantages: "torch.Tensor",
                weights: "torch.Tensor", *, epsilon: float, beta: float = 0.0,
                ref_logps: "torch.Tensor | None" = None) -> tuple["torch.Tensor", dict]:
    """The weighted clipped loss over a set of completion tokens (all 1-D, one entry per token; ``advantages`` is
    the token's completion's advantage). Returns (loss, sums) where ``sums`` holds detached per-token sums for the
    step's statistics: ``clipped`` (tokens whose ratio left the trust region in the direction of the advantage),
    ``kl`` (sum of kl_t; 0 without a reference), ``tokens``."""
    import torch

    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
    kl = torch.zeros_like(per_token)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("policy_loss: beta != 0 needs ref_logps")
        delta = ref_logps - logps
        kl = (torch.exp(delta) - delta - 1) * ratio  # importance-weighted: the tokens came from the old policy
        per_token = per_token + beta * kl
    loss = (per_token * weights).sum()
    outside = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    return loss, {"clipped": outside.sum().item(), "kl": kl.detach().sum().item(), "tokens": logps.numel()}
