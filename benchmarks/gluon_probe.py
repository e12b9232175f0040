"""GPU probe of the Gluon kernels: each case in its own subprocess under a timeout (a wrong mbarrier phase hangs
the GPU), printing the largest errors of out / lse against the float32 reference and any exception; with --bwd
the backward too: dq / dk / dv against the portable kernels' (TILEATTN_GLUON=0) and against the float32 reference.

Usage: PYTHONPATH=src [TILEATTN_GLUON=all] python benchmarks/gluon_probe.py [--timeout 60] [--bwd]
(entries not yet measured run only with TILEATTN_GLUON=all: the "gluon=" / "gluon_bwd=" fields say which ran)
"""
import argparse
import os
import subprocess
import sys

CASES = [  # B, Sq, Sk, Hq, Hkv, D, causal
    (1, 128, 128, 1, 1, 128, False), (1, 17, 17, 1, 1, 128, False), (1, 300, 300, 2, 2, 128, False),
    (1, 300, 300, 2, 2, 128, True), (2, 1000, 1000, 4, 2, 64, False), (1, 257, 1031, 2, 1, 128, True),
    (2, 4096, 4096, 4, 4, 128, True), (1, 300, 300, 2, 2, 256, True), (2, 1000, 1000, 2, 1, 256, False),
]


def one(case, bwd=False):
    import torch
    import tileattn
    from tileattn.kernels import gluon_backward, gluon_forward
    B, Sq, Sk, Hq, Hkv, D, causal = case
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    calls = []
    real = gluon_forward.attention_forward
    gluon_forward.attention_forward = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    out, lse = tileattn.attention(q, k, v, causal=causal, return_lse=True)
    torch.cuda.synchronize()
    kk, vv = (t.repeat_interleave(Hq // Hkv, 2).float().transpose(1, 2) for t in (k, v))
    qq = q.float().transpose(1, 2)
    s = qq @ kk.transpose(-1, -2) * D ** -0.5
    if causal:
        i = torch.arange(Sq, device="cuda")[:, None]
        j = torch.arange(Sk, device="cuda")[None, :]
        s = s.masked_fill(j > i + Sk - Sq, float("-inf"))
    lse_ref = torch.logsumexp(s, -1)
    ref = (torch.softmax(s, -1).nan_to_num() @ vv).transpose(1, 2)
    fin = torch.isfinite(lse_ref)
    print(f"{case} gluon={bool(calls)} out_err={(out.float() - ref).abs().max().item():.3e} "
          f"lse_err={(lse - lse_ref)[fin].abs().max().item() if fin.any() else 0:.3e} nan={out.isnan().sum().item()}",
          flush=True)
    if not bwd:
        return
    bcalls = []
    real_b = gluon_backward.dkdv
    gluon_backward.dkdv = lambda *a, **kw: bcalls.append(1) or real_b(*a, **kw)
    dout = torch.randn(B, Sq, Hq, D, device="cuda", dtype=torch.bfloat16, generator=g)

    def grads(env):
        os.environ["TILEATTN_GLUON"] = env
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        tileattn.attention(*leaves, causal=causal).backward(dout)
        torch.cuda.synchronize()
        return [t.grad.float() for t in leaves]
    mode = os.environ.get("TILEATTN_GLUON", "1")
    ours, portable = grads(mode), grads("0")
    os.environ["TILEATTN_GLUON"] = mode
    leaves = [qq.requires_grad_(), kk.requires_grad_(), vv.requires_grad_()]
    s = leaves[0] @ leaves[1].transpose(-1, -2) * D ** -0.5
    if causal:
        s = s.masked_fill(j > i + Sk - Sq, float("-inf"))
    ref = (torch.softmax(s, -1).nan_to_num() @ leaves[2]).transpose(1, 2)
    ref.backward(dout.float())
    refs = [leaves[0].grad.transpose(1, 2)] + [
        t.grad.transpose(1, 2).unflatten(2, (Hkv, Hq // Hkv)).sum(3) for t in leaves[1:]]
    errs = " ".join(f"{n}={(a - b).abs().max().item():.2e}/{(a - r).abs().max().item():.2e}/"
                    f"{(b - r).abs().max().item():.2e}" for n, a, b, r in zip(("dq", "dk", "dv"), ours, portable, refs))
    print(f"  bwd gluon_bwd={bool(bcalls)} (vs portable / vs ref / portable vs ref) {errs} "
          f"nan={sum(t.isnan().sum().item() for t in ours)}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--case", type=int)
    ap.add_argument("--bwd", action="store_true", help="the backward as well")
    a = ap.parse_args()
    if a.case is not None:
        one(CASES[a.case], a.bwd)
        return
    for i, case in enumerate(CASES):
        try:
            r = subprocess.run([sys.executable, __file__, "--case", str(i)] + (["--bwd"] if a.bwd else []),
                               capture_output=True, text=True,
                               timeout=a.timeout, env=os.environ)
            print(r.stdout.strip() or f"{case} rc={r.returncode}: {r.stderr.strip()[-1500:]}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"{case} TIMEOUT after {a.timeout} s", flush=True)


if __name__ == "__main__":
    main()
