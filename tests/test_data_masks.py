"""Loss masks: decoded loss-bearing tokens are exactly the assistant turns plus their end-of-turn token.

Three templates prove the rule is generic: the tiny model's ChatML (with {% generation %} markers), plain
ChatML without markers, and a Llama-3-like template whose end-of-turn token is <|eot_id|>.
"""

import json

import pytest

from training_hub.data import DataValidationError, prepare_sft_data

IM_END, EOT = "<|im_end|>", "<|eot_id|>"

PLAIN_CHATML = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and m.get('reasoning_content') %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + m['reasoning_content'] + '\\n</think>\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def chatml(role, content):
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def llama(role, content):
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from training_hub.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def load(tiny_dir, style):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    if style == "chatml_plain":
        tok.chat_template = PLAIN_CHATML
    elif style == "llama3_like":
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>",
                                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", EOT]})
        tok.chat_template = LLAMA3_LIKE
    return tok


STYLES = ("tiny_generation_markers", "chatml_plain", "llama3_like")


def assistant_text(style, message):
    """What the loss must cover for one assistant message under each template, written out literally."""
    if style == "llama3_like":  # this template ignores reasoning_content
        return message["content"] + EOT
    reasoning = message.get("reasoning_content")
    think = f"<think>\n{reasoning}\n</think>\n" if reasoning else ""
    return think + message["content"] + IM_END


