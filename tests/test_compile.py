"""torch.compile(fullgraph=True) of a small block (linear -> tileattn.attention -> linear) matches eager.

CPU: backend "aot_eager" (the kernels run in the Triton interpreter, inductor would
add nothing). GPU: backend "inductor".
"""

import pytest
import torch
from torch import nn

import tileattn
from _helpers import DEVICE, ON_GPU, make_gen

BACKEND = "inductor" if ON_GPU else "aot_eager"


class AttnBlock(nn.Module):
    def __init__(self, embed, q_heads, kv_heads, head_dim, causal):
        super().__init__()
        self.q_heads, self.kv_heads, self.head_dim, self.causal = q_heads, kv_heads, head_dim, causal
        self.q_proj = nn.Linear(embed, q_heads * head_dim)
        self.kv_proj = nn.Linear(embed, 2 * kv_heads * head_dim)
        self.out_proj = nn.Linear(q_heads * head_dim, embed)

    def forward(self, x):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.q_heads, self.head_dim)
        # k and v are strided views of one projection (last dim contiguous)
        k, v = self.kv_proj(x).view(B, S, 2, self.kv_heads, self.head_dim).unbind(2)
        o = tileattn.attention(q, k, v, causal=self.causal)
        return self.out_proj(o.reshape(B, S, self.q_heads * self.head_dim))


def _run(fn, model, x, dy):
    """Forward/backward through fn (eager or compiled model); parameter grads read from model."""
    x = x.detach().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = fn(x)
    y.backward(dy)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return y.detach(), x.grad.detach(), grads


def _assert_close(name, a, b, rtol, atol):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: compiled vs eager: {m}")


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if ON_GPU else []), ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_compile_fullgraph_matches_eager(causal, dtype):
    torch._dynamo.reset()
    gen = make_gen(1234 + causal)
    torch.manual_seed(1234)
    model = AttnBlock(embed=48, q_heads=4, kv_heads=2, head_dim=16, causal=causal).to(DEVICE, dtype)
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)

    # fp32: same kernels, only the surrounding matmuls may be scheduled differently.
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    for seqlen in (33, 47):  # a second length exercises re-tracing / dynamic shapes through the fake impl
        x = torch.randn(2, seqlen, 48, generator=gen).to(DEVICE, dtype)
        dy = torch.randn(2, seqlen, 48, generator=gen).to(DEVICE, dtype)
        y_e, dx_e, g_e = _run(model, model, x, dy)
        y_c, dx_c, g_c = _run(compiled, model, x, dy)
        assert torch.isfinite(y_c).all() and torch.isfinite(dx_c).all()
        _assert_close(f"y (S={seqlen})", y_c, y_e, rtol, atol)
        _assert_close(f"dx (S={seqlen})", dx_c, dx_e, rtol, atol)
        for name in g_e:
            _assert_close(f"grad {name} (S={seqlen})", g_c[name], g_e[name], rtol, atol)


def test_compile_return_lse():
    """return_lse=True also traces without graph breaks."""
    torch._dynamo.reset()
    gen = make_gen(99)

    def f(q, k, v):
        out, lse = tileattn.attention(q, k, v, causal=True, return_lse=True)
        return out * 2, lse.exp().sum(-1)

    q = torch.randn(1, 19, 2, 16, generator=gen).to(DEVICE)
    k = torch.randn(1, 23, 1, 16, generator=gen).to(DEVICE)
    v = torch.randn(1, 23, 1, 16, generator=gen).to(DEVICE)
    compiled = torch.compile(f, backend=BACKEND, fullgraph=True)
    for a, b in zip(compiled(q, k, v), f(q, k, v)):
        _assert_close("return_lse", a, b, 1e-5, 1e-6)
