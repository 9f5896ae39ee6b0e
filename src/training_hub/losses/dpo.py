"""The DPO sigmoid loss (Rafailov et al., 2023, eq. 7) as a small pure function.

Given sequence log-probabilities ``log pi(y | x)`` (summed over the completion tokens only) of the chosen and
rejected completions under the policy and the frozen reference model::

    chosen_reward   = beta * (policy_chosen_logps   - ref_chosen_logps)
    rejected_reward = beta * (policy_rejected_logps - ref_rejected_logps)
    loss            = mean( -log sigmoid(chosen_reward - rejected_reward) )

The loss is the negative log-likelihood of the Bradley-Terry preference model whose reward is the scaled log-ratio
of policy to reference. At initialisation (policy == reference) every reward is 0 and the loss is log 2.
TRL's ``DPOTrainer`` with ``loss_type="sigmoid"`` computes the same quantity (tested in tests/test_dpo.py).

Torch is imported lazily so importing :mod:`training_hub` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["dpo_sigmoid_loss", "sequence_logps"]


def dpo_sigmoid_loss(
    policy_chosen_logps: "torch.Tensor",
    policy_rejected_logps: "torch.Tensor",
    ref_chosen_logps: "torch.Tensor",
    ref_rejected_logps: "torch.Tensor",
    beta: float,
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """DPO sigmoid loss over a batch of pairs.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(batch,)`` summed completion log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: ``(batch,)`` the same under the reference model (no gradient needed).
        beta: the DPO temperature (> 0); larger keeps the policy closer to the reference.

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: the scalar mean loss, and the detached per-pair implicit
        rewards ``beta * (policy - reference)``. ``(chosen_rewards > rejected_rewards).float().mean()`` is the
        preference accuracy and ``(chosen_rewards - rejected_rewards).mean()`` the reward margin.
    """
    import torch.nn.functional as F

    if beta <= 0:
        raise ValueError(f"dpo_sigmoid_loss: beta must be > 0, got {beta}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def sequence_logps(logits: "torch.Tensor", input_ids: "torch.Tensor", loss_mask: "torch.Tensor") -> "torch.Tensor":
    """Sum of ``log p(token_t | tokens_<t)`` over the positions where ``loss_mask`` is 1.

    Args:
        logits: ``(batch, seq, vocab)`` model output for ``input_ids``.
        input_ids: ``(batch, seq)``.
        loss_mask: ``(batch, seq)``, 1 on the completion tokens to score (0 on prompt and padding).

    Returns:
        ``(batch,)`` summed log-probabilities, computed in float32.
    """
    import torch

    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, 1:]
    token_logps = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * loss_mask[:, 1:].to(token_logps.dtype)).sum(dim=-1)