def loss_runs(tok, row):
    """Decoded text of each contiguous run of loss-bearing tokens; also checks labels are unshifted ids."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def prepare(tmp_path, tok, records, **kwargs):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return prepare_sft_data(str(path), tok, max_seq_len=kwargs.pop("max_seq_len", 4096), **kwargs)


U = {"role": "user", "content": "What is 2 plus 3?"}
A = {"role": "assistant", "content": "5."}
S = {"role": "system", "content": "You are a careful assistant."}
CASES = {
    "single_turn": [U, A],
    "with_system": [S, U, A],
    "multi_turn": [S, U, A, {"role": "user", "content": "And 7 minus 4?"},
                   {"role": "assistant", "content": "It is 3."}],
    "tool_role": [U, {"role": "assistant", "content": "Let me look it up."},
                  {"role": "tool", "content": "{\"result\": 5}"}, {"role": "assistant", "content": "The tool says 5."}],
    "reasoning_content": [U, {"role": "assistant", "content": "5.", "reasoning_content": "2 + 3 = 5"}],
    "same_text_in_user_and_assistant": [{"role": "user", "content": "Say 5."}, {"role": "assistant", "content": "Say 5."}],
    "unicode": [{"role": "user", "content": "Caf\u00e9 \u4e2d\u6587?"}, {"role": "assistant", "content": "Oui \U0001f44d \u00e9t\u00e9."}],
}


@pytest.mark.parametrize("style", STYLES)
def test_loss_is_exactly_the_assistant_turns_with_end_of_turn(tmp_path, tiny_dir, style):
    tok = load(tiny_dir, style)
    prepared = prepare(tmp_path, tok, [{"messages": m} for m in CASES.values()])
    assert len(prepared.dataset) == len(CASES)
    for row, (name, messages) in zip(prepared.dataset, CASES.items()):
        expected = [assistant_text(style, m) for m in messages if m["role"] == "assistant"]
        assert loss_runs(tok, row) == expected, name
        # The tokens are exactly what transformers' apply_chat_template produces.
        assert row["input_ids"] == tok.apply_chat_template(messages, tokenize=True, return_dict=False), name
        assert row["length"] == len(row["input_ids"])
        assert row["num_loss_tokens"] == sum(label != -100 for label in row["labels"][1:])


def test_mask_equals_the_generation_marker_mask(tmp_path, tiny_dir):
    """With {% generation %} markers transformers can compute the assistant mask itself: ours is identical."""
    tok = load(tiny_dir, "tiny_generation_markers")
    prepared = prepare(tmp_path, tok, [{"messages": m} for m in CASES.values()])
    for row, messages in zip(prepared.dataset, CASES.values()):
        theirs = tok.apply_chat_template(messages, return_assistant_tokens_mask=True)["assistant_masks"]
        assert [int(label != -100) for label in row["labels"]] == theirs


@pytest.mark.parametrize("style", STYLES)
def test_alpaca_is_converted_and_trains_the_output(tmp_path, tiny_dir, style):
    tok = load(tiny_dir, style)
    prepared = prepare(tmp_path, tok, [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                                       {"instruction": "Say hi.", "output": "Hi!"}])
    turn = chatml if style != "llama3_like" else llama
    first, second = prepared.dataset
    assert tok.decode(first["input_ids"]).startswith(
        ("<|begin_of_text|>" if style == "llama3_like" else "") + turn("user", "Add the numbers.\n\n2 and 3"))
    assert loss_runs(tok, first) == [assistant_text(style, {"content": "5"})]
    assert loss_runs(tok, second) == [assistant_text(style, {"content": "Hi!"})]


@pytest.mark.parametrize("style", STYLES)
def test_unmask_trains_everything_but_the_system_prompt(tmp_path, tiny_dir, style):
    tok = load(tiny_dir, style)
    turn = chatml if style != "llama3_like" else llama
    multi = CASES["multi_turn"]
    records = [{"messages": multi, "unmask": True}, {"messages": multi}]
    per_sample = prepare(tmp_path, tok, records).dataset
    everything_after_system = "".join(turn(m["role"], m["content"]) for m in multi[1:])
    assert loss_runs(tok, per_sample[0]) == [everything_after_system]
    assert loss_runs(tok, per_sample[1]) == [assistant_text(style, multi[2]), assistant_text(style, multi[4])]

    run_wide = prepare(tmp_path, tok, [{"messages": multi}, {"messages": [U, A]}], unmask_messages=True).dataset
    assert loss_runs(tok, run_wide[0]) == [everything_after_system]
    bos = "<|begin_of_text|>" if style == "llama3_like" else ""  # no system prompt: everything is trained
    assert loss_runs(tok, run_wide[1]) == [bos + turn("user", U["content"]) + turn("assistant", A["content"])]


def test_template_that_rewrites_earlier_turns_fails_with_the_line(tmp_path, tiny_dir):
    tok = load(tiny_dir, "chatml_plain")
    # Shows reasoning only on the final message, like templates that drop earlier turns' reasoning.
    tok.chat_template = PLAIN_CHATML.replace("m.get('reasoning_content')", "m.get('reasoning_content') and loop.last")
    reasoning = {"role": "assistant", "content": "5.", "reasoning_content": "think"}
    records = [{"messages": [U, reasoning]}, {"messages": [U, reasoning, U, A]}]
    with pytest.raises(DataValidationError) as info:
        prepare(tmp_path, tok, records)
    [problem] = info.value.problems
    assert (problem.line, problem.field) == (2, "messages")
    assert "messages[1]" in problem.message and "rewrites earlier turns" in problem.message


def test_template_exception_is_reported_with_the_line(tmp_path, tiny_dir):
    tok = load(tiny_dir, "chatml_plain")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
                         "{{ raise_exception('this template has no tool role') }}{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    with pytest.raises(DataValidationError) as info:
        prepare(tmp_path, tok, [{"messages": CASES["single_turn"]}, {"messages": CASES["tool_role"]}])
    [problem] = info.value.problems
    assert problem.line == 2 and "this template has no tool role" in problem.message
    assert str(problem).startswith(f"{tmp_path / 'data.jsonl'}:2: messages: chat template: ")


def test_template_without_end_token_trains_content_without_trailing_newline(tmp_path, tiny_dir):
    tok = load(tiny_dir, "chatml_plain")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    row = prepare(tmp_path, tok, [{"messages": [U, {"role": "assistant", "content": "Five"}]}]).dataset[0]
    # The prompt ends with "assistant: " but the byte-level BPE makes one token of " Five": a token that
    # straddles the turn boundary overlaps the turn, so it carries loss (the space comes with it).
    assert loss_runs(tok, row) == [" Five"]


def test_generation_prompt_that_differs_from_the_rendered_turn(tmp_path, tiny_dir):
    """A template whose generation prompt opens a <think> block that finished turns do not have (as in
    DeepSeek-R1): the turn starts where the generation prompt and the finished turn part."""
    tok = load(tiny_dir, "chatml_plain")
    tok.chat_template = PLAIN_CHATML.replace("'<|im_start|>assistant\\n' }}{% endif %}",
                                             "'<|im_start|>assistant\\n<think>\\n' }}{% endif %}")
    assert tok.chat_template != PLAIN_CHATML
    rows = prepare(tmp_path, tok, [{"messages": CASES["multi_turn"]}]).dataset
    assert loss_runs(tok, rows[0]) == ["5." + IM_END, "It is 3." + IM_END]
