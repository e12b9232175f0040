"""Decode launch variants measured round-robin in one process (GPU): are the between-call differences of the
decode table the kernel's or the call's?

Usage: PYTHONPATH=src python3 benchmarks/decode_probe.py [--rounds 3] [--variants '64,4,2,2;64,4,3,2']

For each bench_decode config (bf16, D=128) it times, ``--rounds`` times in turn: tileattn contiguous and paged
(page 16) under each TILEATTN_DECODE_CONFIG variant (block_n,warps,stages,programs_per_sm), and SDPA cuDNN, with
bench_decode's do_bench settings. It prints every round's µs (so drifts within a process show) and the median,
then the split / combine kernels' device time of each variant from torch.profiler (the kernels alone, without
the host's share). ``--host`` instead times the host side: wall time per call of back-to-back calls on a tiny
cache (GPU time negligible), with the Triton launches' share measured by wrapping the kernels' ``run``.
Why: the decode kernel at num_stages=2 waits for every outstanding cp.async at the top of each iteration
(SASS: DEPBAR.LE SB0, 0x0; the next tile's loads are issued at the end of the body), so a program never overlaps
its own loads with its compute; num_stages=3 keeps one tile in flight (DEPBAR.LE SB0, 0x2).
"""
import argparse
import os
import statistics
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import tileattn  # noqa: E402
from tileattn.bench import env_var  # noqa: E402
from tileattn.bench_decode import CONFIGS, _bench, copy_bandwidth, decode_inputs, paged_copy  # noqa: E402


def host_times(n=2000):
    """µs of host time per call (tiny shapes: the GPU is never the bottleneck) and the Triton launches' share."""
    import time
    from tileattn.kernels import decode as kd
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(1, 1, 8, 128, device=dev, dtype=dt)
    kc = torch.randn(1, 256, 8, 128, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    lens = torch.full((1,), 256, dtype=torch.int32, device=dev)
    bt = torch.arange(16, dtype=torch.int32, device=dev).view(1, 16)
    kp, vp = kc.view(16, 16, 8, 128), vc.view(16, 16, 8, 128)
    qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    qa = torch.randn(1, 128, 8, 128, device=dev, dtype=dt)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
    cases = [("tileattn decode", lambda: tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)),
             ("tileattn decode int len", lambda: tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=256)),
             ("tileattn decode paged", lambda: tileattn.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens,
                                                                                block_table=bt)),
             ("tileattn attention fwd", lambda: tileattn.attention(qa, qa, qa)),
             ("sdpa_cudnn", cudnn), ("sdpa_flash", flash)]
    spent = {"launch": 0.0}
    for fn in (kd._decode_split_kernel, kd._decode_combine_kernel):
        real = fn.run

        def timed(*a, _real=real, **k):
            t = time.perf_counter()
            r = _real(*a, **k)
            spent["launch"] += time.perf_counter() - t
            return r
        fn.run = timed
    for name, fn in cases:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        spent["launch"] = 0.0
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / n * 1e6
        print(f"host {name:<26} {wall:7.1f} us/call (Triton decode launches {spent['launch'] / n * 1e6:6.1f})",
              flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="64,4,2,2;64,4,3,2;32,4,3,2;32,4,4,2;64,4,3,4")
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--no-paged", action="store_true", help="contiguous caches only")
    args = ap.parse_args()
    if args.host:
        return host_times()
    variants = [v for v in args.variants.split(";") if v]
    dev, dt = torch.device("cuda"), torch.bfloat16
    bw = copy_bandwidth(dev)
    print(f"# {torch.cuda.get_device_name()} | copy bandwidth {bw:.0f} GB/s | rounds {args.rounds}", flush=True)
    for batch, cache, hq, hkv, d in CONFIGS:
        q, kc, vc, lens = decode_inputs(batch, cache, hq, hkv, d, dev, dt)
        kp, vp, bt = paged_copy(kc, vc, args.page)
        nbytes = (kc.numel() + vc.numel() + 2 * q.numel()) * kc.element_size()
        ref = tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens).float()
        cases = []
        for v in variants:
            def contig(v=v):
                with env_var("TILEATTN_DECODE_CONFIG", v):
                    return tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)

            def paged(v=v):
                with env_var("TILEATTN_DECODE_CONFIG", v):
                    return tileattn.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=bt)
            cases += [(f"contig[{v}]", contig)] + ([] if args.no_paged else [(f"paged{args.page}[{v}]", paged)])

        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=hq != hkv)
        cases.append(("sdpa_cudnn", cudnn))
        for name, fn in cases:
            out = fn()
            if name != "sdpa_cudnn":
                diff = (out.float() - ref).abs().max().item()
                assert diff < 2e-2, f"{name}: max abs diff {diff} against the default contiguous call"
        times = {name: [] for name, _ in cases}
        for _ in range(args.rounds):
            for name, fn in cases:
                times[name].append(_bench(fn) * 1e3)
        print(f"B={batch} cache={cache} Hq/Hkv={hq}/{hkv} D={d}", flush=True)
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:<22} " + " ".join(f"{t:8.1f}" for t in ts) + f"  | median {med:8.1f} us "
                  f"{nbytes / med * 1e-3 / bw:5.2f}x copy", flush=True)
        # split vs combine kernel time of each variant, contiguous and paged
        for name, fn in cases[:-1]:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
            per = {}
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    per[e.name] = per.get(e.name, 0.0) + e.device_time / 5
            dec = {k: v for k, v in per.items() if "decode" in k}
            print(f"  kernels {name:<22} {sum(dec.values()):8.1f} us (" + ", ".join(
                f"{k.replace('_decode_', '')[:12]} {v:.1f}" for k, v in sorted(dec.items())) + f"; other "
                f"{sum(per.values()) - sum(dec.values()):.1f})", flush=True)
        q = kc = vc = kp = vp = bt = ref = qt = kt = vt = cases = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
