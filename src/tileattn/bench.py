"""Benchmark tileattn against PyTorch's attention kernels (``python -m tileattn.bench``, ``tileattn-bench``).

On a CUDA GPU
-------------
Runs flash-attn's benchmark grid: 16k tokens per batch (``batch = 16384 // seqlen``), model dim 2048
(``heads = 2048 // head_dim``, Hq == Hkv), head dims 64 / 128 / 256, causal and not, seqlens 512 .. 16k,
modes fwd / bwd / fwd_bwd, bf16 (``--dtype fp16`` for half). Providers, timed in the same run on the same card:

* ``tileattn``        ``tileattn.attention(q, k, v, causal=...)`` on (B, S, H, D) tensors
* ``sdpa_flash``      ``F.scaled_dot_product_attention`` on (B, H, S, D) views (``q.transpose(1, 2)``)
* ``sdpa_cudnn``      under ``sdpa_kernel(SDPBackend.X)``; a backend that refuses a config is recorded as
* ``sdpa_efficient``  unsupported (NaN) with the reason
* ``flex``            ``torch.compile(flex_attention)``, causal through a cached ``create_block_mask``

Timing is ``triton.testing.do_bench(..., return_mode="median")`` (CUDA events) after a warm-up call. fwd times a
plain forward call with ``requires_grad`` inputs; bwd times ``out.backward(dout, retain_graph=True)`` on a saved
output (grads reset through ``grad_to_none``); fwd_bwd times both. TFLOP/s by flash-attn's convention:
fwd = 4 * B * H * S^2 * D (halved when causal), bwd = 2.5 x fwd, fwd_bwd = 3.5 x fwd.

Prints a header and one table per (head dim, causal, mode) with tileattn's ratio to each other provider, and
writes ``<out-dir>/<prefix>_<gpu>_<dtype>[_<tag>].{csv,txt,png}`` (default out-dir ``benchmarks/results``).
``--check`` first compares tileattn's output and gradients with SDPA's at each shape, and both with a float64
reference on one (batch, head) slice.

Without a GPU
-------------
Runs a small demo through Triton's CPU interpreter (``TRITON_INTERPRET=1``): a few small shapes (fp32 and fp16,
causal and not, GQA / MQA, odd head dims, seqlen_q != seqlen_k) forward and backward, checked against
``tileattn.reference.attention_ref`` with flash-attn's accuracy rule, ending with ``demo: all N checks passed``
(exit 0) or the failures (exit 1). ``--demo`` runs the same checks on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import math
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

# NOTE: nothing here imports triton or tileattn's kernels at module level: without a GPU, TRITON_INTERPRET=1
# must be set before the first ``import triton`` (see _ensure_triton_interpreter).

PROVIDERS = ("tileattn", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex")
# Opt-in experiments, measurable beside the default (not in the default list): tileattn_tma / tileattn_notma = the
# forward with K/V always / never through tensor descriptors (TILEATTN_TMA=1 / 0; unset, configs.use_tma's table
# decides); tileattn_split / tileattn_merged = the forward's causal/window edge tiles in their own loops / inside
# the one pipelined loop (TILEATTN_FWD_EDGES=split / merged; unset, configs.merge_edges decides); the backward's
# other delta modes (configs.delta_mode):
# tileattn_correct = no stored residual, delta corrected in the dQ kernel (one more matmul per tile);
# tileattn_rounded = FlashAttention's delta from the rounded output, uncorrected;
# tileattn_triton = the portable Triton kernels where the Hopper Gluon kernels would run (TILEATTN_GLUON=0);
# tileattn_gluon_all = the Gluon kernels with their table entries not yet measured as well (TILEATTN_GLUON=all);
# tileattn_persistent / tileattn_grid = the Gluon forward always / never on a persistent grid
# (TILEATTN_GLUON_PERSISTENT=1 / 0, D <= 128; unset, configs.gluon_forward_schedule decides; causal calls on it walk
# the host's L2-grouped work list, _hostinfo.causal_schedule); tileattn_persistent_lpt = the same with the kernel's
# LPT order instead (TILEATTN_CAUSAL_LIST=0);
# tileattn_flat = the persistent grid with one pipeline across its items (TILEATTN_GLUON_FLAT=1, kernels/gluon_flat.py;
# the persistent grid forced on too, so causal calls take it); tileattn_plans / tileattn_noplans = launch plans on / off
# (TILEATTN_LAUNCH_PLANS, kernels/plans.py); tileattn_r8 / tileattn_r16 = the forward's rounding residual packed to
# int8 / in the input dtype (TILEATTN_RESIDUAL, configs.residual_dtype). A value is one (variable, value) pair or a
# tuple of them.
ENV_PROVIDERS = {"tileattn_triton": ("TILEATTN_GLUON", "0"), "tileattn_gluon_all": ("TILEATTN_GLUON", "all"),
                 "tileattn_persistent": ("TILEATTN_GLUON_PERSISTENT", "1"),
                 "tileattn_persistent_lpt": (("TILEATTN_GLUON_PERSISTENT", "1"), ("TILEATTN_CAUSAL_LIST", "0")),
                 "tileattn_grid": ("TILEATTN_GLUON_PERSISTENT", "0"),
                 "tileattn_tma": ("TILEATTN_TMA", "1"), "tileattn_notma": ("TILEATTN_TMA", "0"),
                 "tileattn_split": ("TILEATTN_FWD_EDGES", "split"),
                 "tileattn_merged": ("TILEATTN_FWD_EDGES", "merged"),
                 "tileattn_correct": ("TILEATTN_DELTA", "correct"),
                 "tileattn_rounded": ("TILEATTN_DELTA", "rounded"),
                 "tileattn_flat": (("TILEATTN_GLUON_PERSISTENT", "1"), ("TILEATTN_GLUON_FLAT", "1")),
                 "tileattn_plans": ("TILEATTN_LAUNCH_PLANS", "1"), "tileattn_noplans": ("TILEATTN_LAUNCH_PLANS", "0"),
                 "tileattn_r8": ("TILEATTN_RESIDUAL", "int8"), "tileattn_r16": ("TILEATTN_RESIDUAL", "full")}
EXTRA_PROVIDERS = tuple(ENV_PROVIDERS)
ANCHOR_LABELS = {"sdpa_flash": "flash", "sdpa_cudnn": "cudnn", "sdpa_efficient": "effic", "flex": "flex"}
MODES = ("fwd", "bwd", "fwd_bwd")
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
DEFAULT_HEAD_DIMS = (64, 128, 256)
DEFAULT_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
TOTAL_TOKENS = 16384
MODEL_DIM = 2048
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "half": "float16", "fp32": "float32", "float32": "float32"}
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}

CSV_COLUMNS = ("provider", "head_dim", "causal", "seqlen", "batch", "heads", "mode", "ms", "tflops", "device",
               "dtype", "status", "note", "max_abs_diff", "first_call_s", "commit", "timestamp", "tag", "torch",
               "triton", "tileattn", "sm_clock_mhz", "power_w", "power_capped")


# ----------------------------------------------------------------------------------------------- pure helpers
def attention_flops(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool, mode: str = "fwd") -> float:
    """FLOPs of one attention call by flash-attn's benchmark convention.

    fwd = 4 * batch * heads * seqlen^2 * head_dim (two matmuls of 2 * S^2 * D each), halved when causal;
    bwd = 2.5 x fwd; fwd_bwd = 3.5 x fwd.
    """
    if mode not in MODE_FLOP_FACTOR:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    fwd = 4.0 * batch * heads * seqlen * seqlen * head_dim
    if causal:
        fwd /= 2.0
    return fwd * MODE_FLOP_FACTOR[mode]


def tflops_from_ms(flops: float, ms: float) -> float:
    """TFLOP/s for ``flops`` done in ``ms`` milliseconds; NaN when the time is missing or not positive."""
    if ms is None or not math.isfinite(ms) or ms <= 0:
        return float("nan")
    return flops / (ms * 1e-3) / 1e12


@dataclass(frozen=True)
class Shape:
    head_dim: int
    causal: bool
    seqlen: int
    batch: int
    heads: int

    def flops(self, mode: str) -> float:
        return attention_flops(self.batch, self.heads, self.seqlen, self.head_dim, self.causal, mode)

    def label(self) -> str:
        return (f"hd={self.head_dim} causal={int(self.causal)} S={self.seqlen} "
                f"B={self.batch} H={self.heads}")


def make_grid(head_dims: Iterable[int], seqlens: Iterable[int], causals: Iterable[bool],
              total_tokens: int = TOTAL_TOKENS, model_dim: int = MODEL_DIM) -> List[Shape]:
    """flash-attn's grid: batch = total_tokens // seqlen (at least 1), heads = model_dim // head_dim.

    Ordered head dim, causal, seqlen (so a (head dim, causal) group finishes before the next starts).
    """
    shapes = []
    for d in head_dims:
        if d <= 0 or model_dim % d:
            raise ValueError(f"head dim {d} does not divide the model dim {model_dim}")
        for c in causals:
            for s in seqlens:
                if s <= 0:
                    raise ValueError(f"seqlen must be positive, got {s}")
                shapes.append(Shape(head_dim=d, causal=bool(c), seqlen=s, batch=max(1, total_tokens // s),
                                    heads=model_dim // d))
    return shapes


@dataclass
class Result:
    """One measurement (one CSV row)."""
    provider: str
    head_dim: int
    causal: bool
    seqlen: int
    batch: int
    heads: int
    mode: str
    ms: float = float("nan")
    tflops: float = float("nan")
    status: str = "ok"  # ok | unsupported | oom | error | skipped
    note: str = ""
    max_abs_diff: float = float("nan")  # tileattn vs SDPA output (--check)
    first_call_s: float = float("nan")  # warm-up call (compilation / JIT) wall time
    bench_s: float = float("nan")  # wall time spent in the timer
    sm_clock_mhz: float = float("nan")  # median SM clock over the timing (bench_clock; NaN without nvidia-smi)
    power_w: float = float("nan")  # median power draw over the timing (bench_clock)
    power_capped: float = float("nan")  # fraction of its samples with the power cap holding the clock (bench_clock)
    bench_window: Optional[Tuple[float, float]] = None  # time.time() at the timing's start and end

    @classmethod
    def of(cls, provider: str, shape: Shape, mode: str, ms: float = float("nan"), status: str = "ok",
           note: str = "") -> "Result":
        ok = status == "ok" and ms is not None and math.isfinite(ms)
        return cls(provider=provider, head_dim=shape.head_dim, causal=shape.causal, seqlen=shape.seqlen,
                   batch=shape.batch, heads=shape.heads, mode=mode, ms=ms if ok else float("nan"),
                   tflops=tflops_from_ms(shape.flops(mode), ms) if ok else float("nan"),
                   status=status if (ok or status != "ok") else "error", note=note)


def seqlen_label(s: int) -> str:
    return f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s)


def _fmt(x: float, spec: str = ".1f", missing: str = "-") -> str:
    return format(x, spec) if x is not None and math.isfinite(x) else missing


def _fmt_tflops(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.1f}" if abs(x) >= 1 else f"{x:.3g}"


def _ratio(a: float, b: float) -> float:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return float("nan")
    return a / b


def _ordered_unique(xs):
    seen, out = set(), []
    for x in xs:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _ordered_providers(results: Sequence[Result], providers: Optional[Sequence[str]]) -> List[str]:
    present = _ordered_unique(r.provider for r in results)
    if providers is None:
        providers = [p for p in PROVIDERS if p in present] + [p for p in present if p not in PROVIDERS]
    return [p for p in providers if p in present]


def _anchor_label(p: str) -> str:
    return ANCHOR_LABELS.get(p, p)


def format_table(results: Sequence[Result], head_dim: int, causal: bool, mode: str,
                 providers: Optional[Sequence[str]] = None, dtype: str = "") -> str:
    """One table: rows seqlen, columns TFLOP/s per provider, then tileattn / each other provider."""
    rows = [r for r in results if r.head_dim == head_dim and r.causal == causal and r.mode == mode]
    if not rows:
        return ""
    provs = _ordered_providers(rows, providers)
    by = {(r.seqlen, r.provider): r for r in rows}
    anchors = [p for p in provs if p != "tileattn"] if "tileattn" in provs else []
    head = ["seqlen", "batch", "heads"] + provs + [f"x {_anchor_label(a)}" for a in anchors]
    lines = []
    for s in sorted(_ordered_unique(r.seqlen for r in rows)):
        any_r = next(r for r in rows if r.seqlen == s)
        cells = [seqlen_label(s), str(any_r.batch), str(any_r.heads)]
        for p in provs:
            r = by.get((s, p))
            cells.append(_fmt_tflops(r.tflops) if r is not None else "")
        t = by.get((s, "tileattn"))
        for a in anchors:
            r = by.get((s, a))
            cells.append(_fmt(_ratio(t.tflops if t else None, r.tflops if r else None), ".2f"))
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    title = f"== {mode} | head_dim={head_dim} | causal={causal}" + (f" | {dtype}" if dtype else "") \
        + " | TFLOP/s (higher is better) =="
    out = [title, "  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in lines]
    notes = group_notes(rows, provs)
    if notes:
        out.append("  not measured:")
        out += ["    " + n for n in notes]
    return "\n".join(out)


def group_notes(rows: Sequence[Result], providers: Sequence[str]) -> List[str]:
    """One line per (provider, status, note) among the failed rows, with the seqlens it covers."""
    groups: Dict[Tuple[str, str, str], List[int]] = {}
    for r in rows:
        if r.status != "ok":
            groups.setdefault((r.provider, r.status, r.note), []).append(r.seqlen)
    order = {p: i for i, p in enumerate(providers)}
    lines = []
    for (p, status, note), seqlens in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[1][0])):
        ss = sorted(set(seqlens))
        where = "S=" + ",".join(seqlen_label(x) for x in ss)
        lines.append(f"{p} {where}: {status}" + (f" ({note})" if note else ""))
    return lines


def format_tables(results: Sequence[Result], providers: Optional[Sequence[str]] = None, dtype: str = "",
                  modes: Optional[Sequence[str]] = None) -> str:
    """All tables, grouped by (head dim, causal), modes in order."""
    groups = _ordered_unique((r.head_dim, r.causal) for r in results)
    modes = modes or [m for m in MODES if any(r.mode == m for r in results)]
    blocks = []
    for d, c in groups:
        for m in modes:
            t = format_table(results, d, c, m, providers, dtype)
            if t:
                blocks.append(t)
    return "\n\n".join(blocks)


def geomean(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x) and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def format_summary(results: Sequence[Result], providers: Optional[Sequence[str]] = None) -> str:
    """Geometric mean over all measured shapes of tileattn's speed ratio to each other provider, per mode."""
    provs = _ordered_providers(results, providers)
    if "tileattn" not in provs or len(provs) < 2:
        return ""
    anchors = [p for p in provs if p != "tileattn"]
    by = {(r.provider, r.head_dim, r.causal, r.seqlen, r.mode): r.tflops for r in results}
    modes = [m for m in MODES if any(r.mode == m for r in results)]
    head = ["mode"] + [f"x {_anchor_label(a)}" for a in anchors]
    lines = []
    for m in modes:
        cells = [m]
        for a in anchors:
            ratios = [_ratio(t, by.get((a, d, c, s, mm)))
                      for (p, d, c, s, mm), t in by.items() if p == "tileattn" and mm == m]
            n = sum(1 for x in ratios if math.isfinite(x))
            cells.append(f"{_fmt(geomean(ratios), '.2f')} ({n})")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    out = ["== tileattn speed / other provider: geometric mean over shapes (number of shapes) =="]
    out.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    out += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(out)


