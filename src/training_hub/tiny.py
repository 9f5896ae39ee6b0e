"""A tiny, randomly initialised chat model (or text encoder) built offline, for tests, demos and benchmarks.

``make_tiny_model(out_dir)`` trains a byte-level BPE tokenizer on a small corpus, builds a small Qwen2 (or
Llama) causal LM with random weights, and saves both as an ordinary Hugging Face folder that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load. Nothing is downloaded.

The folder holds a ChatML chat template whose assistant turns are wrapped in ``{% generation %}`` markers, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` (and TRL's ``assistant_only_loss``) work.

``arch="bert"`` builds a tiny BERT encoder with a WordPiece tokenizer instead (no chat template): a plain Hugging
Face encoder directory, e.g. for ``embedding_sft`` (sentence-transformers adds mean pooling to it).

Importing this module is cheap: torch, transformers and tokenizers are imported inside the functions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from training_hub.fsutil import atomic_directory

__all__ = ["make_tiny_model", "demo_data_path", "labelled_texts", "CHATML_TEMPLATE", "SPECIAL_TOKENS"]

ARCHS = ("qwen2", "llama", "bert")
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# ChatML. The assistant's content and its <|im_end|> are inside {% generation %} so they count as assistant
# tokens; the "<|im_start|>assistant\n" header and the newline after <|im_end|> do not. No default system prompt.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{- raise_exception('Unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{%- if message['reasoning_content'] is defined and message['reasoning_content'] -%}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n' -}}"
    "{%- endif -%}"
    "{{- (message['content'] or '') + '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Generic English so that ordinary prose tokenizes into sensible pieces, not only the demo questions.
_GENERIC_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can learn short answers to simple questions, but it
needs clean data and a steady learning rate. Training a language model means showing it text and asking it to
predict the next token, again and again, until the loss goes down.

Once upon a time there was a little village by the river. Every morning the baker opened his shop, the children
walked to school, and the farmers went out to their fields. In the evening the people met in the square to talk
about the weather, the harvest and the news from the city.

Please write a short summary of the following text. Explain your reasoning step by step, then give the final
answer. If you are not sure, say so. Here is an example: the sum of two and three is five, and ten minus four
is six. Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2024 appear in many documents.

def add(a, b):
    return a + b

print("Hello, world!")  # comments, (brackets), [lists], {braces}, <tags>, "quotes" and 'apostrophes'.
Email: someone@example.com; path: /home/user/data.jsonl; url: https://example.org/page?q=1&x=2 - 50% off!
<think>
Let me think about this carefully before answering.
</think>
The system prompt, the user message, the assistant reply and the tool result are the four roles of a chat.
"""


def demo_data_path(name: str = "chat.jsonl") -> Path:
    """Path of a data file bundled in ``training_hub/demo_data`` (default: the demo chat data set)."""
    path = Path(__file__).resolve().parent / "demo_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"no bundled demo data file {name!r} (looked in {path.parent})")
    return path


# Labelled synthetic requests for embedding tests and benchmarks: a few topic words in shared filler.
_TOPICS = (
    ("invoice", "payment", "refund", "charge", "bill", "price", "card", "account", "money", "receipt"),
    ("error", "crash", "install", "server", "bug", "update", "login", "password", "screen", "code"),
    ("flight", "hotel", "train", "ticket", "airport", "trip", "booking", "luggage", "city", "river"),
    ("recipe", "bake", "oven", "flour", "sugar", "soup", "kitchen", "dinner", "bread", "morning"),
)
_FILLER = ("please", "help", "me", "with", "the", "my", "i", "need", "can", "you", "today", "about", "a", "question",
           "again", "this", "is", "not", "what", "should", "do", "now", "thanks", "there", "some", "and", "for")


def labelled_texts(per_label: int, *, num_labels: int = 4, topic_words: int = 2, filler_words: int = 6,
                   seed: int = 0) -> list[dict]:
    """``per_label`` synthetic texts for each of ``num_labels`` (<= 4) topics: ``{"text": ..., "label": i}``.

    Each text is ``topic_words`` words of its topic among ``filler_words`` words shared by every topic, shuffled,
    so a label is recognisable from a minority of its words. Deterministic for a ``seed``.
    """
    import random

    if not 1 <= num_labels <= len(_TOPICS):
        raise ValueError(f"labelled_texts: num_labels must be 1..{len(_TOPICS)}, got {num_labels}")
    rng = random.Random(seed)
    rows = []
    for _ in range(per_label):
        for label in range(num_labels):
            words = rng.sample(_TOPICS[label], topic_words) + rng.choices(_FILLER, k=filler_words)
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "label": label})
    return rows


