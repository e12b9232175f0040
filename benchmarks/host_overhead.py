"""Host (CPU) time per call against GPU time per call, to find launch-bound shapes (GPU only).

For each case: ``host`` = CPU time to enqueue one call while the GPU is held busy by a long sleep kernel (so the
queue never drains); ``gpu`` = GPU time per call of the same calls run back to back from that full queue (no host
gaps); ``bench`` = triton.testing.do_bench's median, what the benchmark reports. bench ~ max(host, gpu) when the
host is the bottleneck. Usage: python benchmarks/host_overhead.py
Caveat (run 19): sound only for calls with one or two launches. A call with several launches (decode: append,
split kernel, combine) can fill CUDA's launch queue behind the sleep within the 200 calls, and the host then waits
for the sleep, inflating ``host`` (decode measured 757 µs host against 249 µs do_bench).
"""
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import tileattn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402


def measure(fn, n=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(2e8))  # ~100+ ms of GPU time: the queue stays full while we enqueue
    start.record()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    end.record()
    torch.cuda.synchronize()
    gpu = start.elapsed_time(end) / n * 1e3
    bench = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    return host, gpu, bench


def main():
    dev = "cuda"
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"{'case':<44} {'host us':>8} {'gpu us':>8} {'bench us':>9}")
    for d, s, causal in ((128, 1024, True), (128, 512, True), (64, 1024, True), (128, 1024, False)):
        b, h = 16384 // s, 2048 // d
        q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        qt, kt, vt = (x.detach().transpose(1, 2) for x in (q, k, v))
        cases = {
            "tileattn fwd (grad: keeps residual)": lambda: tileattn.attention(q, k, v, causal=causal),
        }

        def nograd(causal=causal):
            with torch.no_grad():
                return tileattn.attention(q, k, v, causal=causal)
        cases["tileattn fwd (no grad)"] = nograd
        for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def f(be=be):
                with sdpa_kernel(be):
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            cases[f"{name} fwd (no grad)"] = f
        for name, fn in cases.items():
            host, gpu, bench = measure(fn)
            print(f"{f'D{d} S{s} causal={int(causal)} ' + name:<44} {host:8.1f} {gpu:8.1f} {bench:9.1f}", flush=True)
    # decode: one new token against an 8k cache, 8 sequences, GQA 32/8
    q = torch.randn(8, 1, 32, 128, device=dev, dtype=torch.bfloat16)
    kc, vc = (torch.randn(8, 8192, 8, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    host, gpu, bench = measure(lambda: tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=8192))
    print(f"{'decode B8 cache8k 32/8 D128':<44} {host:8.1f} {gpu:8.1f} {bench:9.1f}", flush=True)


if __name__ == "__main__":
    main()