def write_csv(results: Sequence[Result], path: str, meta: Optional[Dict[str, str]] = None) -> str:
    """One row per measurement; ``meta`` fills the per-run columns (device, dtype, commit, timestamp, ...)."""
    meta = dict(meta or {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in results:
            row = {k: meta.get(k, "") for k in CSV_COLUMNS}
            row.update(provider=r.provider, head_dim=r.head_dim, causal=r.causal, seqlen=r.seqlen,
                       batch=r.batch, heads=r.heads, mode=r.mode, ms=_csv_float(r.ms, ".6g"),
                       tflops=_csv_float(r.tflops, ".4g"), status=r.status, note=r.note,
                       max_abs_diff=_csv_float(r.max_abs_diff, ".3e"), first_call_s=_csv_float(r.first_call_s, ".3g"),
                       sm_clock_mhz=_csv_float(r.sm_clock_mhz, ".0f"), power_w=_csv_float(r.power_w, ".0f"),
                       power_capped=_csv_float(r.power_capped, ".2f"))
            w.writerow(row)
    os.replace(tmp, path)
    return path


def _csv_float(x: float, spec: str) -> str:
    return format(x, spec) if x is not None and math.isfinite(x) else "nan"


def read_csv(path: str) -> List[Result]:
    """Read back a CSV written by :func:`write_csv` (e.g. to re-plot or re-tabulate an old run)."""
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.append(Result(provider=row["provider"], head_dim=int(row["head_dim"]),
                              causal=row["causal"].strip().lower() in ("true", "1"), seqlen=int(row["seqlen"]),
                              batch=int(row["batch"]), heads=int(row["heads"]), mode=row["mode"],
                              ms=float(row["ms"] or "nan"), tflops=float(row["tflops"] or "nan"),
                              status=row.get("status") or "ok", note=row.get("note") or "",
                              max_abs_diff=float(row.get("max_abs_diff") or "nan"),
                              first_call_s=float(row.get("first_call_s") or "nan"),
                              sm_clock_mhz=float(row.get("sm_clock_mhz") or "nan"),
                              power_w=float(row.get("power_w") or "nan"),
                              power_capped=float(row.get("power_capped") or "nan")))
    return out


def plot_results(results: Sequence[Result], path: str, title: str = "",
                 providers: Optional[Sequence[str]] = None) -> Optional[str]:
    """PNG: a grid of subplots, rows = modes, columns = (head dim, causal); TFLOP/s vs seqlen, a line per provider.

    Returns the path, or None when matplotlib is missing or there is nothing to plot.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - matplotlib is an optional extra
        return None
    if not results:
        return None
    provs = _ordered_providers(results, providers)
    groups = _ordered_unique((r.head_dim, r.causal) for r in results)
    modes = [m for m in MODES if any(r.mode == m for r in results)]
    nrows, ncols = len(modes), len(groups)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 0.6, 2.9 * nrows + 0.9), squeeze=False)
    styles = {"tileattn": dict(color="tab:red", marker="o", linewidth=2.2, zorder=5),
              "sdpa_flash": dict(color="tab:blue", marker="s"), "sdpa_cudnn": dict(color="tab:green", marker="^"),
              "sdpa_efficient": dict(color="tab:gray", marker="v"), "flex": dict(color="tab:purple", marker="D"),
              "tileattn_tma": dict(color="tab:orange", marker="x", linestyle="--"),
              "tileattn_notma": dict(color="tab:orange", marker="+", linestyle=":"),
              "tileattn_split": dict(color="tab:pink", marker="x", linestyle=":"),
              "tileattn_merged": dict(color="tab:pink", marker="+", linestyle="--"),
              "tileattn_rounded": dict(color="tab:brown", marker="+", linestyle="--"),
              "tileattn_correct": dict(color="tab:purple", marker="1", linestyle="--"),
              "tileattn_persistent": dict(color="tab:olive", marker="*", linestyle="--"),
              "tileattn_grid": dict(color="tab:olive", marker="+", linestyle=":")}
    by = {}
    for r in results:
        by.setdefault((r.mode, r.head_dim, r.causal, r.provider), []).append(r)
    seqlens = sorted(_ordered_unique(r.seqlen for r in results))
    handles, measured = {}, set()
    for i, m in enumerate(modes):
        for j, (d, c) in enumerate(groups):
            ax = axes[i][j]
            for p in provs:
                rs = sorted(by.get((m, d, c, p), []), key=lambda r: r.seqlen)
                if not rs:
                    continue
                xs = [r.seqlen for r in rs]
                ys = [r.tflops if math.isfinite(r.tflops) else float("nan") for r in rs]
                (h,) = ax.plot(xs, ys, label=p, markersize=4, **styles.get(p, {}))
                handles.setdefault(p, h)
                if any(math.isfinite(y) for y in ys):
                    measured.add(p)
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens)
            ax.set_xticklabels([seqlen_label(s) for s in seqlens], fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{m}  hd={d}  {'causal' if c else 'non-causal'}", fontsize=9)
            if j == 0:
                ax.set_ylabel("TFLOP/s", fontsize=8)
            if i == nrows - 1:
                ax.set_xlabel("seqlen", fontsize=8)
    if handles:
        labels = [p if p in measured else f"{p} (not measured)" for p in handles]
        fig.legend(list(handles.values()), labels, loc="upper center", ncol=len(handles),
                   fontsize=9, frameon=False, bbox_to_anchor=(0.5, 1.0 - 0.02 / max(1, nrows)))
    if title:
        fig.suptitle(title, fontsize=10, y=0.995 + 0.005 * nrows)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.9 * nrows + 0.9)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def classify_error(exc: BaseException, warning_msgs: Sequence[str] = ()) -> Tuple[str, str]:
    """(status, note) for an exception raised by a provider: oom, unsupported (with the reason) or error."""
    msg = " ".join(str(exc).split())
    name = type(exc).__name__
    if "OutOfMemoryError" in name or "out of memory" in msg.lower():
        return "oom", "CUDA out of memory"
    low = msg.lower()
    if isinstance(exc, NotImplementedError) or any(
            pat in low for pat in ("no available kernel", "no viable backend", "not supported", "unsupported",
                                   "does not support")):
        reasons = _ordered_unique(" ".join(w.split()) for w in warning_msgs if w.strip())
        reason = "; ".join(reasons[:4]) if reasons else msg
        return "unsupported", _shorten(reason, 240)
    return "error", _shorten(f"{name}: {msg}", 200)


def _shorten(s: str, n: int) -> str:
    s = s.replace("\n", " ").replace(",", ";")
    return s if len(s) <= n else s[: n - 3] + "..."


def parse_list(text: str, kind=str) -> List:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    return [kind(x) for x in items]


def _parse_seqlen(x: str) -> int:
    x = x.strip().lower()
    return int(float(x[:-1]) * 1024) if x.endswith("k") else int(x)


def output_basename(prefix: str, device_name: str, dtype: str, tag: str = "") -> str:
    """``<prefix>_<gpu slug>_<dtype>[_<tag>]``, e.g. ``tileattn_h100-80gb-hbm3_bf16``."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    slug = re.sub(r"^nvidia-", "", slug) or "device"
    parts = [prefix, slug, SHORT_DTYPE.get(dtype, dtype)]
    if tag:
        parts.append(re.sub(r"[^A-Za-z0-9._-]+", "-", tag))
    return "_".join(p for p in parts if p)


def git_commit(start: Optional[str] = None) -> str:
    """Short commit of the repository holding this file (``+dirty`` if tracked files changed), else 'unknown'."""
    env = os.environ.get("TILEATTN_COMMIT")
    if env:
        return env
    d = os.path.abspath(start or os.path.dirname(__file__))
    root = None
    while True:
        if os.path.exists(os.path.join(d, ".git")):
            root = d
            break
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    if root is None:
        return "unknown"
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tileattn.bench",
        description="Benchmark tileattn vs SDPA (flash / cuDNN / efficient) and flex attention on flash-attn's "
                    "grid (GPU), or run a small interpreted accuracy demo (no GPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--head-dims", default=",".join(map(str, DEFAULT_HEAD_DIMS)), help="comma-separated head dims")
    p.add_argument("--seqlens", default=",".join(map(str, DEFAULT_SEQLENS)),
                   help="comma-separated sequence lengths (1k style allowed)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated, from {','.join(PROVIDERS)}")
    p.add_argument("--causal", choices=("both", "true", "false"), default="both")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--total-tokens", type=int, default=TOTAL_TOKENS, help="batch = total_tokens // seqlen")
    p.add_argument("--model-dim", type=int, default=MODEL_DIM, help="heads = model_dim // head_dim")
    p.add_argument("--warmup", type=float, default=100,
                   help="do_bench warm-up time (ms); long enough for the clocks to leave idle (H200: 480 MHz)")
    p.add_argument("--rep", type=float, default=50, help="do_bench measuring time (ms); the median is reported")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every provider this many times per shape, taking turns, and keep the median round")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"), help="where CSV / TXT / PNG go")
    p.add_argument("--prefix", default="tileattn", help="output file name prefix")
    p.add_argument("--tag", default="", help="label added to the file names and the CSV 'tag' column")
    p.add_argument("--check", action="store_true",
                   help="before timing each shape, compare tileattn's output and grads with SDPA's "
                        "(max abs diff) and with a float64 reference on one (batch, head) slice")
    p.add_argument("--flex-compile", choices=("dynamic", "static"), default="dynamic",
                   help="torch.compile(flex_attention, dynamic=True) compiles once per (head dim, causal, B==1); "
                        "'static' (dynamic=False) recompiles for every shape (slower start, specialised kernels)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--dry-run", action="store_true", help="print the grid and the number of measurements, exit")
    p.add_argument("--demo", action="store_true",
                   help="run the accuracy demo (default without a GPU; on a GPU it runs there, bf16 included)")
    p.add_argument("--quick", action="store_true", help="demo: only the first two cases")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.head_dims = parse_list(args.head_dims, int)
        args.seqlens = parse_list(args.seqlens, _parse_seqlen)
    except ValueError as e:
        p.error(f"bad number list: {e}")
    args.modes = parse_list(args.modes)
    args.providers = parse_list(args.providers)
    allowed_providers = PROVIDERS + EXTRA_PROVIDERS
    for name, got, allowed in (("mode", args.modes, MODES), ("provider", args.providers, allowed_providers)):
        bad = [x for x in got if x not in allowed]
        if bad:
            p.error(f"unknown {name}(s) {bad}; choose from {list(allowed)}")
        if not got:
            p.error(f"no {name} given")
    if not args.head_dims or not args.seqlens:
        p.error("need at least one head dim and one seqlen")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    args.causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    args.dtype_name = DTYPE_NAMES[args.dtype]
    return args


