"""Built-in GRPO reward functions (upstream's ``training_hub.algorithms.rewards``); defined in
:mod:`training_hub.data.rewards`, where the engine and the backends can use them."""

from training_hub.data.rewards import binary_reward, exact_match_reward, tool_call_reward, tool_call_score

__all__ = ["binary_reward", "exact_match_reward", "tool_call_reward", "tool_call_score"]
