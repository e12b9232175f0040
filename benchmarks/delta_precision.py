"""Why sweep config #200 (bf16, Sq=1, Sk=26, D=80, causal, softmax_scale=1.2682) misses the dq bound.

Runs the config's exact inputs (tests/test_sweep.py, seed 20240917) through tileattn, SDPA's flash backend (FA2)
and cuDNN, and a float32 PyTorch emulation of the FlashAttention backward with delta = rowsum(dO * O) taken from
the output rounded to bf16 (what every FlashAttention kernel stores) or from the unrounded output. Prints
max|dq - dq_ref| for each, beside the PyTorch-at-bf16 error that the test's rule multiplies by 3.
Usage: python benchmarks/delta_precision.py  (GPU, or CPU for the emulation rows only)
"""
import os
import sys

import torch

os.environ.setdefault("TILEATTN_TEST_SIZE", "large")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from _helpers import make_tensor, make_gen, seed_for, run_reference  # noqa: E402
import test_sweep  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
idx = int(sys.argv[1]) if len(sys.argv) > 1 else 200
c = test_sweep.CONFIGS[idx]
gen = make_gen(seed_for("sweep", test_sweep.SEED, idx))
B, Sq, Sk, Hq, Hkv, D, dt = c["B"], c["Sq"], c["Sk"], c["Hq"], c["Hkv"], c["D"], c["dtype"]
q, k, v, do = (make_tensor(s, dt, gen, layout=c["layout"]) for s in
               [(B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, D), (B, Sq, Hq, D)])
sc, causal = c["softmax_scale"], c["causal"]
print(f"config #{idx}: {c}")
kw = dict(causal=causal, softmax_scale=sc, dout=do)
_, _, g_ref = run_reference(q, k, v, **kw)
_, _, g_pt = run_reference(q, k, v, upcast=False, **kw)
dq_ref = g_ref[0].double()
err = lambda x: (x.double() - dq_ref).abs().max().item()  # noqa: E731
print(f"PyTorch at {dt} (rule's baseline): {err(g_pt[0]):.4f}; bound 3x = {3 * err(g_pt[0]):.4f} (+ atol)")


def emulate(delta_from_rounded_o):
    f = [x.transpose(1, 2).float() for x in (q, k, v, do)]
    Q, K, V, DO = f
    s = Q @ K.transpose(-1, -2) * sc
    if causal:
        mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
        s = s.masked_fill(~mask, float("-inf"))
    lse = s.logsumexp(-1, keepdim=True)
    p = torch.exp(s - lse)
    o = p.to(dt).float() @ V
    o_used = o.to(dt).float() if delta_from_rounded_o else o
    delta = (DO * o_used).sum(-1, keepdim=True)
    ds = p * (DO @ V.transpose(-1, -2) - delta)
    return ((ds.to(dt).float() @ K) * sc).transpose(1, 2).to(dt)


print(f"emulated FA backward, delta from bf16 O: {err(emulate(True)):.4f}")
print(f"emulated FA backward, delta from fp32 O: {err(emulate(False)):.4f}")
if dev == "cuda":
    import tileattn
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    for mode in ("residual", "correct", "rounded"):  # configs.delta_mode: the default, then the two others
        os.environ["TILEATTN_DELTA"] = mode
        qq = q.detach().clone().requires_grad_()
        tileattn.attention(qq, k, v, causal=causal, softmax_scale=sc).backward(do)
        print(f"tileattn (TILEATTN_DELTA={mode}): {err(qq.grad):.4f}")
    os.environ.pop("TILEATTN_DELTA")
    for name, be in (("sdpa_flash (FA2)", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            qt = q.detach().transpose(1, 2).clone().requires_grad_()
            mask = causal_lower_right(Sq, Sk) if causal else None
            with sdpa_kernel(be):
                o = torch.nn.functional.scaled_dot_product_attention(qt, k.transpose(1, 2), v.transpose(1, 2),
                                                                     attn_mask=mask, scale=sc)
            o.backward(do.transpose(1, 2))
            print(f"{name}: {err(qt.grad.transpose(1, 2)):.4f}")
        except Exception as e:  # noqa: BLE001
            print(f"{name}: failed: {str(e).splitlines()[0][:100]}")