# ------------------------------------------------------------------------------------------------ progress
class Progress:
    """tqdm bar when tqdm is installed, else numbered plain lines; ``log`` prints above the bar."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.n, self._bar = total, 0, None
        if enabled:
            try:
                from tqdm import tqdm
                tty = sys.stderr.isatty()
                self._bar = tqdm(total=total, unit="meas", dynamic_ncols=True, file=sys.stderr,
                                 mininterval=0.5 if tty else 15.0, smoothing=0.1)
            except Exception:
                self._bar = None

    def step(self, desc: str, result: Optional[Result] = None):
        self.n += 1
        if self._bar is not None:
            self._bar.set_postfix_str(desc, refresh=False)
            self._bar.update(1)
        else:
            extra = ""
            if result is not None:
                extra = f"{result.tflops:7.1f} TFLOP/s" if result.status == "ok" else result.status
            print(f"[{self.n}/{self.total}] {desc} {extra}", flush=True)

    def log(self, msg: str):
        if self._bar is not None:
            self._bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)
        sys.stdout.flush()

    def close(self):
        if self._bar is not None:
            self._bar.close()


# ----------------------------------------------------------------------------------------------- providers
class Provider:
    """A callable ``(q, k, v) -> out`` on (B, S, H, D) tensors, with optional per-shape preparation."""
    name = "?"

    def context(self):
        return contextlib.nullcontext()

    def prepare(self, shape: Shape, device) -> None:
        pass

    def __call__(self, q, k, v):  # pragma: no cover - abstract
        raise NotImplementedError


class TileattnProvider(Provider):
    name = "tileattn"

    def __init__(self):
        import tileattn
        self._attention = tileattn.attention
        self.causal = False

    def prepare(self, shape, device):
        self.causal = shape.causal

    def __call__(self, q, k, v):
        return self._attention(q, k, v, causal=self.causal)


@contextlib.contextmanager
def env_var(name: str, value: str):
    """Set an environment variable for the duration of the block, then restore it (or remove it)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def env_vars(pairs):
    """``env_var`` for several (name, value) pairs at once, all restored after the block."""
    with contextlib.ExitStack() as stack:
        for name, value in pairs:
            stack.enter_context(env_var(name, value))
        yield


