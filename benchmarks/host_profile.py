"""Where a call's host time goes (GPU machine): cProfile of back-to-back tileattn calls on tiny shapes, whose GPU
time is negligible, so the wall time per call is the host's.

Usage: PYTHONPATH=src python3 benchmarks/host_profile.py [--calls 1000] [--top 22] [--wall-only]

Cases: the forward (``tileattn.attention``, D=128, causal, 128 tokens), forward + backward, and a decode step
(``flash_attn_with_kvcache``, 256 cached keys); the forward also with the Gluon forward off
(``TILEATTN_GLUON=0``, on sm90). For each: wall µs per call, then the functions with the most
self time (µs per call). Run 28 timed ~160-300 µs of host time per forward call against ~40-60 µs for an SDPA
call on the benchmark machine: at 512-1k tokens tileattn's forward is then host-bound.
"""
import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.environ.get("TILEATTN_SRC") or os.path.join(os.path.dirname(__file__), "..", "src"))
import tileattn  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--wall-only", action="store_true", help="no cProfile pass; also time SDPA (cuDNN) anchors")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(1, 128, 8, 128, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(1, 128, 8, 128, device=dev, dtype=dt)
    qd = torch.randn(1, 1, 8, 128, device=dev, dtype=dt)
    kc = torch.randn(1, 256, 8, 128, device=dev, dtype=dt)
    lens = torch.full((1,), 256, dtype=torch.int32, device=dev)

    def fwd():
        with torch.no_grad():
            tileattn.attention(q, q, q, causal=True)

    def fwd_portable():  # the same call on the portable Triton kernel (the Gluon forward off)
        os.environ["TILEATTN_GLUON"] = "0"
        fwd()
        del os.environ["TILEATTN_GLUON"]

    def fwd_bwd():
        tileattn.attention(q, q, q, causal=True).backward(g)
        q.grad = None

    def decode():
        tileattn.flash_attn_with_kvcache(qd, kc, kc, cache_seqlens=lens)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt = q.detach().transpose(1, 2).requires_grad_()

    def sdpa_fwd():
        with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(qt, qt, qt, is_causal=True)

    def sdpa_fwd_bwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(qt, qt, qt, is_causal=True).backward(g.transpose(1, 2))
        qt.grad = None
    cases = [("forward", fwd), ("forward, portable kernel", fwd_portable), ("forward+backward", fwd_bwd),
             ("decode", decode)]
    if args.wall_only:
        wall_only(cases + [("sdpa_cudnn forward", sdpa_fwd), ("sdpa_cudnn forward+backward", sdpa_fwd_bwd)],
                  args.calls)
        return
    for name, fn in cases:
        for _ in range(30):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / args.calls * 1e6
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        print(f"== {name}: {wall:.1f} us per call (wall, no profiler)", flush=True)
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:args.top]
        for (file, line, func), (_, ncalls, tottime, cumtime, _) in rows:
            print(f"  {tottime / args.calls * 1e6:7.1f} self {cumtime / args.calls * 1e6:7.1f} cum  "
                  f"{ncalls / args.calls:5.1f}x  {os.path.basename(file)}:{line} {func}", flush=True)


def wall_only(cases, calls):
    """Host time per call, robust to a noisy host: 20 rounds, each timing every case for calls // 20 calls, with
    tileattn's launch cache (kernels/launch.py) on with its direct launch, on without it, and off, in turn inside
    the same process; min and median of the rounds."""
    try:
        from tileattn.kernels import launch
    except ImportError:  # an older tree (TILEATTN_SRC) without the launch cache
        import types
        launch = types.SimpleNamespace(_ENABLED=False)
    enabled, direct = launch._ENABLED, getattr(launch, "_DIRECT", None)
    modes = [("", (True, True)), (" [direct launch off]", (True, False)), (" [launch cache off]", (False, False))]
    if direct is None:  # a tree without the direct launch
        modes = [("", (True, None)), (" [launch cache off]", (False, None))]
    variants = [(name + suffix, fn, mode) for name, fn in cases
                for suffix, mode in (modes if enabled and not name.startswith("sdpa") else [("", (enabled, direct))])]
    times = {name: [] for name, _, _ in variants}
    per_round = max(calls // 20, 10)

    def set_mode(mode):
        launch._ENABLED = mode[0]
        if mode[1] is not None:
            launch._DIRECT = mode[1]
    for name, fn, mode in variants:  # warm-up (compiles, caches)
        set_mode(mode)
        for _ in range(30):
            fn()
    torch.cuda.synchronize()
    for _ in range(20):
        for name, fn, mode in variants:
            set_mode(mode)
            t = time.perf_counter()
            for _ in range(per_round):
                fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) / per_round * 1e6)
    set_mode((enabled, direct))
    for name, _, _ in variants:
        ts = sorted(times[name])
        print(f"== {name}: {ts[0]:.1f} us per call min, {ts[len(ts) // 2]:.1f} median (wall, 20 rounds)",
              flush=True)


if __name__ == "__main__":
    main()
