"""Quick GPU correctness smoke test over odd shapes (fp16/bf16 vs float32 math reference)."""
import math
import torch
import tileattn


def ref(q, k, v, causal):
    B, Sq, Hq, D = q.shape; Sk = k.shape[1]; g = Hq // k.shape[2]
    qf, kf, vf = [t.float() for t in (q, k, v)]
    kf = kf.repeat_interleave(g, 2); vf = vf.repeat_interleave(g, 2)
    s = torch.einsum('bqhd,bkhd->bhqk', qf, kf) / math.sqrt(D)
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]; j = torch.arange(Sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + Sk - Sq, float('-inf'))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0)
    return torch.einsum('bhqk,bkhd->bqhd', p, vf), lse


torch.manual_seed(0)
worst = 0
for (B, Sq, Sk, Hq, Hkv, D, causal, dt) in [
        (2, 1000, 1000, 4, 2, 64, True, torch.bfloat16), (1, 517, 1031, 4, 1, 40, True, torch.float16),
        (1, 1031, 517, 2, 2, 59, True, torch.bfloat16), (2, 257, 257, 2, 2, 8, False, torch.float16),
        (1, 300, 300, 2, 1, 96, False, torch.bfloat16), (1, 300, 700, 2, 2, 160, True, torch.float16),
        (1, 129, 129, 2, 2, 256, True, torch.bfloat16), (1, 2048, 2048, 2, 2, 128, True, torch.float32),
        (1, 1, 333, 8, 2, 128, True, torch.bfloat16), (1, 200, 200, 2, 2, 224, False, torch.float16)]:
    q = torch.randn(B, Sq, Hq, D, device='cuda', dtype=dt, requires_grad=True)
    k = torch.randn(B, Sk, Hkv, D, device='cuda', dtype=dt, requires_grad=True)
    v = torch.randn(B, Sk, Hkv, D, device='cuda', dtype=dt, requires_grad=True)
    o, lse = tileattn.attention(q, k, v, causal=causal, return_lse=True)
    do = torch.randn_like(o)
    o.backward(do)
    qr, kr, vr = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ro, rl = ref(qr, kr, vr, causal)
    ro.backward(do.float())
    # the same computation at the input dtype, for the error budget
    qp, kp, vp = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    g = Hq // Hkv
    po = torch.nn.functional.scaled_dot_product_attention(
        qp.transpose(1, 2), kp.repeat_interleave(g, 2).transpose(1, 2), vp.repeat_interleave(g, 2).transpose(1, 2),
        attn_mask=(torch.arange(Sk, device='cuda')[None, :] <= torch.arange(Sq, device='cuda')[:, None] + Sk - Sq) if causal else None,
        ).transpose(1, 2).nan_to_num(0) if dt != torch.float32 else None
    errs = {'o': (o.float() - ro).abs().max().item(),
            'lse': (lse - rl).abs().nan_to_num(0).max().item(),
            'dq': (q.grad.float() - qr.grad).abs().max().item(),
            'dk': (k.grad.float() - kr.grad).abs().max().item(),
            'dv': (v.grad.float() - vr.grad).abs().max().item()}
    pt = (po.float() - ro).abs().max().item() if po is not None else float('nan')
    nan = any(torch.isnan(t).any().item() for t in (o, q.grad, k.grad, v.grad))
    print(B, Sq, Sk, Hq, Hkv, D, causal, dt, {k_: f'{e:.1e}' for k_, e in errs.items()}, f'pt_o {pt:.1e}', 'NAN' if nan else '', flush=True)