class TileattnEnvProvider(TileattnProvider):
    """tileattn with an opt-in mode switched on by an environment variable while it runs."""
    def __init__(self, name: str):
        super().__init__()
        pairs = ENV_PROVIDERS[name]
        self.name, self._pairs = name, pairs if isinstance(pairs[0], tuple) else (pairs,)

    def context(self):
        return env_vars(self._pairs)


class SdpaProvider(Provider):
    """``scaled_dot_product_attention`` on (B, H, S, D) transposed views, one backend forced."""

    BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}

    def __init__(self, name: str):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend
        self.name = name
        self._sdpa = F.scaled_dot_product_attention
        self._backend = getattr(SDPBackend, self.BACKENDS[name])
        self.causal = False

    def context(self):
        from torch.nn.attention import sdpa_kernel
        return sdpa_kernel(self._backend)

    def prepare(self, shape, device):
        self.causal = shape.causal

    def __call__(self, q, k, v):
        # transpose() views: no copies; the output comes back as a (B, S, H, D) view.
        return self._sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          is_causal=self.causal).transpose(1, 2)


def _causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def configure_dynamo_for_many_shapes(limit: int = 1024) -> Dict[str, int]:
    """Raise dynamo's recompile limits (names differ across torch versions) so per-shape recompiles of flex
    attention never fall back to eager; also allow ``backward(retain_graph=True)`` on compiled graphs."""
    import torch
    changed = {}
    cfg = torch._dynamo.config
    for name, value in (("cache_size_limit", limit), ("recompile_limit", limit),
                        ("accumulated_cache_size_limit", 8 * limit), ("accumulated_recompile_limit", 8 * limit)):
        if hasattr(cfg, name):
            try:
                setattr(cfg, name, max(int(getattr(cfg, name)), value))
                changed[name] = getattr(cfg, name)
            except Exception:
                pass
    try:  # donated buffers forbid retain_graph=True in the timed backward
        import torch._functorch.config as fcfg
        if hasattr(fcfg, "donated_buffer"):
            fcfg.donated_buffer = False
            changed["donated_buffer"] = False
    except Exception:
        pass
    return changed


class FlexProvider(Provider):
    """``torch.compile(flex_attention)``; causal through a block mask built outside the timed region, cached."""
    name = "flex"
    _compiled = {}

    def __init__(self, dynamic: bool = True):
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        configure_dynamo_for_many_shapes()
        key = bool(dynamic)
        if key not in FlexProvider._compiled:
            FlexProvider._compiled[key] = torch.compile(flex_attention, dynamic=key)
        self._flex = FlexProvider._compiled[key]
        self._create_block_mask = create_block_mask
        self._masks = {}
        self.block_mask = None

    def prepare(self, shape, device):
        try:  # flex warns "called without torch.compile" once per process: re-arm it so eager fallback is caught
            import torch.nn.attention.flex_attention as fa
            getattr(fa, "_WARNINGS_SHOWN", set()).discard("flex_attention_performance")
        except Exception:  # noqa: BLE001
            pass
        if not shape.causal:
            self.block_mask = None
            return
        key = (shape.seqlen, str(device))
        if key not in self._masks:
            self._masks[key] = self._create_block_mask(_causal_mask, None, None, shape.seqlen, shape.seqlen,
                                                       device=device)
        self.block_mask = self._masks[key]

    def __call__(self, q, k, v):
        return self._flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          block_mask=self.block_mask).transpose(1, 2)


def make_provider(name: str, flex_dynamic: bool = True) -> Provider:
    if name == "tileattn":
        return TileattnProvider()
    if name in ENV_PROVIDERS:
        return TileattnEnvProvider(name)
    if name in SdpaProvider.BACKENDS:
        return SdpaProvider(name)
    if name == "flex":
        return FlexProvider(dynamic=flex_dynamic)
    raise ValueError(f"unknown provider {name!r}")


# -------------------------------------------------------------------------------------------- measurement
BenchFn = Callable[[Callable[[], object], Sequence[object]], float]


