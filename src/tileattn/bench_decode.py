"""Decode benchmark (GPU): ``flash_attn_with_kvcache`` bandwidth against copy bandwidth, SDPA and FlexAttention.

All are measured in the same run on the same card.

Usage: python -m tileattn.bench decode [--out-dir DIR] (or python -m tileattn.bench_decode): a table, CSV and PNG

Decode reads the whole KV cache once per step, so the measure is bandwidth: bytes that must move (K and V up to
each cache length, plus q and out) over time, against a large device-to-device copy (bytes read + written).

Anchors, timed with the same ``_bench`` after an untimed first call (compilation, JIT, allocator):

* ``sdpa_flash`` / ``sdpa_cudnn`` / ``sdpa_efficient``: SDPA on (B, H, S, D) views of the contiguous cache, as each
  backend accepts the call (``enable_gqa`` when Hq != Hkv). Mem-efficient SDPA has no ``enable_gqa`` support, so
  on GQA configs it is not called and its line reads ``failed: skipped ...``. SDPA's "kernel not used" UserWarnings
  are silenced.
* ``flex``: ``torch.compile(flex_attention, dynamic=False)`` (compiled once; a recompile per shape) on (B, H, S, D)
  views of the contiguous cache, ``block_mask=None``, ``enable_gqa`` when Hq != Hkv, default ``kernel_options``:
  for a query length < 128 with static batch / heads, a block mask with one head and a power-of-two GQA ratio,
  inductor lowers to its split-KV ``flex_decoding`` kernel. The lowering's choice is read from inductor's
  ``Use flex decoding True/False`` debug log during the first call (inductor's FX / autograd caches are off for
  that call so the lowering runs) and shown at the end of the row: ``[flex_decoding]``, ``[main flex kernel]`` or
  ``[kernel not confirmed]``.
* ``flex-paged`` (page 256 and 16): the same compiled ``flex_attention`` on the paged cache that ``tileattn-paged``
  reads (same pages, same random block table), laid out as PyTorch's ``PagedAttention`` expects it: a physical
  cache (1, Hkv, num_pages * page_size, D), here a no-copy view of the (num_pages, page_size, Hkv, D) pages. The
  block mask comes from ``torch.nn.attention.experimental._paged_attention.PagedAttention``: its page table and
  physical-to-logical map are filled from our block table, and ``convert_logical_block_mask`` maps a logical
  BlockMask (BLOCK_SIZE (128, page_size); every page of each row a full block, since each cache length equals the
  capacity, so no mask_mod runs inside the kernel) onto the physical pages; the batch of k / v is 1 and broadcast
  by the block mask. Without that module (torch < 2.5) the same BlockMask is built directly from the block table,
  with a mask_mod that keeps kv_idx only where page kv_idx // page_size belongs to batch row b.

Two times per provider: ``us`` from eager calls (``_bench``: each call pays its host work, which on a slow host
can exceed a small decode step's GPU time: tileattn's Python path plus two Triton launches cost ~200 µs per call
on the benchmark machine against ~40-60 µs for an SDPA call, run 28), and ``graph us`` from replaying the call
captured in a CUDA graph (``triton.testing.do_bench_cudagraph``), the way serving engines run decode steps: the
GPU time alone. ``x copy`` uses the graph time when there is one. A provider that cannot be captured reads
``-`` in the graph column.

tileattn-paged and both flex anchors must match tileattn's contiguous output (max abs diff < 2e-2) or their line
reads ``failed``. Any provider that raises prints ``failed: ...`` and the run goes on.
Status: run on an H200 in sessions 3-7; the tables are in BENCHMARKS.md.
"""

import argparse
from typing import Optional
import contextlib
import csv
import importlib
import logging
import os
import re
import warnings

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from tileattn.bench import env_vars

# (batch, cache length, q heads, kv heads, head dim)
CONFIGS = [(8, 65536, 32, 8, 128), (64, 4096, 32, 8, 128), (1, 131072, 8, 8, 128), (16, 16384, 64, 8, 128)]
PAGE_SIZES = [None, 256, 16]
FLEX_Q_BLOCK = 128  # flex's default query block size; a decode query (length 1) fits in one block

