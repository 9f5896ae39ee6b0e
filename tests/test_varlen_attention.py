"""engine.attention's varlen path, on CPU: the CUDA kernel replaced by a stand-in that computes exact per-sample
attention from cu_seqlens in flash-attention's conventions. What is tested is everything around the kernel:
pack()'s offsets, the layout and dtype transforms, GQA, the sliding-window mapping, the self-checks and fallbacks.
The kernels themselves run only on CUDA (benchmarks/gpu_check.py reports the chosen path and its errors)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from training_hub.engine import attention
from training_hub.engine.attention import NAME, VarlenKernel, packed_varlen, use_packed_attention
from training_hub.engine.batching import IGNORE_INDEX, pack
from training_hub.engine.loss import token_loss_sum

WINDOW = 4


def exact_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale, window, dropout, softcap):
    """Per-sample attention from cu_seqlens, in flash-attention's conventions: (T, H, D) half-precision inputs,
    grouped kv heads, window (left, right) inclusive; computed in fp32 and returned in the input dtype."""
    assert q.dtype in (torch.bfloat16, torch.float16) and q.dtype == k.dtype == v.dtype
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    assert cu_seqlens.dtype == torch.int32 and isinstance(max_seqlen, int) and dropout == 0.0 and softcap == 0.0
    bounds = cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0] and max_seqlen == max(b - a for a, b in zip(bounds, bounds[1:]))
    outputs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1).float() for x in (q, k, v))
        mask, causal = None, window == (-1, 0)
        if not causal:
            assert window[0] >= 0 and window[1] == 0
            i = torch.arange(b - a)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= window[0])
        outputs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale,
                                                      enable_gqa=True).transpose(0, 1))
    return torch.cat(outputs).to(q.dtype)


def kernel(fn=exact_varlen, name="test", **kw) -> VarlenKernel:
    return VarlenKernel(attention.VARLEN_PREFIX + name, f"stand-in {name}", fn, **kw)


EXACT = kernel()


def use_kernels(monkeypatch, *kernels):
    """Offer ``kernels`` to use_packed_attention as if on CUDA."""
    monkeypatch.setattr(attention, "varlen_kernels", lambda device: list(kernels))


def tiny(tiny_model_dir, window: bool = False, **config):
    """The shared tiny Qwen2 (4 query heads on 2 kv heads), fp32, SDPA; ``window``: its first layer attends over a
    sliding window of WINDOW tokens, its second over everything."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(tiny_model_dir)
    if window:
        model_config.layer_types, model_config.sliding_window = ["sliding_attention", "full_attention"], WINDOW
    for key, value in config.items():
        setattr(model_config, key, value)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=model_config, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    return model.eval()