def do_bench_fn(warmup: float, rep: float) -> BenchFn:
    """triton.testing.do_bench (CUDA events, L2 flushed between reps), median of the reps, in ms."""
    from triton.testing import do_bench

    def bench(fn, grad_to_none):
        return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none) or None,
                              return_mode="median"))
    return bench


def wall_clock_bench(reps: int = 3) -> BenchFn:
    """A CPU stand-in for do_bench (used by the tests): median of ``reps`` perf_counter timings, in ms."""
    def bench(fn, grad_to_none):
        fn()
        times = []
        for _ in range(reps):
            for t in grad_to_none:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return times[len(times) // 2]
    return bench


def _sync(device):
    import torch
    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def _free_memory(device):
    import torch
    gc.collect()
    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.empty_cache()


def make_inputs(shape: Shape, dtype, device, seed: int = 0):
    """Fresh random normal q, k, v (B, S, H, D) leaves with requires_grad, and dout."""
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    B, S, H, D = shape.batch, shape.seqlen, shape.heads, shape.head_dim
    q, k, v, dout = (torch.randn(B, S, H, D, device=device, dtype=dtype, generator=gen) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    return q, k, v, dout


def _mode_fn(provider: Provider, mode: str, q, k, v, dout):
    """The callable timed for ``mode`` (fwd: plain forward; bwd: backward of a saved output; fwd_bwd: both)."""
    if mode == "fwd":
        return lambda: provider(q, k, v)
    if mode == "bwd":
        out = provider(q, k, v)
        return lambda: out.backward(dout, retain_graph=True)
    if mode == "fwd_bwd":
        return lambda: provider(q, k, v).backward(dout)
    raise ValueError(f"unknown mode {mode!r}")


def measure_provider(provider: Provider, shape: Shape, modes: Sequence[str], q, k, v, dout, bench: BenchFn,
                     device, on_result: Optional[Callable[[Result], None]] = None,
                     log: Optional[Callable[[str], None]] = None) -> List[Result]:
    """Time ``provider`` in each mode at one shape; a failing mode is recorded (NaN + status) and skipped.

    Each mode gets one warm-up call first (compilation / JIT), then ``bench``. Once a provider reports
    "unsupported" or "oom" at this shape, its remaining modes are recorded the same way without retrying.
    """
    results = []
    sticky: Optional[Tuple[str, str]] = None
    for mode in modes:
        if sticky is not None:
            r = Result.of(provider.name, shape, mode, status=sticky[0], note=sticky[1])
        else:
            r = _measure_one(provider, shape, mode, q, k, v, dout, bench, device, log)
            if r.status in ("unsupported", "oom"):
                sticky = (r.status, r.note)
        results.append(r)
        if on_result is not None:
            on_result(r)
    return results


def _measure_one(provider: Provider, shape: Shape, mode: str, q, k, v, dout, bench: BenchFn, device,
                 log: Optional[Callable[[str], None]]) -> Result:
    leaves = (q, k, v)
    caught: List[str] = []
    try:
        with warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always")
            try:
                with provider.context():
                    provider.prepare(shape, device)
                    t0 = time.perf_counter()
                    fn = _mode_fn(provider, mode, q, k, v, dout)
                    fn()  # warm-up: compilation / JIT / allocator
                    _sync(device)
                    first_s = time.perf_counter() - t0
                    if first_s > 0.5 and getattr(device, "type", device) == "cuda":
                        # A compile left the GPU idle for a while: run it for 0.2 s so the clocks are back up
                        # before timing (suspected cause of erratic short-shape cells, benchmarks/NOTES.md).
                        t_spin = time.perf_counter()
                        while time.perf_counter() - t_spin < 0.2:
                            fn()
                            _sync(device)  # one call in flight at a time: no backlog of queued launches
                    eager = [str(w.message) for w in wlist if "without torch.compile" in str(w.message)]
                    if eager:
                        raise RuntimeError("flex_attention ran eagerly (unfused): " + eager[0][:120])
                    t1, w0 = time.perf_counter(), time.time()
                    ms = bench(fn, leaves)
                    bench_s, w1 = time.perf_counter() - t1, time.time()
            finally:
                caught = [str(w.message) for w in wlist]
                fn = None  # drop a saved forward graph (bwd mode)
        if first_s > 5 and log is not None:
            log(f"  ({provider.name} {mode} {shape.label()}: first call took {first_s:.1f} s)")
        r = Result.of(provider.name, shape, mode, ms=ms)
        r.first_call_s, r.bench_s, r.bench_window = first_s, bench_s, (w0, w1)
        return r
    except Exception as e:  # noqa: BLE001 - any failure becomes a NaN row
        status, note = classify_error(e, caught)
        if status == "oom":
            _free_memory(device)
        if log is not None and status != "unsupported":
            log(f"  {provider.name} {mode} {shape.label()}: {status}: {note}")
        return Result.of(provider.name, shape, mode, status=status, note=note)
    finally:
        for t in leaves:
            t.grad = None


def check_shape(q, k, v, dout, causal: bool, attention, attention_ref=None) -> Tuple[str, float, bool]:
    """Compare tileattn with SDPA (default dispatch) at one shape: output and grads, max abs diff.

    With ``attention_ref``, also the accuracy rule on the (batch 0, head 0) slice against a float64 reference:
    err(tileattn) <= 2 x err(SDPA) + atol for out (3x for grads). Returns (line, max|out diff|, passed).
    """
    import torch
    import torch.nn.functional as F
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out_t = attention(*leaves, causal=causal)
    out_t.backward(dout)
    grads_t = [t.grad for t in leaves]
    leaves_s = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out_s = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves_s), is_causal=causal).transpose(1, 2)
    out_s.backward(dout)
    grads_s = [t.grad for t in leaves_s]
    names = ("out", "dq", "dk", "dv")
    ours, theirs = [out_t.detach()] + grads_t, [out_s.detach()] + grads_s
    diffs = [_max_abs_diff(a, b) for a, b in zip(ours, theirs)]
    finite = all(bool(torch.isfinite(a).all()) for a in ours)
    line = "|tile-sdpa| " + " ".join(f"{n} {d:.1e}" for n, d in zip(names, diffs))
    passed = finite
    if not finite:
        line += " NON-FINITE tileattn values"
    if attention_ref is not None:
        try:
            sl = (slice(0, 1), slice(None), slice(0, 1))
            r_leaves = [t.detach()[sl].double().requires_grad_(True) for t in (q, k, v)]
            out_r, _ = attention_ref(*r_leaves, causal=causal, softmax_scale=None, upcast=True)
            out_r.backward(dout[sl].double())
            refs = [out_r.detach()] + [t.grad for t in r_leaves]
            parts = []
            for n, a, b, ref in zip(names, ours, theirs, refs):
                e_t, e_s = _max_abs_diff(a[sl], ref), _max_abs_diff(b[sl], ref)
                mult = 2.0 if n == "out" else 3.0
                atol = ATOL_UNITS.get(str(a.dtype).replace("torch.", ""), 2.0**-8) * _max_abs(ref)
                ok = e_t <= mult * e_s + atol
                passed = passed and ok
                parts.append(f"{n} {e_t:.1e}/{e_s:.1e}{'' if ok else '!'}")
            line += " | vs fp64 (b0,h0) tile/sdpa: " + " ".join(parts)
            del r_leaves, out_r, refs
        except Exception as e:  # noqa: BLE001 - the reference is a bonus (memory at long seqlens)
            line += f" | fp64 reference skipped ({type(e).__name__})"
    line += " | " + ("OK" if passed else "FAIL")
    return line, diffs[0], passed


def _max_abs_diff(a, b) -> float:
    if a.numel() == 0:
        return 0.0
    a, b = a.double(), b.double()
    both_inf = (a == b) & a.isinf()  # equal infinities (e.g. lse of rows that see no key) count as 0
    d = (a - b).abs().masked_fill(both_inf, 0.0)
    return d.max().item()


def _max_abs(a) -> float:
    if a.numel() == 0:
        return 0.0
    a = a.double()
    return a.masked_fill(a.isinf(), 0.0).abs().max().item()