# inductor's lowering logs "Use flex decoding <bool>, ..." at debug level (module moved under kernel/flex/ in 2.8)
_FLEX_DECODING_LOGGERS = ("torch._inductor.kernel.flex.flex_decoding", "torch._inductor.kernel.flex_decoding")
_compiled_flex = None


def decode_inputs(batch, cache, hq, hkv, d, device, dtype):
    """q (B, 1, Hq, D), contiguous caches (B, cache, Hkv, D) and full cache_seqlens, seeded (torch.manual_seed(0))."""
    torch.manual_seed(0)
    q = torch.randn(batch, 1, hq, d, device=device, dtype=dtype)
    kc = torch.randn(batch, cache, hkv, d, device=device, dtype=dtype)
    vc = torch.randn(batch, cache, hkv, d, device=device, dtype=dtype)
    return q, kc, vc, torch.full((batch,), cache, dtype=torch.int32, device=device)


def paged_copy(kc, vc, page: int):
    """The same keys / values as pages (num_pages, page, Hkv, D) in a random order, and the block table (B, pages)
    int32 that maps them back."""
    batch, cache, hkv, d = kc.shape
    npages = cache // page
    perm = torch.randperm(batch * npages, device=kc.device)
    kp = kc.reshape(batch * npages, page, hkv, d)[perm.argsort()]
    vp = vc.reshape(batch * npages, page, hkv, vc.shape[-1])[perm.argsort()]
    return kp, vp, perm.view(batch, npages).to(torch.int32)


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _bench_graph(fn) -> Optional[float]:
    """ms per call replayed from a CUDA graph (None if the call cannot be captured)."""
    try:
        with torch.cuda.stream(torch.cuda.Stream()):
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception:  # noqa: BLE001 - capture unsupported by this provider
        torch.cuda.synchronize()
        return None


def copy_bandwidth(device, nbytes: int = 2 << 30) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = _bench(lambda: b.copy_(a))
    a = b = None  # free (not ``del``: the lambda above refers to them)
    return 2 * nbytes / ms * 1e-6


# ------------------------------------------------------------------------------------------- FlexAttention
def flex_fn():
    """``torch.compile(flex_attention, dynamic=False)``, built once per process (dynamo's recompile limits raised
    so that a recompile per shape / block mask never falls back to the unfused eager path)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        from tileattn.bench import configure_dynamo_for_many_shapes
        configure_dynamo_for_many_shapes()
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_contiguous_call(q, k_cache, v_cache, flex=None):
    """q (B, 1, Hq, D), cache (B, S, Hkv, D) -> a call returning flex's out in (B, Hq, 1, D) layout."""
    flex = flex or flex_fn()
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    gqa = q.shape[2] != k_cache.shape[2]
    return lambda: flex(qt, kt, vt, block_mask=None, enable_gqa=gqa)