def _default_corpus() -> Iterator[str]:
    """The demo chat data, one text per sample with each message as "role\ncontent", then generic English."""
    with open(demo_data_path(), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield "\n".join(f"{m['role']}\n{m['content']}" for m in json.loads(line)["messages"])
    yield from _GENERIC_TEXT.split("\n\n")


def _check_args(arch, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size,
                max_position_embeddings) -> None:
    """Raise one ValueError listing every problem with the size arguments."""
    problems = []
    if arch not in ARCHS:
        problems.append(f"arch must be one of {', '.join(map(repr, ARCHS))}, got {arch!r}")
    for name, value in [("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads), ("max_position_embeddings", max_position_embeddings)]:
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive int, got {value!r}")
    if intermediate_size is not None and (not isinstance(intermediate_size, int) or intermediate_size < 1):
        problems.append(f"intermediate_size must be a positive int or None, got {intermediate_size!r}")
    if isinstance(hidden_size, int) and isinstance(num_heads, int) and num_heads > 0 and hidden_size % num_heads:
        problems.append(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if isinstance(num_heads, int) and isinstance(num_kv_heads, int) and num_kv_heads > 0 and num_heads % num_kv_heads:
        problems.append(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < min_vocab:
        problems.append(f"vocab_size must be an int >= {min_vocab} (256 bytes + special tokens), got {vocab_size!r}")
    if problems:
        raise ValueError("make_tiny_model: " + "; ".join(problems))


def _train_tokenizer(corpus: Iterable[str], vocab_size: int, model_max_length: int):
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it as a PreTrainedTokenizerFast.

    The normalizer and pre-tokenizer are the ones transformers' ``Qwen2Tokenizer`` installs: for a folder whose
    config says ``model_type: qwen2``, ``AutoTokenizer`` rebuilds the tokenizer with that class and replaces the
    pipeline saved in tokenizer.json, so any other pipeline would tokenize differently after a reload.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte has a token: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,  # never produced (byte-level); set so every tokenizer class agrees on it
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _train_wordpiece(corpus: Iterable[str], vocab_size: int, model_max_length: int):
    """A lower-casing WordPiece tokenizer (BERT's pipeline: ``[CLS] text [SEP]``) whose vocabulary is built here,
    deterministically: the special tokens, every printable ASCII character and every character of ``corpus`` (alone
    and as a ``##`` continuation, so any word encodes), then the most frequent words of ``corpus`` (ties
    alphabetical). The ``tokenizers`` WordPiece trainer breaks ties differently from run to run."""
    import string
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in corpus:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted(set(string.printable.strip().lower()) | {c for word in counts for c in word})
    vocab = [*BERT_SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    vocab += words[:max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    return BertTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, pad_token="[PAD]",
                             unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _build_encoder(tokenizer, *, hidden_size, num_layers, num_heads, intermediate_size, max_position_embeddings,
                   seed):
    """A randomly initialised fp32 BERT encoder (no head) whose weights depend only on the arguments and ``seed``."""
    import torch
    import transformers

    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings, pad_token_id=tokenizer.pad_token_id, dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.BertModel(config)
    return model.to(torch.float32).eval()


def _build_model(arch: str, tokenizer, *, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
                 max_position_embeddings, seed):
    """A randomly initialised fp32 causal LM whose weights depend only on the arguments and ``seed``."""
    import torch
    import transformers

    config_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[arch]
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    # Fork the RNG so that building a model neither depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(torch.float32).eval()


def make_tiny_model(
    out_dir: str | os.PathLike,
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 1024,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Build a tiny random chat model with its own tokenizer, offline, and save it as a Hugging Face folder.

    Args:
        out_dir: folder to write (config, safetensors weights, tokenizer with chat template, generation config).
            It must not exist or be empty, unless ``overwrite=True``.
        arch: ``"qwen2"`` or ``"llama"`` (causal chat models), or ``"bert"`` (an encoder with a WordPiece
            tokenizer and no chat template; ``num_kv_heads`` does not apply).
        hidden_size, num_layers, num_heads, num_kv_heads: transformer sizes.
        intermediate_size: MLP width; ``None`` means ``4 * hidden_size``.
        vocab_size: target BPE vocabulary size, special tokens included. The model's vocabulary is the
            tokenizer's real size, which is smaller when the corpus does not support that many merges
            (the default corpus supports about 1,280 tokens; pass a larger ``corpus`` for more).
        max_position_embeddings: context length of the model and ``model_max_length`` of the tokenizer.
        seed: seed of the weight initialisation; the same arguments give the same weights.
        corpus: texts to train the tokenizer on; default: the bundled demo chat data plus generic English.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        The path of the written folder.
    """
    _check_args(arch, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size,
                max_position_embeddings)
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ValueError(f"make_tiny_model: {out_dir} exists and is not an empty folder (pass overwrite=True)")

    if arch == "bert":  # the default vocabulary also covers the words of labelled_texts()
        words = [" ".join(topic) for topic in _TOPICS] + [" ".join(_FILLER)]
        tokenizer = _train_wordpiece([*_default_corpus(), *words] if corpus is None else corpus, vocab_size,
                                     max_position_embeddings)
        encoder = _build_encoder(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                 intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                                 seed=seed)
        with atomic_directory(out_dir, prefix=f".{out_dir.name}.tmp-") as tmp:
            encoder.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return out_dir
    tokenizer = _train_tokenizer(_default_corpus() if corpus is None else corpus, vocab_size,
                                 max_position_embeddings)
    model = _build_model(arch, tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                         max_position_embeddings=max_position_embeddings, seed=seed)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
        do_sample=False,
    )

    # Write to a temporary sibling folder, then rename: a failure never leaves a complete-looking folder.
    with atomic_directory(out_dir, prefix=f".{out_dir.name}.tmp-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