def packed_row(vocab: int, lengths=(9, 3, 14, 6), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    return pack(ids, [[IGNORE_INDEX] * (len(x) // 3) + x[len(x) // 3:] for x in ids])


# ------------------------------------------------------------------------------------------------ bookkeeping

def test_pack_builds_cu_seqlens_once_per_micro_batch():
    row = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[1, 2, 3], [4, 5], [6, 7, 8, 9]], device="cpu")
    assert row["cu_seqlens"].dtype == torch.int32 and row["cu_seqlens"].tolist() == [0, 3, 5, 9]
    assert row["cu_seqlens"].tolist() == row["sample_bounds"] and row["max_seqlen"] == 4
    assert type(row["max_seqlen"]) is int  # a host int: no device sync to read it
    from training_hub.engine.distributed import empty_micro_batch

    empty = empty_micro_batch(torch.device("cpu"))  # what a rank with fewer micro-batches runs
    assert empty["cu_seqlens"].tolist() == [0, 1] and empty["max_seqlen"] == 1 and empty["num_targets"] == 0


def test_attention_kwargs_follow_the_implementation():
    row = pack([[1, 2], [3]], [[1, 2], [3]])
    assert attention.attention_kwargs(EXACT.name, row) == {attention.CU_SEQLENS_KWARG: row["cu_seqlens"],
                                                           attention.MAX_SEQLEN_KWARG: 2}
    assert attention.attention_kwargs(NAME, row) == {attention.BOUNDS_KWARG: [0, 2, 3]}
    assert attention.attention_kwargs("sdpa", row) == {}


def test_varlen_call_layout_dtype_gqa_and_window(tiny_model_dir):
    """What reaches the kernel from the model: (T, H, D) half tensors with 4 query and 2 kv heads (q and k come
    from rotary in fp32 under autocast), the row's own cu_seqlens tensor in every layer (not rebuilt), the
    module's scale, transformers' sliding_window=W as the inclusive (W - 1, 0), plain causal elsewhere."""
    model = tiny(tiny_model_dir, window=True)
    calls = []

    def recording(q, k, v, cu_seqlens, max_seqlen, **kw):
        calls.append(dict(shapes=(q.shape, k.shape, v.shape), dtypes={q.dtype, k.dtype, v.dtype}, cu=cu_seqlens,
                          max_seqlen=max_seqlen, window=kw["window"], scale=kw["scale"]))
        return exact_varlen(q, k, v, cu_seqlens, max_seqlen, **kw)

    recorder = kernel(recording, "recording")
    attention.register_kernel(recorder)
    model.set_attn_implementation(recorder.name)
    row = packed_row(model.config.vocab_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        token_loss_sum(model, row)
    head_dim = model.config.hidden_size // 4
    assert [c["window"] for c in calls] == [(WINDOW - 1, 0), (-1, 0)]
    for call in calls:
        assert call["shapes"] == ((32, 4, head_dim), (32, 2, head_dim), (32, 2, head_dim))
        assert call["dtypes"] == {torch.bfloat16} and call["cu"] is row["cu_seqlens"] and call["max_seqlen"] == 14
        assert call["scale"] == pytest.approx(head_dim ** -0.5)


def test_fp32_without_autocast_is_refused_not_silently_downcast():
    q = torch.randn(1, 4, 6, 8)
    k = v = torch.randn(1, 2, 6, 8)
    with pytest.raises(NotImplementedError, match="bf16 or fp16"):
        packed_varlen(type("M", (), {"training": False})(), q, k, v, None, kernel=EXACT)


def test_direct_call_with_contiguous_heads_first_tensors():
    """q/k/v that are not transformers' (1, T, H, D) views reach the kernel contiguous too, and the output is
    per-sample SDPA's, in transformers' (1, T, H, D) layout."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 12, 8, generator=g).bfloat16() for heads in (4, 2, 2))
    module = type("M", (), {"training": False})()
    out, _ = packed_varlen(module, q, k, v, None, kernel=EXACT, **{attention.CU_SEQLENS_KWARG: torch.tensor(
        [0, 5, 12], dtype=torch.int32), attention.MAX_SEQLEN_KWARG: 7})
    expected, _ = attention.packed_sdpa(module, q, k, v, None, sample_bounds=[0, 5, 12])
    assert out.shape == (1, 12, 4, 8) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ numerics

def _logits_and_grads(model, implementation: str, row: dict, autocast: bool):
    model.set_attn_implementation(implementation)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = token_loss_sum(model, row)
    loss.backward()
    return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("window", [False, True], ids=["causal", "sliding_window"])
def test_varlen_equals_per_sample_sdpa(tiny_model_dir, window):
    """Loss and gradients through the varlen path equal per-sample SDPA's: exactly (to bf16 rounding of the same
    fp32 attention) with a bf16 model, and to bf16 precision under autocast with the fp32 master weights."""
    attention.register()
    attention.register_kernel(EXACT)
    row = packed_row(300)
    model = tiny(tiny_model_dir, window=window).to(torch.bfloat16)
    loss_v, grads_v = _logits_and_grads(model, EXACT.name, row, autocast=False)
    loss_s, grads_s = _logits_and_grads(model, NAME, row, autocast=False)
    assert torch.equal(loss_v, loss_s)
    for name in grads_s:
        torch.testing.assert_close(grads_v[name], grads_s[name], rtol=0, atol=0, msg=name)
    model = tiny(tiny_model_dir, window=window)
    loss_v, grads_v = _logits_and_grads(model, EXACT.name, row, autocast=True)
    loss_s, grads_s = _logits_and_grads(model, NAME, row, autocast=True)
    assert float(loss_v) == pytest.approx(float(loss_s), rel=1e-2)
    for name in grads_s:
        scale = grads_s[name].abs().max().clamp_min(1e-3)
        assert float((grads_v[name] - grads_s[name]).abs().max() / scale) < 5e-2, name


def test_varlen_without_packed_kwargs_finds_samples_from_position_ids(tiny_model_dir):
    """A caller that passes only position ids (transformers' own packing convention) still gets per-sample
    attention, not one sequence across the row."""
    model = tiny(tiny_model_dir)
    attention.register_kernel(EXACT)
    model.set_attn_implementation(EXACT.name)
    row = packed_row(model.config.vocab_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        given = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False,
                      **attention.attention_kwargs(EXACT.name, row)).logits
        found = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits
    assert torch.equal(given, found)


# ------------------------------------------------------------------------------------------------ self-check

def test_self_check_chooses_varlen_in_half_precision(tiny_model_dir, monkeypatch):
    use_kernels(monkeypatch, EXACT)
    model = tiny(tiny_model_dir, window=True)
    choice = use_packed_attention(model, compute_dtype=torch.bfloat16)
    assert choice and choice.implementation == EXACT.name == model.config._attn_implementation
    assert choice.error < 1e-2 and choice.kernel_error < 1e-2 and "stand-in test" in choice.description
    fp32 = use_packed_attention(tiny(tiny_model_dir), compute_dtype=None)  # an fp32 run: flash has no fp32
    assert fp32 and fp32.implementation == NAME and fp32.error < attention.TOLERANCE


def _leaks(q, k, v, cu_seqlens, max_seqlen, **kw):  # ignores the sample bounds: one sequence across the row
    whole = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    return exact_varlen(q, k, v, whole, q.shape[0], **kw)


def _wide_window(q, k, v, cu_seqlens, max_seqlen, *, window, **kw):  # one key more than the window
    return exact_varlen(q, k, v, cu_seqlens, max_seqlen, window=(window[0] + 1, 0) if window[0] >= 0 else window,
                        **kw)


def _raises(*args, **kw):
    raise RuntimeError("FlashAttention only supports Ampere GPUs or newer")


@pytest.mark.parametrize("bad,why", [(_leaks, "differ by"), (_wide_window, "differ by"), (_raises, "Ampere")],
                         ids=["leaks_across_samples", "window_one_too_wide", "raises"])
def test_self_check_refuses_a_wrong_kernel_and_falls_back(tiny_model_dir, monkeypatch, caplog, bad, why):
    """A kernel that leaks, miscounts the window or fails is refused, the reason logged; the next kernel is
    tried, then per-sample SDPA."""
    use_kernels(monkeypatch, kernel(bad, "bad"))
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        choice = use_packed_attention(tiny(tiny_model_dir, window=True), compute_dtype=torch.bfloat16)
    assert choice.implementation == NAME and len(choice.refused) == 1 and why in choice.refused[0]
    assert any("stand-in bad unavailable" in r.getMessage() and why in r.getMessage() for r in caplog.records)
    use_kernels(monkeypatch, kernel(bad, "bad"), EXACT)
    choice = use_packed_attention(tiny(tiny_model_dir, window=True), compute_dtype=torch.bfloat16)
    assert choice.implementation == EXACT.name and choice.refused[0].startswith("stand-in bad: ")


def test_leak_in_the_model_check_alone_is_caught(tiny_model_dir, monkeypatch):
    """The model-level check stands on its own: a kernel that passes the random-tensor check but leaks in the
    model (here: the kernel check is skipped) still does not get chosen."""
    monkeypatch.setattr(attention, "kernel_error", lambda *args: 0.0)
    use_kernels(monkeypatch, kernel(_leaks, "bad"))
    model = tiny(tiny_model_dir)
    assert attention.packing_error(model, NAME, "sdpa", torch.bfloat16) < 1e-2  # correct, in bf16
    assert use_packed_attention(model, compute_dtype=torch.bfloat16).implementation == NAME


def test_attention_dropout_needs_a_kernel_that_implements_it(tiny_model_dir, monkeypatch, caplog):
    use_kernels(monkeypatch, EXACT)
    with caplog.at_level(logging.INFO, logger=attention.__name__):
        choice = use_packed_attention(tiny(tiny_model_dir, attention_dropout=0.1), compute_dtype=torch.bfloat16)
    assert choice.implementation == NAME and "attention dropout" in caplog.text
    with_dropout = kernel(name="dropout", dropout=True)
    use_kernels(monkeypatch, with_dropout)
    assert use_packed_attention(tiny(tiny_model_dir, attention_dropout=0.1),
                                compute_dtype=torch.bfloat16).implementation == with_dropout.name


@torch.library.custom_op("training_hub_test::varlen", mutates_args=())
def _varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               left: int) -> torch.Tensor:
    return exact_varlen(q, k, v, cu_seqlens, max_seqlen, scale=None, window=(left, 0), dropout=0.0, softcap=0.0)


@_varlen_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, left):
    return torch.empty_like(q)


def test_varlen_call_traces_into_one_graph_for_all_row_shapes():
    """As the real kernels are (custom ops with fake implementations), a stand-in op: dynamo traces packed_varlen
    whole (fullgraph) and reuses the graph for rows of other lengths, sample counts and longest samples."""
    import torch._dynamo.testing

    op_kernel = kernel(lambda q, k, v, cu, longest, *, window, **kw: _varlen_op(q, k, v, cu, longest, window[0]), "op")
    module = type("M", (), {"training": False})()

    def call(q, k, v, cu_seqlens, max_seqlen):
        return packed_varlen(module, q, k, v, None, kernel=op_kernel, **{attention.CU_SEQLENS_KWARG: cu_seqlens,
                                                                         attention.MAX_SEQLEN_KWARG: max_seqlen})[0]

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(call, backend=counter, fullgraph=True, dynamic=True)
    for bounds in ([0, 5, 12], [0, 3, 9, 20], [0, 7]):
        q, k, v = (torch.randn(1, heads, bounds[-1], 8, dtype=torch.bfloat16) for heads in (4, 2, 2))
        args = (q, k, v, torch.tensor(bounds, dtype=torch.int32), max(b - a for a, b in zip(bounds, bounds[1:])))
        assert torch.equal(compiled(*args), call(*args))
    assert counter.frame_count == 1