def paged_block_mask(block_table, page_size: int, num_pages: int, q_len: int = 1):
    """Physical BlockMask over a paged cache of ``num_pages`` pages for batch rows whose pages are listed in
    ``block_table`` (B, pages per row), every row using all its pages in full. Returns (mask, how it was built)."""
    from torch.nn.attention.flex_attention import BlockMask, noop_mask
    batch, row_pages = block_table.shape
    dev = block_table.device
    bt = block_table.long()
    zero_rows = torch.zeros(batch, 1, 1, dtype=torch.int32, device=dev)
    full_rows = torch.full((batch, 1, 1), row_pages, dtype=torch.int32, device=dev)
    block_size = (FLEX_Q_BLOCK, page_size)
    try:
        from torch.nn.attention.experimental._paged_attention import PagedAttention
    except ImportError:
        PagedAttention = None
    if PagedAttention is not None:
        # Logical mask: page j of row b is logical KV block j, a full block (no mask_mod inside the kernel).
        logical_idx = torch.arange(row_pages, dtype=torch.int32, device=dev).expand(batch, 1, 1, row_pages)
        logical = BlockMask.from_kv_blocks(zero_rows, torch.zeros_like(logical_idx), full_rows,
                                           logical_idx.contiguous(), BLOCK_SIZE=block_size, mask_mod=noop_mask,
                                           seq_lengths=(q_len, row_pages * page_size))
        pa = PagedAttention(num_pages, page_size, batch, device=dev)
        # Our block table instead of reserve()'s allocator, so flex reads the very pages tileattn-paged reads.
        pa.page_table[:, :row_pages] = bt
        pa.physical_to_logical.scatter_(1, bt, torch.arange(row_pages, device=dev).expand(batch, row_pages))
        pa.capacity.fill_(row_pages * page_size)
        pa.empty_pages = []
        return pa.convert_logical_block_mask(logical), "PagedAttention.convert_logical_block_mask"
    owner = torch.full((num_pages,), -1, dtype=torch.int32, device=dev)
    owner[bt.flatten()] = torch.arange(batch, dtype=torch.int32, device=dev).repeat_interleave(row_pages)

    def mask_mod(b, h, q_idx, kv_idx):
        return owner[kv_idx // page_size] == b

    full_idx = torch.zeros(batch, 1, 1, num_pages, dtype=torch.int32, device=dev)
    full_idx[:, 0, 0, :row_pages] = block_table.to(torch.int32)
    mask = BlockMask.from_kv_blocks(zero_rows, torch.zeros_like(full_idx), full_rows, full_idx,
                                    BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(q_len, num_pages * page_size))
    return mask, "BlockMask.from_kv_blocks (block table)"


def flex_paged_call(q, k_pages, v_pages, block_table, flex=None):
    """q (B, 1, Hq, D), pages (num_pages, page_size, Hkv, D), block_table (B, pages per row) -> a call returning
    flex's out in (B, Hq, 1, D) layout. The cache goes in as PagedAttention's (1, Hkv, num_pages * page_size, D)
    physical layout: a view of the pages, no copy."""
    flex = flex or flex_fn()
    num_pages, page_size, hkv, d = k_pages.shape
    kt = k_pages.view(1, num_pages * page_size, hkv, d).transpose(1, 2)
    vt = v_pages.view(1, num_pages * page_size, hkv, v_pages.shape[-1]).transpose(1, 2)
    qt = q.transpose(1, 2)
    mask, _ = paged_block_mask(block_table, page_size, num_pages, q_len=q.shape[1])
    gqa = q.shape[2] != hkv
    return lambda: flex(qt, kt, vt, block_mask=mask, enable_gqa=gqa)


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        try:
            self.messages.append(record.getMessage())
        except Exception:  # noqa: BLE001
            pass


@contextlib.contextmanager
def _uncached_inductor():
    """Inductor's FX-graph and AOT-autograd caches off, so a cached compile still runs the lowering (and logs)."""
    with contextlib.ExitStack() as stack:
        for mod_name, key in (("torch._inductor.config", "fx_graph_cache"),
                              ("torch._functorch.config", "enable_autograd_cache")):
            try:
                mod = importlib.import_module(mod_name)
                if hasattr(mod, key):
                    stack.enter_context(mod.patch(**{key: False}))
            except Exception:  # noqa: BLE001
                pass
        yield


def flex_first_call(call):
    """The untimed first call of a flex anchor (compiles). Raises if flex ran eagerly (unfused); returns
    (out, note) where the note says which kernel inductor's lowering chose."""
    import torch.nn.attention.flex_attention as fa
    getattr(fa, "_WARNINGS_SHOWN", set()).discard("flex_attention_performance")  # re-arm the eager warning
    handler = _ListHandler()
    saved = []
    for name in _FLEX_DECODING_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.level, lg.propagate))
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, _uncached_inductor():
            warnings.simplefilter("always")
            out = call()
            if out.is_cuda:
                torch.cuda.synchronize()
    finally:
        for lg, level, propagate in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
    eager = [str(w.message) for w in caught if "without torch.compile" in str(w.message)]
    if eager:
        raise RuntimeError("flex_attention ran eagerly (unfused): " + eager[0][:100])
    chosen = [m.group(1) for m in (re.search(r"Use flex decoding (True|False)", s) for s in handler.messages) if m]
    if not chosen:
        note = "[kernel not confirmed]"
    elif all(c == "True" for c in chosen):
        note = "[flex_decoding]"
    else:
        note = "[main flex kernel]"
    return out, note


# ------------------------------------------------------------------------------------------------- the run
def _sdpa_skip(reason):
    def call():
        raise RuntimeError(f"skipped: {reason}")
    return call


