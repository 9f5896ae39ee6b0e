"""AdamW whose two moment estimates are stored in bfloat16: half of AdamW's optimizer memory.

``torch.optim.AdamW`` keeps its moments in the parameters' dtype, fp32 master weights here, so a full fine-tune
holds 8 bytes of optimizer state per trainable parameter (an 8B model: 60 GiB). With
``optimizer_state_dtype="bfloat16"`` the moments are stored in bf16 (4 bytes per parameter) and the update itself
is computed in fp32, one tensor at a time, so the only fp32 temporaries are those of the tensor being updated.
Ours because torch has no such option and the well-kept 8-bit optimizers (bitsandbytes) need CUDA; the update is
AdamW's (decoupled weight decay, bias correction), checked against ``torch.optim.AdamW`` in
``tests/test_optim.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


class AdamWBF16States(torch.optim.Optimizer):
    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)  # on the CPU: reading it never syncs a GPU
            for name in MOMENTS:
                state[name] = torch.zeros_like(param, dtype=torch.bfloat16, memory_format=torch.preserve_format)
        state["step"] += 1
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        grad = param.grad.float()
        exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        state["exp_avg"].copy_(exp_avg)
        state["exp_avg_sq"].copy_(exp_avg_sq)
        if group["weight_decay"]:
            param.mul_(1 - group["lr"] * group["weight_decay"])
        denominator = (exp_avg_sq.sqrt_() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        update = exp_avg.div_(denominator).mul_(group["lr"] / (1 - beta1 ** step))
        param.sub_(update.to(param.dtype))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, which casts every state tensor to its parameter's dtype: the moments go back to bf16."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for name in MOMENTS:
                if name in state:
                    state[name] = state[name].to(torch.bfloat16)
            if "step" in state:
                state["step"] = state["step"].float().cpu()
