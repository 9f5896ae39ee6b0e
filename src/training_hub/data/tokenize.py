"""Chat-template rendering and exact loss masks, from the token boundaries of each turn.

How a mask is found, for any chat template (with or without ``{% generation %}`` markers):

1. The whole conversation is rendered once with the tokenizer's chat template and tokenized once, keeping each
   token's character offsets.
2. Turn boundaries come from rendering prefixes of the conversation with the same template (never from searching
   for message text). For the assistant message ``k``:
   - it starts where ``render(messages[:k], add_generation_prompt=True)`` ends: after the assistant header;
   - it ends where ``render(messages[:k + 1])`` ends, minus trailing whitespace. So the loss covers the
     assistant's reasoning and content and everything the template writes after them up to the next turn,
     which is the end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>`` ...), but not the newline after it.
   - with ``unmask``, one span runs from the end of the leading system message(s), or from the start when there
     is none, to the end of the text.
   Each prefix must render as a prefix of the whole conversation. A template that rewrites earlier turns once
   later ones follow (for example one that drops ``reasoning_content`` of earlier assistant turns) fails with
   an error naming the sample, instead of producing a wrong mask.
3. A token carries loss when its character span overlaps a loss span. Labels follow the Hugging Face convention
   (not shifted): ``labels[i] == input_ids[i]`` where the token at ``i`` is trained, else -100.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable

IGNORE_INDEX = -100
KEEP, TOO_LONG, NO_LOSS = 0, 1, 2

Render = Callable[[list, bool], str]


class TemplateMismatch(ValueError):
    """A prefix of the conversation does not render as a prefix of the whole conversation."""


def backend_tokenizer(tokenizer):
    """The tokenizer's Rust ``tokenizers.Tokenizer``, without truncation or padding (we apply our own policy)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; the data pipeline needs character "
                         "offsets, which only fast (Rust `tokenizers`) tokenizers provide")
    if backend.truncation is not None or backend.padding is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return backend


class ChatRenderer:
    """``render(messages, add_generation_prompt) -> str`` with a tokenizer's chat template.

    The output equals ``tokenizer.apply_chat_template(messages, tokenize=False, ...)``; the compiled template is
    called directly because each conversation is rendered several times (once per turn boundary). Pickling keeps
    only the template text, so ``datasets.map(num_proc=...)`` can ship it to worker processes.
    """

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '')}) has no chat "
                             "template; chat data needs one (set tokenizer.chat_template), or use "
                             "is_pretraining=True for plain documents")
        self.template = tokenizer.get_chat_template()
        self.variables = dict(tokenizer.special_tokens_map)
        self._compile()

    def _compile(self) -> None:
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template
        except ImportError:  # the private helper moved: use the public renderer (same text, a little slower)
            self._compiled = None
        else:
            self._compiled = _compile_jinja_template(self.template)

    def __getstate__(self) -> dict:
        return {"template": self.template, "variables": self.variables}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._compile()

    def __call__(self, messages: list, add_generation_prompt: bool) -> str:
        if self._compiled is None:
            from transformers.utils.chat_template_utils import render_jinja_template

            return render_jinja_template([messages], chat_template=self.template,
                                         add_generation_prompt=add_generation_prompt, **self.variables)[0][0]
        return self._compiled.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.variables)


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as ``apply_chat_template`` hands them to the template.

    Null fields (which Arrow adds for optional keys) are dropped and ``reasoning_content`` is also offered as
    ``thinking``, the name some templates read.
    """
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        if "reasoning_content" in message:
            message = {"thinking": message["reasoning_content"], **message}
        out.append(message)
    return out


def _start_of_turn(full: str, head: str, render: Render, messages: list, k: int) -> int:
    """Where assistant message ``k`` starts in ``full``: the end of the generation prompt rendered before it."""
    if full.startswith(head):
        return len(head)
    # Some templates write a different header when generating (e.g. an opening <think>): the turn starts where
    # the two renderings part, which must still be after the end of the previous message.
    start = next((i for i, (a, b) in enumerate(zip(full, head)) if a != b), min(len(full), len(head)))
    before = render(messages[:k], False)
    if not full.startswith(before) or start < len(before):
        raise TemplateMismatch(f"messages[{k}]: the generation prompt before this assistant message does not "
                               "render as a prefix of the conversation")
    return start


def loss_spans(render: Render, messages: list[dict], unmask: bool) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry loss (see the module docstring)."""
    full = render(messages, False)
    if unmask:
        first = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
        if first == 0:
            return full, [(0, len(full))]
        system = render(messages[:first], False)
        if not full.startswith(system):
            raise TemplateMismatch("the system prompt does not render as a prefix of the conversation")
        return full, [(len(system), len(full))]
    spans = []
    last = len(messages) - 1
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _start_of_turn(full, render(messages[:k], True), render, messages, k)
        turn = full if k == last else render(messages[:k + 1], False)
        if not full.startswith(turn):
            raise TemplateMismatch(f"messages[{k}]: the template renders this assistant message differently once "
                                   "later messages follow (it rewrites earlier turns, e.g. drops their "
                                   "reasoning_content); split the conversation so this turn is the last one")
        spans.append((start, max(start, len(turn.rstrip()))))
    return full, spans


