"""Host time per call (enqueue only, no sync inside the loop) of tileattn.attention against SDPA cuDNN, forward with
requires_grad inputs as the bench times it: if it nears the kernel's GPU time the timing is host-bound.
Each tileattn call is measured with the forward's launch plans on (the default since session 21) and off
(TILEATTN_LAUNCH_PLANS=0, kernels/plans.py).
Usage: PYTHONPATH=src python3 benchmarks/host_cost.py"""
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tileattn


def host_us(fn, n=200):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return best


def main():
    for d, b, h, s in ((128, 32, 16, 512), (64, 32, 32, 512), (128, 16, 16, 1024)):
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        for causal in (False, True):
            line = []
            for plans in ("1", "0"):
                os.environ["TILEATTN_LAUNCH_PLANS"] = plans
                ours = host_us(lambda: tileattn.attention(q, k, v, causal=causal))
                with torch.no_grad():
                    ours_ng = host_us(lambda: tileattn.attention(q, k, v, causal=causal))
                line.append(f"plans {'on' if plans == '1' else 'off'} {ours:.1f} (no_grad {ours_ng:.1f})")
            os.environ.pop("TILEATTN_LAUNCH_PLANS")
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                cud = host_us(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
            print(f"D={d} B={b} H={h} S={s} causal={causal}: host us/call tileattn {', '.join(line)}; "
                  f"sdpa_cudnn {cud:.1f}", flush=True)


if __name__ == "__main__":
    main()
