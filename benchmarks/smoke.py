"""Quick GPU correctness smoke test: odd shapes and every feature, fp16/bf16, against the float64 reference with
flash-attn's rule (error <= 2x the same computation in PyTorch at the input dtype (+atol); grads 3x).
Usage (GPU): PYTHONPATH=src python3 benchmarks/smoke.py
"""
import torch

import tileattn
from tileattn.reference import attention_ref

torch.manual_seed(0)
fails = 0


def err(a, b):
    return (a.double() - b.double()).abs().nan_to_num(0, 0, 0).max().item() if a.numel() else 0.0


def case(B, Sq, Sk, Hq, Hkv, D, Dv, dt, **kw):
    global fails
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dt, requires_grad=True)  # noqa: E731
    q, k, v = mk(B, Sq, Hq, D), mk(B, Sk, Hkv, D), mk(B, Sk, Hkv, Dv)
    sink = kw.pop("sink", None)
    if sink is not None:
        sink = sink.cuda().float().requires_grad_()
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = kw["alibi_slopes"].cuda()
    p = kw.get("dropout_p", 0.0)
    if p > 0:
        o, lse, mask = tileattn.flash_attn_func(q, k, v, return_attn_probs=True, sink=sink, **kw)
    else:
        o, lse = tileattn.attention(q, k, v, return_lse=True, sink=sink, **kw)
        mask = None
    do = torch.randn_like(o)
    o.backward(do)
    rkw = {k_: v_ for k_, v_ in kw.items() if k_ != "dropout_p"}
    if p > 0:
        rkw.update(dropout_mask=mask, dropout_p=p)
    res = {}
    for up in (True, False):
        qs, ks, vs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        ss = sink.detach().clone().requires_grad_() if sink is not None else None
        ro, rl = attention_ref(qs, ks, vs, upcast=up, sink=ss, **rkw)
        ro.backward(do.to(ro.dtype))
        res[up] = (ro, rl, qs.grad, ks.grad, vs.grad, ss.grad if ss is not None else None)
    names = ["o", "lse", "dq", "dk", "dv", "dsink"]
    ours = [o, lse, q.grad, k.grad, v.grad, sink.grad if sink is not None else None]
    line, ok = [], True
    for i, n in enumerate(names):
        if ours[i] is None:
            continue
        e, e_pt = err(ours[i], res[True][i]), err(res[False][i], res[True][i])
        mult = 2 if i < 2 else 3
        atol = 1e-5 if n == "lse" else (2e-3 if n == "dsink" else 1e-4)
        good = e <= mult * e_pt + atol and not torch.isnan(ours[i]).any()
        ok &= good
        line.append(f"{n} {e:.1e}/{e_pt:.1e}{'' if good else '!'}")
    fails += not ok
    print("PASS" if ok else "FAIL", (B, Sq, Sk, Hq, Hkv, D, Dv, str(dt)[6:]), kw if kw else "", " ".join(line), flush=True)


bf, fp = torch.bfloat16, torch.float16
case(2, 1000, 1000, 4, 2, 64, 64, bf, causal=True)
case(1, 517, 1031, 4, 1, 40, 40, fp, causal=True)
case(1, 1031, 517, 2, 2, 59, 59, bf, causal=True)
case(2, 257, 257, 2, 2, 8, 8, fp)
case(1, 300, 300, 2, 1, 96, 96, bf)
case(1, 300, 700, 2, 2, 160, 160, fp, causal=True)
case(1, 129, 129, 2, 2, 256, 256, bf, causal=True)
case(1, 200, 200, 2, 2, 224, 224, fp)
case(1, 1, 333, 8, 2, 128, 128, bf, causal=True)
case(1, 777, 900, 4, 2, 128, 128, bf, window_size=(100, 30))
case(1, 900, 777, 4, 4, 64, 64, fp, window_size=(64, -1), causal=True)
case(2, 500, 600, 4, 2, 128, 128, bf, softcap=20.0, causal=True)
case(2, 500, 600, 4, 2, 64, 64, fp, alibi_slopes=torch.rand(2, 4))
case(2, 600, 500, 4, 2, 128, 128, bf, sink=torch.randn(4), causal=True)
case(1, 400, 400, 4, 2, 192, 128, bf, causal=True)
case(1, 400, 450, 4, 2, 64, 64, fp, dropout_p=0.2)
case(1, 300, 350, 4, 1, 128, 128, bf, dropout_p=0.1, causal=True, softcap=10.0, alibi_slopes=torch.rand(4),
     sink=torch.randn(4), window_size=(80, -1))
case(1, 1000, 1000, 2, 2, 128, 128, torch.float32, causal=True)
# varlen vs per-sequence reference
lens_q, lens_k = [300, 0, 1, 700, 129], [350, 17, 0, 650, 129]
cq = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
ck = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
q = torch.randn(int(cq[-1]), 4, 128, device="cuda", dtype=bf, requires_grad=True)
k = torch.randn(int(ck[-1]), 2, 128, device="cuda", dtype=bf, requires_grad=True)
v = torch.randn(int(ck[-1]), 2, 128, device="cuda", dtype=bf, requires_grad=True)
o = tileattn.flash_attn_varlen_func(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=True)
do = torch.randn_like(o)
o.backward(do)
worst = 0.0
for b in range(len(lens_q)):
    qs, ks = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
    if lens_q[b] == 0:
        continue
    r = {}
    for up in (True, False):
        tq, tk, tv = [t.detach()[s].unsqueeze(0).clone().requires_grad_() for t, s in ((q, qs), (k, ks), (v, ks))]
        ro, _ = attention_ref(tq, tk, tv, causal=True, upcast=up)
        ro.backward(do[qs].unsqueeze(0).to(ro.dtype))
        r[up] = (ro[0], tq.grad[0], tk.grad[0], tv.grad[0])
    for ours, ref, pt, m in zip((o[qs], q.grad[qs], k.grad[ks], v.grad[ks]), r[True], r[False], (2, 3, 3, 3)):
        worst = max(worst, err(ours, ref) / (m * err(pt, ref) + 1e-4))
print("PASS" if worst <= 1 else "FAIL", "varlen causal GQA bf16: worst error / allowed =", f"{worst:.2f}", flush=True)
fails += worst > 1
print(f"smoke: {fails} failures", flush=True)
raise SystemExit(1 if fails else 0)