def labels_from_spans(encoding, ids: list[int], spans) -> list[int]:
    """Labels that equal ``ids`` on every token whose characters overlap a span, -100 elsewhere.

    ``encoding`` is the ``tokenizers.Encoding`` of ``ids``. Its ``char_to_token`` finds, in Rust, the tokens
    holding a span's first and last characters; the range then grows over neighbours that share those
    characters (a multi-byte character split into byte tokens). Characters no token covers (a normalizer can
    drop some) fall back to a search over all offsets.
    """
    labels = [IGNORE_INDEX] * len(ids)
    for span_start, span_end in spans:
        if span_end <= span_start:
            continue
        first, last = encoding.char_to_token(span_start), encoding.char_to_token(span_end - 1)
        if first is None or last is None:
            first, stop = _overlap_by_offsets(encoding.offsets, span_start, span_end)
        else:
            stop = last + 1
            while first > 0 and _chars(encoding, first - 1, span_end)[1] > span_start:
                first -= 1
            while stop < len(ids) and _chars(encoding, stop, span_end)[0] < span_end:
                stop += 1
        labels[first:stop] = ids[first:stop]
    return labels


def _chars(encoding, token: int, outside: int) -> tuple[int, int]:
    """The token's character span; for a token without one, an empty span at ``outside`` (stops the loops)."""
    span = encoding.token_to_chars(token)
    return span if span is not None else (outside, outside)


def _overlap_by_offsets(offsets, span_start: int, span_end: int) -> tuple[int, int]:
    """Index range of the tokens whose ``(start, end)`` offsets overlap ``[span_start, span_end)``."""
    if not offsets:
        return 0, 0
    starts, ends = zip(*offsets)
    return bisect_right(ends, span_start), bisect_left(starts, span_end)


def count_loss_tokens(labels: list[int]) -> int:
    """Tokens that receive loss after the usual shift by one: ``labels[1:]`` that are not -100."""
    return len(labels) - 1 - labels[1:].count(IGNORE_INDEX) if labels else 0


def finish_sample(ids: list[int], labels: list[int], max_seq_len: int, truncate: bool) -> dict:
    """Apply the length policy to one tokenized sample; ``status`` says whether it is kept and why not."""
    length = len(ids)
    truncated = False
    if length > max_seq_len:
        if not truncate:
            return {"input_ids": [], "labels": [], "num_loss_tokens": 0, "length": length,
                    "status": TOO_LONG, "truncated": False}
        ids, labels, truncated = ids[:max_seq_len], labels[:max_seq_len], True
    loss = count_loss_tokens(labels)
    return {"input_ids": ids, "labels": labels, "num_loss_tokens": loss, "length": len(ids),
            "status": KEEP if loss else NO_LOSS, "truncated": truncated}


def tokenize_chats(conversations: list[list[dict]], unmask: list[bool], render: Render, backend, *,
                   max_seq_len: int, truncate: bool) -> tuple[list[dict], list[tuple[int, str]]]:
    """Tokenize a batch of conversations with exact masks and the length policy.

    Returns one result per conversation (see ``finish_sample``) and a list of ``(index, message)`` for the
    conversations the template could not render consistently (their result is ``None``).
    """
    texts, all_spans, failures = [], [], []
    for i, (messages, unmask_one) in enumerate(zip(conversations, unmask)):
        try:
            text, spans = loss_spans(render, template_messages(messages), unmask_one)
        except Exception as e:  # a template may raise anything (raise_exception, undefined variables ...)
            failures.append((i, f"{type(e).__name__}: {e}" if not isinstance(e, TemplateMismatch) else str(e)))
            text, spans = "", []
        texts.append(text)
        all_spans.append(spans)
    failed = {i for i, _ in failures}
    results = []
    for i, encoding in enumerate(backend.encode_batch(texts, add_special_tokens=False)):
        if i in failed:
            results.append(None)
            continue
        ids = encoding.ids
        results.append(finish_sample(ids, labels_from_spans(encoding, ids, all_spans[i]), max_seq_len, truncate))
    return results, failures


def tokenize_documents(documents: list[str], backend, eos_id: int) -> list[list[int]]:
    """Token ids of each document followed by the end-of-sequence token (no BOS is added)."""
    return [encoding.ids + [eos_id] for encoding in backend.encode_batch(documents, add_special_tokens=False)]