def explore_settings(variant: str):
    """The environment of one ``--explore`` row while it runs (a context manager): ``&``-joined parts, each
    NAME=VALUE or a bare TILEATTN_DECODE_CONFIG string (block_n,warps,stages,programs_per_sm); restored after."""
    return env_vars([part.split("=", 1) if "=" in part else ("TILEATTN_DECODE_CONFIG", part)
                     for part in variant.split("&")])


def run(out_dir: str, dtype=torch.bfloat16, flex_pages=(256,), explore=(), graphs=True):
    """flex_pages: page sizes that get a flex-paged anchor; explore: TILEATTN_DECODE_CONFIG strings
    (block_n,warps,stages,programs_per_sm) or NAME=VALUE environment settings, measured as extra tileattn rows;
    graphs: also time CUDA-graph replay."""
    import tileattn
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"copy bandwidth {bw:.0f} GB/s (same run)", flush=True)
    print(f"{'batch':>5} {'cache':>7} {'Hq/Hkv':>7} {'D':>4} {'page':>5} {'provider':<16} {'us':>9} "
          f"{'graph us':>9} {'GB/s':>7} {'x copy':>7}", flush=True)
    rows = []
    for batch, cache, hq, hkv, d in CONFIGS:
        q, kc, vc, lens = decode_inputs(batch, cache, hq, hkv, d, dev, dtype)
        nbytes = (kc.numel() + vc.numel() + 2 * q.numel()) * kc.element_size()
        cases = []
        paged = []
        for page in PAGE_SIZES:
            if page is None:
                cases.append(("tileattn", None,
                              lambda: tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)))
            else:
                kp, vp, bt = paged_copy(kc, vc, page)
                paged.append((page, kp, vp, bt))
                cases.append(("tileattn-paged", page, lambda kp=kp, vp=vp, bt=bt: tileattn.flash_attn_with_kvcache(
                    q, kp, vp, cache_seqlens=lens, block_table=bt)))
        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
            if be == SDPBackend.EFFICIENT_ATTENTION and hq != hkv:
                cases.append((name, None, _sdpa_skip("mem-efficient SDPA has no enable_gqa (GQA) support")))
                continue

            def call(be=be):
                with sdpa_kernel(be):
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=hq != hkv)
            cases.append((name, None, call))
        # FlexAttention: the calls (and paged block masks) are built lazily, inside the per-case try below.
        cases.append(("flex", None, lambda: flex_contiguous_call(q, kc, vc)))
        for page, kp, vp, bt in paged:
            if page in flex_pages:
                cases.append(("flex-paged", page, lambda kp=kp, vp=vp, bt=bt: flex_paged_call(q, kp, vp, bt)))
        # Launch-parameter variants of tileattn (configs.decode_config via TILEATTN_DECODE_CONFIG), same run
        for variant in explore:
            def with_variant(fn, variant=variant):
                def call():
                    with explore_settings(variant):
                        return fn()
                return call
            cases.append((f"tileattn[{variant}]", None, with_variant(
                lambda: tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens))))
            for page, kp, vp, bt in paged:  # every page size (TILEATTN_DECODE_PAGED_TMA applies to large pages)
                cases.append((f"tileattn-paged[{variant}]", page, with_variant(
                    lambda kp=kp, vp=vp, bt=bt: tileattn.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens,
                                                                                 block_table=bt))))
        ref = None
        for name, page, call in cases:
            note = ""
            try:
                is_flex = name.startswith("flex")
                with warnings.catch_warnings():
                    if name.startswith("sdpa"):  # "Flash attention kernel not used because ..." and the like
                        warnings.simplefilter("ignore", UserWarning)
                    if is_flex:
                        call = call()  # build the compiled call (and block mask) outside the timed region
                        out, note = flex_first_call(call)  # compiles: outside the timed region
                        out = out.transpose(1, 2)  # (B, Hq, 1, D) -> (B, 1, Hq, D)
                    else:
                        out = call()
                    if name == "tileattn":
                        ref = out.float()
                    elif name.startswith("tileattn") or is_flex:
                        if ref is None:
                            note = (note + " [unchecked: no tileattn result]").strip()
                        else:
                            diff = (out.float() - ref).abs().max().item()
                            if not diff < 2e-2:  # NaN fails too
                                raise AssertionError(f"{name} differs from tileattn contiguous (max abs diff "
                                                     f"{diff:.3g})")
                    del out
                    us = _bench(call) * 1e3
                    graph_ms = _bench_graph(call) if graphs else None
                us_graph = graph_ms * 1e3 if graph_ms is not None else None
                gbs = nbytes / (us_graph or us) * 1e-3
                print(f"{batch:>5} {cache:>7} {hq:>3}/{hkv:<3} {d:>4} {str(page or '-'):>5} {name:<16} {us:9.1f} "
                      f"{(f'{us_graph:9.1f}' if us_graph else '-'):>9} {gbs:7.0f} {gbs / bw:7.2f}"
                      + (f"  {note}" if note else ""), flush=True)
                rows.append(dict(batch=batch, cache=cache, q_heads=hq, kv_heads=hkv, head_dim=d, page=page or 0,
                                 provider=name, us=us, us_graph=us_graph if us_graph else "", gbps=gbs,
                                 x_copy=gbs / bw, copy_gbps=bw, device=torch.cuda.get_device_name()))
            except Exception as e:  # noqa: BLE001
                print(f"{batch:>5} {cache:>7} {hq:>3}/{hkv:<3} {d:>4} {str(page or '-'):>5} {name:<16} "
                      f"failed: {str(e)[:80]}", flush=True)
            call = None
        # free this config's tensors before the next (reassigned, not ``del``: the case closures refer to them)
        q = kc = vc = qt = kt = vt = cases = paged = ref = kp = vp = bt = None
        torch.cuda.empty_cache()
    if out_dir and rows:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"decode_{torch.cuda.get_device_name().replace(' ', '_')}.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        png = plot_decode(rows, path[:-4] + ".png")
        print(f"wrote {path}" + (f", {png}" if png else ""))


