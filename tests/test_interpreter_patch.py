"""tileattn._interpreter: bfloat16 tl.dot / arithmetic / casts and fp32 dot rounding in Triton's CPU interpreter.

On a GPU these kernels are compiled normally; the same checks then verify the
real hardware path (and that the patch is a no-op there).
"""

import numpy as np
import pytest
import torch

import triton
import triton.language as tl

from tileattn import _interpreter
from tileattn._interpreter import _bf16_bits_to_f32, _f32_to_bf16_bits, patch_interpreter_bf16_dot

from _helpers import DEVICE, ON_GPU


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    c = tl.dot(a, b)  # fp32 accumulator
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], c)


@triton.jit
def _dot_acc_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    # p @ v pattern of the attention kernels: fp32 tensor cast to bf16, dot, explicit accumulator.
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :]).to(tl.float32)
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    acc = tl.full((M, N), 1.0, tl.float32)
    acc = tl.dot(a.to(b.dtype), b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


@triton.jit
def _dot_ieee_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b, input_precision="ieee"))


@triton.jit
def _elementwise_kernel(x_ptr, y_ptr, add_ptr, mul_ptr, neg_ptr, cmp_ptr, down_ptr, n: tl.constexpr):
    r = tl.arange(0, n)
    x = tl.load(x_ptr + r)  # bf16
    y = tl.load(y_ptr + r)  # bf16
    tl.store(add_ptr + r, (x + y).to(tl.float32))
    tl.store(mul_ptr + r, (x * y).to(tl.float32))
    tl.store(neg_ptr + r, (-x).to(tl.float32))
    tl.store(cmp_ptr + r, (x < y).to(tl.int32))
    tl.store(down_ptr + r, (x.to(tl.float32) * 1.00390625).to(tl.bfloat16))  # 1 + 2^-8: forces rounding


def _bf16(shape, gen):
    return torch.randn(shape, generator=gen).to(torch.bfloat16).to(DEVICE)


def test_bit_helpers_match_torch():
    x = torch.randn(4096, dtype=torch.float32) * 3
    x[:4] = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
    ours = _f32_to_bf16_bits(x.numpy())
    theirs = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)  # round to nearest even, like torch and the GPU
    back = _bf16_bits_to_f32(theirs)
    np.testing.assert_array_equal(back, x.to(torch.bfloat16).float().numpy())
    assert np.isnan(_bf16_bits_to_f32(_f32_to_bf16_bits(np.array([np.nan], np.float32))))[0]


def test_patch_is_idempotent_and_noop_without_interpreter(monkeypatch):
    if ON_GPU:
        assert patch_interpreter_bf16_dot() is False
        return
    from triton.runtime import interpreter as interp

    before = interp.InterpreterBuilder.create_dot
    assert patch_interpreter_bf16_dot() is True
    assert patch_interpreter_bf16_dot() is True
    assert interp.InterpreterBuilder.create_dot is before  # conftest already patched: no double wrap
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _interpreter.interpreting() is False
    assert patch_interpreter_bf16_dot() is False


@pytest.mark.parametrize("M,N,K", [(16, 16, 16), (32, 16, 64)])
def test_bf16_dot(M, N, K):
    gen = torch.Generator().manual_seed(0)
    a, b = _bf16((M, K), gen), _bf16((K, N), gen)
    c = torch.empty(M, N, dtype=torch.float32, device=DEVICE)
    _dot_kernel[(1,)](a, b, c, M, N, K)
    ref = a.double() @ b.double()  # bf16 products are exact in fp32; only fp32 accumulation error
    torch.testing.assert_close(c.double(), ref, rtol=0, atol=1e-5 * K)


def test_bf16_dot_accumulate_after_cast():
    gen = torch.Generator().manual_seed(1)
    M = N = K = 16
    a = torch.rand(M, K, generator=gen).to(DEVICE)  # fp32, cast to bf16 inside the kernel
    b = _bf16((K, N), gen)
    c = torch.empty(M, N, dtype=torch.float32, device=DEVICE)
    _dot_acc_kernel[(1,)](a, b, c, M, N, K)
    ref = a.to(torch.bfloat16).double() @ b.double() + 1.0  # RTNE cast, like the GPU
    torch.testing.assert_close(c.double(), ref, rtol=0, atol=1e-5 * K)


def test_fp16_dot_unchanged():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(16, 32, generator=gen).half().to(DEVICE)
    b = torch.randn(32, 16, generator=gen).half().to(DEVICE)
    c = torch.empty(16, 16, dtype=torch.float32, device=DEVICE)
    _dot_kernel[(1,)](a, b, c, 16, 16, 32)
    torch.testing.assert_close(c.double(), a.double() @ b.double(), rtol=0, atol=1e-5 * 32)


def test_fp32_dot_same_bits_transposed():
    """An fp32 (ieee) dot gives the same bits for a @ b and (b.T @ a.T).T, whatever the tile shapes: the attention
    backward recomputes the forward's scores transposed and in other tiles (the interpreter's float32 np.matmul
    did not: large-logit fp32 gradients failed the accuracy rule on one CI machine). Checked on the GPU too (an
    fp32 ieee dot accumulates over k in a fixed order there)."""
    gen = torch.Generator().manual_seed(4)
    for M, N, K in ((32, 16, 64), (16, 64, 64)):
        a = (torch.randn(M, K, generator=gen) * 6).to(DEVICE)
        b = (torch.randn(K, N, generator=gen) * 6).to(DEVICE)
        c = torch.empty(M, N, dtype=torch.float32, device=DEVICE)
        ct = torch.empty(N, M, dtype=torch.float32, device=DEVICE)
        _dot_ieee_kernel[(1,)](a, b, c, M, N, K)
        _dot_ieee_kernel[(1,)](b.t().contiguous(), a.t().contiguous(), ct, N, M, K)
        assert torch.equal(c, ct.t()), (c - ct.t()).abs().max()
        torch.testing.assert_close(c.double(), a.double() @ b.double(), rtol=0, atol=4e-7 * K * 36)


def test_bf16_elementwise_and_casts():
    gen = torch.Generator().manual_seed(3)
    n = 64
    x, y = _bf16((n,), gen), _bf16((n,), gen)
    add = torch.empty(n, dtype=torch.float32, device=DEVICE)
    mul, neg = torch.empty_like(add), torch.empty_like(add)
    cmp = torch.empty(n, dtype=torch.int32, device=DEVICE)
    down = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    _elementwise_kernel[(1,)](x, y, add, mul, neg, cmp, down, n)
    torch.testing.assert_close(add, (x + y).float(), rtol=0, atol=0)
    torch.testing.assert_close(mul, (x * y).float(), rtol=0, atol=0)
    torch.testing.assert_close(neg, (-x).float(), rtol=0, atol=0)
    torch.testing.assert_close(cmp, (x < y).int(), rtol=0, atol=0)
    torch.testing.assert_close(down, (x.float() * 1.00390625).to(torch.bfloat16), rtol=0, atol=0)