def combine_rounds(rounds: Sequence[Result]) -> Result:
    """One result from a (provider, shape, mode)'s timings in several rounds (``run_grid(rounds=N)``): the round
    with the median time among the successful ones (the lower middle for an even count), its note listing every
    round's ms, its timing window spanning all rounds (the clock column then covers them all); the first round's
    result when none succeeded."""
    ok = [r for r in rounds if r.status == "ok" and math.isfinite(r.ms)]
    if not ok:
        return rounds[0]
    pick = sorted(ok, key=lambda r: r.ms)[(len(ok) - 1) // 2]
    windows = [r.bench_window for r in ok if r.bench_window is not None]
    if windows:
        pick.bench_window = (min(w[0] for w in windows), max(w[1] for w in windows))
    pick.first_call_s = rounds[0].first_call_s
    if len(rounds) > 1:
        spread = "rounds (ms): " + " / ".join(f"{r.ms:.4g}" if r in ok else r.status for r in rounds)
        pick.note = (pick.note + "; " if pick.note else "") + spread
    return pick


def run_grid(shapes: Sequence[Shape], provider_names: Sequence[str], modes: Sequence[str], dtype, device,
             bench: BenchFn, *, providers: Optional[Dict[str, Provider]] = None, flex_dynamic: bool = True,
             check: bool = False, progress: Optional[Progress] = None,
             on_group_done: Optional[Callable[[List[Result]], None]] = None,
             results: Optional[List[Result]] = None, rounds: int = 1) -> List[Result]:
    """Measure every (shape, provider, mode); failures become NaN rows. Device-agnostic (tests run it on CPU).

    Results are appended to ``results`` (a new list by default) as they come, so a caller keeps the partial
    list when the run is interrupted. ``rounds`` > 1: at each shape every provider is timed that many times, the
    providers taking turns (A B C A B C ...), and the median round kept (``combine_rounds``), so that a transient
    disturbance of the card (session 19 saw single short-shape timings read 2x low) costs one round, not the cell.
    """
    progress = progress or Progress(len(shapes) * len(provider_names) * len(modes) * rounds, enabled=False)
    providers = dict(providers or {})
    for name in provider_names:
        if name in providers:
            continue
        try:
            providers[name] = make_provider(name, flex_dynamic=flex_dynamic)
        except Exception as e:  # noqa: BLE001 - e.g. flex missing from an old torch
            providers[name] = e
    attention_ref = None
    if check:
        try:
            from tileattn.reference import attention_ref
        except Exception:  # noqa: BLE001
            attention_ref = None
    results = [] if results is None else results
    group: Optional[Tuple[int, bool]] = None
    for si, shape in enumerate(shapes):
        if group != (shape.head_dim, shape.causal):
            if group is not None and on_group_done is not None:
                on_group_done(results)
            group = (shape.head_dim, shape.causal)
        q = k = v = dout = None
        try:
            q, k, v, dout = make_inputs(shape, dtype, device, seed=si)
        except Exception as e:  # noqa: BLE001 - inputs don't fit: the whole shape is skipped
            status, note = classify_error(e)
            for name in provider_names:
                for mode in modes:
                    r = Result.of(name, shape, mode, status=status, note=f"inputs: {note}")
                    results.append(r)
                    progress.step(f"{name} {mode} {shape.label()}", r)
            _free_memory(device)
            continue
        check_diff = float("nan")
        if check and "tileattn" in provider_names and isinstance(providers.get("tileattn"), Provider):
            try:
                line, check_diff, _ = check_shape(q, k, v, dout, shape.causal, providers["tileattn"]._attention,
                                                  attention_ref)
                progress.log(f"check {shape.label()}: {line}")
            except Exception as e:  # noqa: BLE001
                progress.log(f"check {shape.label()}: failed: {classify_error(e)[1]}")
            for t in (q, k, v):
                t.grad = None
            _free_memory(device)
        timed: Dict[str, List[List[Result]]] = {}
        for rnd in range(rounds):
            for name in provider_names:
                prov = providers[name]
                if not isinstance(prov, Provider):
                    if rnd == 0:
                        status, note = classify_error(prov)
                        status = "unsupported" if status == "error" else status
                        for mode in modes:
                            r = Result.of(name, shape, mode, status=status, note=f"unavailable: {note}")
                            results.append(r)
                            progress.step(f"{name} {mode} {shape.label()}", r)
                    continue
                if rnd > 0 and all(r.status in ("unsupported", "oom") for r in timed[name][0]):
                    continue  # nothing to repeat
                timed.setdefault(name, []).append(measure_provider(
                    prov, shape, modes, q, k, v, dout, bench, device,
                    on_result=lambda r: progress.step(f"{r.provider} {r.mode} {shape.label()}", r),
                    log=progress.log))
        for name in provider_names:
            if name not in timed:
                continue
            rs = [combine_rounds([rnd[i] for rnd in timed[name]]) for i in range(len(modes))]
            if name == "tileattn":
                for r in rs:
                    r.max_abs_diff = check_diff
            results.extend(rs)
        del q, k, v, dout
        _free_memory(device)
    if group is not None and on_group_done is not None:
        on_group_done(results)
    return results


# ----------------------------------------------------------------------------------------------- GPU run
def environment_info(device) -> Dict[str, str]:
    import torch
    info = {"timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "commit": git_commit()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = "missing"
    try:
        import tileattn
        info["tileattn"] = getattr(tileattn, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        info["tileattn"] = f"import failed ({type(e).__name__})"
    if getattr(device, "type", "cpu") == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = torch.cuda.get_device_name(device)
        info["gpu"] = (f"{info['device']} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                       f"{props.total_memory / 2**30:.0f} GiB)")
        info["cuda"] = str(torch.version.cuda)
        try:
            info["cudnn"] = str(torch.backends.cudnn.version())
        except Exception:  # noqa: BLE001
            info["cudnn"] = "?"
    else:
        info["device"] = info["gpu"] = "cpu"
        info["cuda"] = info["cudnn"] = "-"
    return info


def matmul_ceiling(device, dtype, bench: BenchFn, n: int = 8192) -> float:
    """TFLOP/s of an n x n x n matmul at ``dtype`` on random data: the card's practical matrix-unit ceiling,
    measured in the same run as the attention numbers."""
    import torch
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up (cuBLAS handle, heuristics)
    ms = bench(lambda: torch.matmul(a, b), [])
    del a, b
    return 2 * n ** 3 / ms * 1e-9


def format_header(info: Dict[str, str], args: Optional[argparse.Namespace] = None) -> str:
    lines = ["tileattn benchmark",
             f"  GPU      : {info.get('gpu', info.get('device', '?'))}",
             f"  versions : torch {info.get('torch')}  triton {info.get('triton')}  tileattn {info.get('tileattn')}"
             f"  CUDA {info.get('cuda')}  cuDNN {info.get('cudnn')}",
             f"  commit   : {info.get('commit')}",
             f"  ceiling  : {info['matmul_tflops']} TFLOP/s ({info.get('dtype', '')} 8192^3 matmul, same run)"
             if "matmul_tflops" in info else "  ceiling  : -",
             f"  date     : {info.get('timestamp')}"]
    if args is not None:
        lines.append(f"  grid     : head dims {args.head_dims}, seqlens {args.seqlens}, causal {args.causals}, "
                     f"{args.total_tokens} tokens/batch, model dim {args.model_dim}, {args.dtype}")
        lines.append(f"  measure  : modes {args.modes}, providers {args.providers}, do_bench warmup {args.warmup:g} ms"
                     f" rep {args.rep:g} ms (median)"
                     + (f", {args.rounds} rounds (median round)" if getattr(args, "rounds", 1) > 1 else "")
                     + f", flex compile {args.flex_compile}")
    return "\n".join(lines)


def fill_clocks(results: Sequence[Result], clock) -> str:
    """Set each timed result's ``sm_clock_mhz`` (and ``power_w`` / ``power_capped``) from ``clock`` (a
    bench_clock.ClockSampler, or None) where its samples have arrived; return the report's clock line
    (bench_clock.slow_clock_note), '' without samples."""
    if clock is None:
        return ""
    from .bench_clock import slow_clock_note
    for r in results:
        if r.bench_window is not None and not math.isfinite(r.sm_clock_mhz):
            r.sm_clock_mhz = clock.median(*r.bench_window)
            if hasattr(clock, "power"):
                r.power_w, r.power_capped = clock.power(*r.bench_window), clock.capped(*r.bench_window)
    return slow_clock_note(results)


def format_time_split(results: Sequence[Result]) -> str:
    """Wall time per provider: warm-up calls (compilation / JIT / autotuning) and timing."""
    parts = []
    for p in _ordered_providers(results, None):
        rs = [r for r in results if r.provider == p]
        first = sum(r.first_call_s for r in rs if math.isfinite(r.first_call_s))
        timed = sum(r.bench_s for r in rs if math.isfinite(r.bench_s))
        parts.append(f"{p} {first + timed:.0f}s (first calls {first:.0f}s)")
    return "time per provider: " + ", ".join(parts)


def run_benchmark(args: argparse.Namespace, device=None, bench: Optional[BenchFn] = None) -> int:
    """The GPU benchmark (``device``/``bench`` default to the current CUDA device / do_bench; the tests pass
    the CPU and a wall-clock timer). CSV and TXT are rewritten after every (head dim, causal) group, so an
    interrupted run (Ctrl-C, SIGTERM from a time limit) keeps what it measured."""
    import torch
    if device is None:
        if _interpreting():
            print("TRITON_INTERPRET is set: unset it to benchmark on the GPU", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
    if bench is None:
        bench = do_bench_fn(args.warmup, args.rep)
    dtype = getattr(torch, args.dtype_name)
    shapes = make_grid(args.head_dims, args.seqlens, args.causals, args.total_tokens, args.model_dim)
    info = environment_info(device)
    info.update(dtype=SHORT_DTYPE[args.dtype_name], tag=args.tag)
    if getattr(device, "type", "cpu") == "cuda":
        info["matmul_tflops"] = f"{matmul_ceiling(device, dtype, bench):.0f}"
    header = format_header(info, args)
    print(header, flush=True)
    base = os.path.join(args.out_dir, output_basename(args.prefix, info["device"], args.dtype_name, args.tag))
    csv_path, txt_path, png_path = base + ".csv", base + ".txt", base + ".png"
    progress = Progress(len(shapes) * len(args.providers) * len(args.modes) * args.rounds)
    clock = None
    if getattr(device, "type", "cpu") == "cuda":  # the SM clock beside every timing (bench_clock)
        from .bench_clock import ClockSampler, nvml_index
        clock = ClockSampler(nvml_index(device.index if device.index is not None else torch.cuda.current_device()))
        if not clock.start():
            clock = None
    t_start = time.perf_counter()
    log_lines: List[str] = []
    plain_log = progress.log

    def log(msg):
        log_lines.append(msg)
        plain_log(msg)
    progress.log = log
    printed = set()
    results: List[Result] = []

    def write_reports(final: bool, interrupted: bool = False) -> Tuple[str, str]:
        clock_note = fill_clocks(results, clock)
        write_csv(results, csv_path, info)
        summary = format_summary(results, args.providers)
        n_ok = sum(r.status == "ok" for r in results)
        footer = (f"{n_ok} of {len(results)} measurements ok, {time.perf_counter() - t_start:.0f} s in all"
                  + ("" if final and not interrupted else " (partial: interrupted)" if interrupted
                     else " (partial: still running)") + "\n" + format_time_split(results)
                  + ("\n" + clock_note if clock_note else ""))
        checks = [ln for ln in log_lines if ln.startswith("check ")]
        with open(txt_path + ".tmp", "w") as f:
            f.write(header + "\n\n")
            if checks:
                f.write("\n".join(checks) + "\n\n")
            f.write(format_tables(results, args.providers, info["dtype"], args.modes) + "\n\n")
            f.write((summary + "\n\n" if summary else "") + footer + "\n")
        os.replace(txt_path + ".tmp", txt_path)
        return summary, footer

    def on_group_done(_results):
        for (d, c) in _ordered_unique((r.head_dim, r.causal) for r in results):
            if (d, c) not in printed:
                printed.add((d, c))
                progress.log("\n" + format_tables([r for r in results if (r.head_dim, r.causal) == (d, c)],
                                                  args.providers, info["dtype"], args.modes) + "\n")
        write_reports(final=False)

    interrupted = False
    old_term = None
    try:
        import signal
        if hasattr(signal, "SIGTERM"):
            def _on_term(signum, frame):
                raise KeyboardInterrupt
            old_term = signal.signal(signal.SIGTERM, _on_term)
    except (ValueError, OSError):  # not in the main thread
        old_term = None
    try:
        run_grid(shapes, args.providers, args.modes, dtype, device, bench,
                 flex_dynamic=args.flex_compile == "dynamic", check=args.check, progress=progress,
                 on_group_done=on_group_done, results=results, rounds=args.rounds)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
        if clock is not None:
            last = max((r.bench_window[1] for r in results if r.bench_window), default=None)
            if last is not None:
                clock.settle(last)
            clock.stop()
        if old_term is not None:
            import signal
            signal.signal(signal.SIGTERM, old_term)
    if not results:
        print("no results", file=sys.stderr)
        return 130 if interrupted else 1
    if interrupted:
        for (d, c) in _ordered_unique((r.head_dim, r.causal) for r in results):
            if (d, c) not in printed:
                print("\n" + format_tables([r for r in results if (r.head_dim, r.causal) == (d, c)],
                                           args.providers, info["dtype"], args.modes) + "\n")
    summary, footer = write_reports(final=True, interrupted=interrupted)
    png = None
    if not args.no_plot:
        try:
            png = plot_results(results, png_path, providers=args.providers,
                               title=f"{info['device']}  {info['dtype']}  torch {info['torch']}  "
                                     f"triton {info['triton']}  tileattn {info['tileattn']} ({info['commit']})")
        except Exception as e:  # noqa: BLE001
            print(f"plot failed: {type(e).__name__}: {e}", file=sys.stderr)
    if summary:
        print("\n" + summary + "\n", flush=True)
    print(footer)
    print("wrote " + ", ".join(p for p in (csv_path, txt_path, png) if p), flush=True)
    return 130 if interrupted else 0


# -------------------------------------------------------------------------------------------------- demo
ATOL_UNITS = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-17, "float64": 2.0**-40}
LSE_ATOL_UNITS = 2.0**-17
FWD_MULT, BWD_MULT = 2.0, 3.0


@dataclass(frozen=True)
class DemoCase:
    dtype: str
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool

    def label(self) -> str:
        s = f"S{self.seqlen_q}" if self.seqlen_q == self.seqlen_k else f"Sq{self.seqlen_q}/Sk{self.seqlen_k}"
        return (f"B{self.batch} {s} H{self.heads_q}/{self.heads_kv} D{self.head_dim}"
                + (" causal" if self.causal else ""))


DEMO_CASES = (
    DemoCase("float32", 1, 17, 17, 2, 2, 32, False),
    DemoCase("float16", 2, 64, 64, 2, 2, 64, True),
    DemoCase("float32", 1, 100, 100, 6, 2, 40, True),     # GQA, odd head dim
    DemoCase("float16", 1, 130, 130, 4, 1, 40, False),    # MQA, odd head dim, ragged tail
    DemoCase("float16", 1, 33, 97, 2, 2, 64, False),      # seqlen_q != seqlen_k
    DemoCase("float32", 1, 40, 97, 4, 2, 24, True),       # causal, bottom-right aligned, GQA
    DemoCase("float16", 1, 77, 77, 2, 2, 128, True),
)
GPU_EXTRA_CASES = (
    DemoCase("bfloat16", 2, 128, 128, 4, 2, 64, True),
    DemoCase("bfloat16", 1, 130, 130, 2, 2, 256, False),
)


@dataclass
class Check:
    case: str
    dtype: str
    what: str
    err: float
    err_pt: float
    bound: float
    passed: bool
    note: str = ""


def accuracy_check(what: str, ours, ref, pt, mult: float, atol: float) -> Tuple[float, float, float, bool, str]:
    """flash-attn's rule: max|ours - ref| <= mult * max|pt - ref| + atol, ours finite and of ref's shape."""
    import torch
    if tuple(ours.shape) != tuple(ref.shape):
        return float("nan"), float("nan"), float("nan"), False, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if what == "lse":
        if bool(torch.isnan(ours).any()):
            return float("nan"), float("nan"), float("nan"), False, "NaN"
        if not torch.equal(torch.isneginf(ours), torch.isneginf(ref)):
            return float("nan"), float("nan"), float("nan"), False, "-inf pattern differs"
    elif not bool(torch.isfinite(ours).all()):
        return float("nan"), float("nan"), float("nan"), False, "non-finite values"
    err, err_pt = _max_abs_diff(ours, ref), _max_abs_diff(pt, ref)
    bound = mult * err_pt + atol
    return err, err_pt, bound, err <= bound, ""


def run_demo_case(case: DemoCase, device, attention, attention_ref, seed: int = 0) -> List[Check]:
    import torch
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype).to(device)
    q = rnd(case.batch, case.seqlen_q, case.heads_q, case.head_dim)
    k = rnd(case.batch, case.seqlen_k, case.heads_kv, case.head_dim)
    v = rnd(case.batch, case.seqlen_k, case.heads_kv, case.head_dim)
    dout = rnd(case.batch, case.seqlen_q, case.heads_q, case.head_dim)

    def leaves(dt=None):
        return [(t.to(dt) if dt is not None else t).detach().clone().requires_grad_(True) for t in (q, k, v)]
    name = case.label()
    checks: List[Check] = []
    try:
        lt = leaves()
        out, lse = attention(*lt, causal=case.causal, return_lse=True)
        out.backward(dout)
        ours = {"out": out.detach(), "lse": lse.detach(), "dq": lt[0].grad, "dk": lt[1].grad, "dv": lt[2].grad}
    except Exception as e:  # noqa: BLE001
        return [Check(name, case.dtype, "run", float("nan"), float("nan"), float("nan"), False,
                      _shorten(f"{type(e).__name__}: {e}", 200))]
    lr = leaves(torch.float64)
    out_r, lse_r = attention_ref(*lr, causal=case.causal, softmax_scale=None, upcast=True)
    out_r.backward(dout.double())
    ref = {"out": out_r.detach(), "lse": lse_r.detach(), "dq": lr[0].grad, "dk": lr[1].grad, "dv": lr[2].grad}
    lp = leaves()
    out_p, lse_p = attention_ref(*lp, causal=case.causal, softmax_scale=None, upcast=False)
    out_p.backward(dout)
    pt = {"out": out_p.detach(), "lse": lse_p.detach(), "dq": lp[0].grad, "dk": lp[1].grad, "dv": lp[2].grad}
    for what in ("out", "lse", "dq", "dk", "dv"):
        if what == "lse":
            mult, atol = FWD_MULT, LSE_ATOL_UNITS * max(1.0, _max_abs(ref[what]))
        else:
            mult = FWD_MULT if what == "out" else BWD_MULT
            atol = ATOL_UNITS[case.dtype] * _max_abs(ref[what])
        err, err_pt, bound, ok, note = accuracy_check(what, ours[what], ref[what], pt[what], mult, atol)
        checks.append(Check(name, case.dtype, what, err, err_pt, bound, ok, note))
    return checks


def format_checks(checks: Sequence[Check]) -> str:
    head = ["case", "dtype", "check", "max err", "torch err", "bound", "err/bound", "ok"]
    rows = []
    for c in checks:
        ratio = c.err / c.bound if math.isfinite(c.err) and math.isfinite(c.bound) and c.bound > 0 else float("nan")
        rows.append([c.case, SHORT_DTYPE.get(c.dtype, c.dtype), c.what, _fmt(c.err, ".2e"), _fmt(c.err_pt, ".2e"),
                     _fmt(c.bound, ".2e"), _fmt(ratio, ".2f"), "ok" if c.passed else "FAIL " + c.note])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    align = [str.ljust, str.ljust, str.ljust] + [str.rjust] * 4 + [str.ljust]
    lines = ["  ".join(a(h, w) for a, h, w in zip(align, head, widths))]
    lines += ["  ".join(a(x, w) for a, x, w in zip(align, r, widths)) for r in rows]
    return "\n".join(lines)


def run_demo(quick: bool = False) -> int:
    import torch
    on_gpu = torch.cuda.is_available() and not _interpreting()
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    if not on_gpu:
        try:  # bf16 in the interpreter (harmless for fp32 / fp16)
            from tileattn._interpreter import patch_interpreter_bf16_dot
            patch_interpreter_bf16_dot()
        except Exception:  # noqa: BLE001
            pass
    import tileattn
    from tileattn.reference import attention_ref
    import triton
    cases = list(DEMO_CASES) + (list(GPU_EXTRA_CASES) if on_gpu else [])
    if quick:
        cases = cases[:2]
    where = torch.cuda.get_device_name() if on_gpu else "CPU, Triton interpreter (TRITON_INTERPRET=1)"
    print(f"tileattn {getattr(tileattn, '__version__', '?')} demo on {where}; torch {torch.__version__}, "
          f"triton {triton.__version__}; {len(cases)} cases, forward + backward vs float64 reference "
          f"(rule: err <= 2x torch err + atol, grads 3x)", flush=True)
    t0 = time.perf_counter()
    checks: List[Check] = []
    for i, case in enumerate(cases):
        t1 = time.perf_counter()
        cs = run_demo_case(case, device, tileattn.attention, attention_ref, seed=1000 + i)
        checks.extend(cs)
        bad = sum(not c.passed for c in cs)
        print(f"  [{i + 1}/{len(cases)}] {case.label():<28} {SHORT_DTYPE[case.dtype]}  "
              f"{'ok' if not bad else f'{bad} FAILED'}  ({time.perf_counter() - t1:.1f}s)", flush=True)
    print()
    print(format_checks(checks))
    print()
    failed = [c for c in checks if not c.passed]
    if failed:
        for c in failed:
            print(f"FAILED: {c.case} {SHORT_DTYPE.get(c.dtype, c.dtype)} {c.what}: "
                  + (c.note if c.note else f"err {c.err:.3e} > bound {c.bound:.3e} (torch err {c.err_pt:.3e})"))
        print(f"demo: {len(failed)} of {len(checks)} checks FAILED ({time.perf_counter() - t0:.0f}s)")
        return 1
    print(f"demo: all {len(checks)} checks passed ({time.perf_counter() - t0:.0f}s)")
    return 0


# -------------------------------------------------------------------------------------------------- main
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_REEXEC_FLAG = "_TILEATTN_BENCH_REEXEC"


def _ensure_triton_interpreter(argv: Sequence[str]) -> None:
    """Make sure tileattn's kernels run in Triton's interpreter (no GPU).

    ``@triton.jit`` picks compiled vs interpreted at decoration time, i.e. when tileattn's kernels are
    imported. ``python -m tileattn.bench`` imports the ``tileattn`` package (and so triton) before this module
    runs, so if triton is already loaded without ``TRITON_INTERPRET=1`` the process re-executes itself with it.
    """
    if _interpreting():
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" not in sys.modules:
        return  # nothing imported triton yet: the env var is in time
    if os.environ.get(_REEXEC_FLAG):
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could take effect")
    env = dict(os.environ)
    env[_REEXEC_FLAG] = "1"
    src_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([src_dir] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tileattn.bench", *argv], env)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["decode"]:  # ``python -m tileattn.bench decode [...]``: the KV-cache decode table and plot
        from . import bench_decode
        return bench_decode.main(argv[1:])
    args = parse_args(argv)
    if args.dry_run:
        shapes = make_grid(args.head_dims, args.seqlens, args.causals, args.total_tokens, args.model_dim)
        for s in shapes:
            print(f"{s.label()}  fwd {s.flops('fwd') / 1e12:.3f} TFLOP")
        print(f"{len(shapes)} shapes x {len(args.providers)} providers x {len(args.modes)} modes = "
              f"{len(shapes) * len(args.providers) * len(args.modes)} measurements")
        return 0
    import torch  # importing torch does not import triton
    if args.demo or not torch.cuda.is_available():
        if not torch.cuda.is_available():
            if not args.demo and not os.environ.get(_REEXEC_FLAG):
                print("no CUDA GPU: running the interpreted accuracy demo instead of the benchmark", flush=True)
            _ensure_triton_interpreter(argv)
        return run_demo(quick=args.quick)
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
