"""Preference pairs for DPO: one row shape, one tokenization, one length policy for every backend.

A validated pair (see ``load_preference_data``) holds ``prompt``, ``chosen`` and ``rejected``, each a string or a
message list. Both DPO backends (``trl`` and ``native``) tokenize it by the same rules, TRL's ``DPOTrainer``
rules, so they train on the same tokens:

* ``uniform_pair``: all three fields of one kind. A string prompt with message completions becomes a user
  message; string completions of a conversational prompt become assistant messages.
* ``tokenize_pair``: conversational pairs go through the chat template (the prompt with the generation prompt,
  prompt+chosen and prompt+rejected as whole conversations); plain-text pairs are tokenized as text, with the EOS
  token appended to each completion. The completion starts where the tokenized prompt and prompt+completion first
  differ (usually right after the prompt).
* ``preference_length_policy``: keep the last ``max_prompt_length`` prompt tokens, then drop (or, with
  ``truncate_long_samples``, truncate the completions of) pairs whose prompt+longer completion exceeds
  ``max_length``.

Importing this module is cheap; ``datasets`` is needed only by the length policy, which works on a Dataset.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("training_hub")

__all__ = ["uniform_pair", "tokenize_pair", "length_policy", "preference_length_policy"]


def uniform_pair(pair: dict) -> dict:
    """``pair`` with prompt, chosen and rejected all strings or all message lists."""
    if not any(isinstance(pair[k], list) for k in ("prompt", "chosen", "rejected")):
        return dict(pair)
    prompt = pair["prompt"] if isinstance(pair["prompt"], list) else [{"role": "user", "content": pair["prompt"]}]
    completions = {k: pair[k] if isinstance(pair[k], list) else [{"role": "assistant", "content": pair[k]}]
                   for k in ("chosen", "rejected")}
    return {"prompt": prompt, **completions}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tokenizer, pair: dict) -> dict:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of one pair (see the module docstring for the rules)."""
    pair = uniform_pair(pair)
    if isinstance(pair["prompt"], list):
        def ids(messages, **kwargs):
            return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])

        prompt = ids(pair["prompt"], add_generation_prompt=True)
        chosen, rejected = ids(pair["prompt"] + pair["chosen"]), ids(pair["prompt"] + pair["rejected"])
    else:
        eos = tokenizer.eos_token or ""

        def ids(text):
            return list(tokenizer(text=text)["input_ids"])

        def with_eos(text):
            return text if text.endswith(eos) else text + eos

        prompt = ids(pair["prompt"])
        chosen = ids(pair["prompt"] + with_eos(pair["chosen"]))
        rejected = ids(pair["prompt"] + with_eos(pair["rejected"]))
    start = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    return {"prompt_ids": prompt[:start], "chosen_ids": chosen[start:], "rejected_ids": rejected[start:]}


def length_policy(dataset, *, max_len: int, truncate: bool, length_fn, truncate_fn, what: str):
    """Drop (or truncate) samples of a tokenized ``datasets.Dataset`` longer than ``max_len``; log how many.

    Returns ``(dataset, number of samples dropped or truncated)``.
    """
    too_long = sum(1 for ex in dataset if length_fn(ex) > max_len)
    if not too_long:
        return dataset, 0
    if truncate:
        logger.warning("%s: truncating %d sample(s) longer than %d tokens", what, too_long, max_len)
        return dataset.map(truncate_fn), too_long
    logger.warning("%s: dropping %d sample(s) longer than %d tokens (truncate_long_samples=True keeps them, "
                   "truncated)", what, too_long, max_len)
    kept = dataset.filter(lambda ex: length_fn(ex) <= max_len)
    if len(kept) == 0:
        raise ValueError(f"{what}: every sample is longer than {max_len} tokens; raise the limit or pass "
                         "truncate_long_samples=True")
    return kept, too_long


def preference_length_policy(dataset, config, what: str):
    """Keep the last ``max_prompt_length`` prompt tokens, then drop/truncate pairs longer than max_length.

    ``dataset`` holds ``prompt_ids``, ``chosen_ids`` and ``rejected_ids``; ``config`` is a ``DPOConfig``.
    """
    if config.max_prompt_length is not None:
        keep = config.max_prompt_length
        dataset = dataset.map(lambda ex: {"prompt_ids": ex["prompt_ids"][-keep:]})
    max_len = config.effective_max_length

    def length(ex):
        return len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))

    def truncate(ex):
        room = max(max_len - len(ex["prompt_ids"]), 0)  # a prompt of max_len tokens or more leaves no completion
        return {"chosen_ids": ex["chosen_ids"][:room], "rejected_ids": ex["rejected_ids"][:room]}

    return length_policy(dataset, max_len=max_len, truncate=config.truncate_long_samples, length_fn=length,
                         truncate_fn=truncate, what=what)