def plot_decode(rows, path: str) -> Optional[str]:
    """Grouped bars: fraction of the same run's copy bandwidth per (batch, cache, Hq/Hkv, D) and provider.
    Launch-variant rows (``tileattn[...]``) are left out. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - matplotlib is an optional extra
        return None
    rows = [r for r in rows if "[" not in r["provider"]]
    if not rows:
        return None
    configs = list(dict.fromkeys((r["batch"], r["cache"], r["q_heads"], r["kv_heads"], r["head_dim"]) for r in rows))
    series = list(dict.fromkeys((r["provider"], r["page"]) for r in rows))
    by = {(r["batch"], r["cache"], r["q_heads"], r["kv_heads"], r["head_dim"], r["provider"], r["page"]): r["x_copy"]
          for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(configs)), 5.5))
    width = 0.8 / len(series)
    for i, (prov, page) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(configs))]
        ys = [by.get(c + (prov, page), 0.0) for c in configs]
        ax.bar(xs, ys, width, label=prov + (f" (page {page})" if page else ""))
    ax.axhline(0.85, color="gray", linestyle="--", linewidth=1, label="0.85 (issue 5's bar)")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"B={b} cache={c}\nHq/Hkv={hq}/{hk} D={d}" for b, c, hq, hk, d in configs], fontsize=8)
    ax.set_ylabel("x copy bandwidth (same run)")
    ax.set_title(f"decode step, {rows[0]['device']}: bytes to read / time vs device copy")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--flex-pages", default="256",
                    help="page sizes with a flex-paged anchor (comma-separated; '' none)")
    ap.add_argument("--explore", default="", help="';'-separated decode configs block_n,warps,stages,programs_per_sm "
                    "or NAME=VALUE environment settings ('&' joins several in one row), measured as extra "
                    "tileattn rows (e.g. '64,4,2,4;TILEATTN_DECODE_COMBINE=fused;"
                    "TILEATTN_DECODE_PAGED_TMA=1&32,4,3,2')")
    ap.add_argument("--no-graphs", action="store_true", help="eager timings only (no CUDA-graph replay column)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU")
        return 1
    run(args.out_dir, flex_pages=tuple(int(x) for x in args.flex_pages.split(",") if x),
        explore=tuple(x for x in args.explore.split(";") if x), graphs=not args.no_graphs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
