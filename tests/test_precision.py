"""dtype selection (engine.precision): "auto" means bf16 autocast on CUDA and on CPUs with native bf16.

That bf16 autocast tracks fp32 on the tiny model is checked end to end in tests/test_engine_train.py
(test_gradient_checkpointing_is_exact_and_bf16_autocast_is_close); this file checks only the selection.
"""

from __future__ import annotations

import pytest
import torch

from training_hub.engine import precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(params=[True, False], ids=["cpu-bf16", "cpu-no-bf16"])
def native_bf16(request, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_explicit_dtypes_ignore_the_hardware(native_bf16):
    for device in (CPU, CUDA):
        assert precision.autocast_dtype("bfloat16", device) is torch.bfloat16
        assert precision.autocast_dtype("float32", device) is None


def test_auto_is_bf16_on_cuda_and_on_cpus_with_native_bf16(native_bf16):
    assert precision.autocast_dtype("auto", CUDA) is torch.bfloat16
    assert precision.autocast_dtype("auto", "cuda:0") is torch.bfloat16
    assert precision.autocast_dtype("auto", CPU) is (torch.bfloat16 if native_bf16 else None)


def test_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="dtype must be one of 'auto', 'bfloat16', 'float32', got 'fp16'"):
        precision.autocast_dtype("fp16", CPU)


@pytest.mark.parametrize("torch_says, flags, expected", [
    ((True, False), "", True),                              # AMX tiles
    ((False, True), "", True),                              # AVX512-BF16
    ((False, False), "fpu sse avx512f amx_bf16", True),     # torch's private helpers unavailable or wrong
    ((False, False), "fpu sse avx512f avx512_bf16", True),
    ((False, False), "fpu sse avx2 avx512f", False),
    ((False, False), None, False),                          # no /proc/cpuinfo
])
def test_cpu_detection(monkeypatch, tmp_path, torch_says, flags, expected):
    amx, avx512_bf16 = torch_says
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    real = precision._cpuinfo_flags
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: real(str(cpuinfo)))
    precision.cpu_has_native_bf16.cache_clear()
    try:
        assert precision.cpu_has_native_bf16() is expected
    finally:
        precision.cpu_has_native_bf16.cache_clear()


def test_detection_is_cached():
    precision.cpu_has_native_bf16.cache_clear()
    first = precision.cpu_has_native_bf16()
    assert precision.cpu_has_native_bf16() is first
    assert precision.cpu_has_native_bf16.cache_info().hits >= 1


def test_precision_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, training_hub.engine.precision as p; p.cpu_has_native_bf16(); "
            "print(sorted(m for m in ('transformers', 'datasets', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_packed_attention_under_cpu_bf16_autocast_is_computed_in_fp32():
    """engine.attention: on CPU, bf16 attention is done in fp32 (faster backward there) and returned in bf16,
    as SDPA under autocast returns it; the result is fp32 attention rounded once, and gradients flow."""
    import torch.nn.functional as F

    from training_hub.engine.attention import packed_sdpa

    class Module:
        training = True

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 12, 8, generator=g)  # q and k arrive in fp32 (rotary embeddings), v in bf16
    k = torch.randn(1, 2, 12, 8, generator=g)
    v = torch.randn(1, 2, 12, 8, generator=g).bfloat16()
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = packed_sdpa(Module(), q, k, v, None, sample_bounds=[0, 5, 12])
    assert out.dtype is torch.bfloat16 and out.shape == (1, 12, 4, 8)
    reference = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b].float(),
                                                          is_causal=True, enable_gqa=True)
                           for a, b in ((0, 5), (5, 12))], dim=2).transpose(1, 2)
    assert torch.equal(out, reference.bfloat16())
    out.float().sum().backward()
    assert q.grad.dtype is torch.float32 and v.grad.dtype is torch.bfloat16 and q.grad.abs().sum() > 0


def test_auto_keeps_tiny_models_in_fp32_on_cpu(monkeypatch):
    """bf16 pays off on CPU only for wide enough models (measured: the demo model trains 0.65x as fast in bf16)."""
    from training_hub.engine import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    cpu = torch.device("cpu")
    assert precision.autocast_dtype("auto", cpu, hidden_size=64) is None
    assert precision.autocast_dtype("auto", cpu, hidden_size=precision.CPU_BF16_MIN_HIDDEN) == torch.bfloat16
    assert precision.autocast_dtype("bfloat16", cpu, hidden_size=64) == torch.bfloat16  # asked for: given
    assert precision.autocast_dtype("auto", torch.device("cuda"), hidden_size=64) == torch.bfloat16


def test_a_busy_cpu_is_warned_about(monkeypatch, caplog):
    import os

    import torch

    from training_hub.engine import model

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * cores, 0.0, 0.0))
    model.warn_if_cpu_is_busy()
    assert "this machine is busy" in caplog.text and "OMP_NUM_THREADS=1" in caplog.text
    caplog.clear()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.0, 0.0))
    model.warn_if_cpu_is_busy()
    assert "busy" not in caplog.text


@pytest.mark.parametrize("dtype, expect_warning", [("bfloat16", True), ("float32", False), ("auto", False)])
def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(native_bf16, caplog, dtype, expect_warning):
    """Without AMX/AVX512-BF16, torch emulates bf16 matmuls (a linear layer 8x slower than fp32 on an AVX2 EPYC)."""
    from types import SimpleNamespace

    from training_hub.engine import model

    model._warn_emulated_bf16.cache_clear()
    config = SimpleNamespace(dtype=dtype, model_path="unused", trust_remote_code=False)
    model.compute_dtype(config, CUDA)  # CUDA does bf16 natively: never warned
    assert "emulates bf16" not in caplog.text
    if dtype == "auto":
        return  # on CPU "auto" reads the model's width from its config; it never picks emulated bf16 (tested above)
    model.compute_dtype(config, CPU)
    assert ("emulates bf16" in caplog.text) is (expect_warning and not native_bf16)
    model._warn_emulated_bf16.cache_clear()
