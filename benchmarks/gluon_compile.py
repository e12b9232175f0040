"""Compile the Gluon Hopper forward for sm_90a on a machine without a GPU and report registers, spills, shared
memory and the main loop's SASS mix (HGMMA, barriers, shuffles).

Usage: PYTHONPATH=src python benchmarks/gluon_compile.py [--head-dim 128] [--causal] [--config bn,ks,vs,creg,preg,maxnreg]
           [--no-resid] [--softcap] [--sink] [--fp16] [--window] [--sass] [--check]
       ... --dq [--head-dim 128] [--causal] [--fp16] [--no-resid] [--dlse] [--config bn,kstages,creg,preg,maxnreg]
       ... --bwd [--head-dim 128] [--causal] [--fp16] [--config bm,stages,creg,preg,maxnreg,pipeline[,split]]
           [--fused-dq]: the dK/dV kernel (with dQ reduce-added: the fused backward)
       ... --many < variants: one variant's arguments per line, each checked as with --check, in one process
"""
import argparse
import collections
import inspect
import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))
import compile_check as cc  # noqa: E402
import sass_loops as sl  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from tileattn.kernels import gluon_forward as gf  # noqa: E402


SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KB, opt-in)


def _complete(fn, sig, consts):
    """Fill ``sig`` for every argument of ``fn``: a constexpr the caller left out takes its default, as in a launch
    that leaves it out (else it would compile as an i32 argument, both of its branches built), and so does an
    argument that defaults to None (a launch that leaves it out passes the constexpr None); the rest i32."""
    consts.update({prm.name: prm.default for prm in fn.params if prm.name not in consts and prm.name not in sig
                   and (prm.is_constexpr and prm.default is not inspect.Parameter.empty or
                        not prm.is_constexpr and prm.default is None)})
    for name in fn.arg_names:
        if name not in sig:
            sig[name] = "constexpr" if name in consts else "i32"


def compile_fwd(d=128, causal=False, cfg=None, resid=True, softcap=False, sink=False, fp16=False, window=False,
                varlen=False, alibi=False, tile_map=False, persistent=False, flat=False, resid8=False, wg=2,
                skip=False, trace=False, stagger=0, streamk=False):
    """The Gluon forward for sm_90a; ``wg``: its consumer warpgroups (3: v37a, with its registers unless cfg);
    ``skip``: with causal and three warpgroups, v38a's per-warpgroup skip of unseen key tiles (CAUSAL_SKIP);
    ``trace``: with persistent, the per-item trace buffer (fwd_trace.py); ``stagger``: with persistent, the odd
    programs' start delay in ns (STAGGER, a diagnostic); ``streamk``: with persistent, the stream-K ranges and
    partial records (STREAMK, gluon_streamk)."""
    from tileattn import configs
    c = configs._GLUON_FWD[d]  # the table entry, whether on by default or not
    regs = configs.GLUON_3WG_REGS if wg == 3 else (c.consumer_regs, c.producer_regs, c.maxnreg)
    bn, ks, vs, creg, preg, maxnreg = cfg or (c.block_n, c.k_stages, c.v_stages, *regs)
    bm = 64
    def desc(rows):
        layout = gl.NVMMASharedLayout.get_default_for([1, rows, 1, d], gl.float16 if fp16 else gl.bfloat16)
        return f"tensordesc<{'fp16' if fp16 else 'bf16'}[1,{rows},1,{d}],{layout!r}>"
    r_layout = gl.NVMMASharedLayout.get_default_for([1, bm, 1, d // 2], gl.int16)  # int8 pairs (make_desc)
    sig = {"q_desc": desc(bm), "k_desc": desc(bn), "v_desc": desc(bn), "o_desc": desc(bm),
           "r_desc": f"tensordesc<i16[1,{bm},1,{d // 2}],{r_layout!r}>" if resid8 else desc(bm),
           "LSE": "*fp32", "SINK": "*fp32", "ALIBI": "*fp32", "qk_scale": "fp32", "softcap": "fp32",
           "O": f"*{'fp16' if fp16 else 'bf16'}", "RESID": "*i8" if resid8 else f"*{'fp16' if fp16 else 'bf16'}",
           "TILE_MAP": "*i32",
           "CU_Q": "*i32",
           "CU_K": "*i32", **({"TRACE": "*i64"} if trace else {}), **({"PART": "*fp32"} if streamk else {})}
    consts = dict(BLOCK_N=bn, HEAD_D=d, K_STAGES=ks, V_STAGES=vs, CAUSAL=causal, STORE_RESID=resid,
                  HAS_SOFTCAP=softcap, HAS_SINK=sink, WINDOW=window, VARLEN=varlen,
                  # the launcher's choice: the linear ALiBi form on the plain grid (configs.gluon_alibi_linear)
                  HAS_ALIBI=(1 if persistent or flat or not configs.gluon_alibi_linear(d, varlen) else 2) if alibi
                  else 0,
                  USE_MAP=tile_map, CONSUMER_REGS=creg,
                  PRODUCER_REGS=preg, PERSISTENT=persistent or flat, FLAT=flat,  # flat: kernels/gluon_flat.py
                  **({"NUM_WG": 3} if wg == 3 else {}), **({"CAUSAL_SKIP": True} if skip else {}),
                  **({"STAGGER": stagger} if stagger else {}), **({"STREAMK": True} if streamk else {}))
    fn = gf._fwd_kernel
    _complete(fn, sig, consts)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in ("LSE", "SINK", "O", "RESID")}
    k = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": maxnreg})
    return k


def _call_params(softcap, alibi, window, causal):
    """An ``AttnParams`` with the features a compile variant has (what a launch's scope checks read)."""
    from tileattn.kernels.params import AttnParams
    left, right = (5, 5) if window else (-1, 0 if causal else -1)
    return AttnParams(batch=1, max_seqlen_q=1, max_seqlen_k=1, softmax_scale=1.0, window_left=left,
                      window_right=right, softcap=float(softcap), alibi_slopes=torch.ones(1) if alibi else None)


def compile_bwd(d=128, causal=False, cfg=None, fp16=False, varlen=False, window=False, softcap=False, alibi=False,
                fused_dq=False, kv_regs=None, trace=False):
    """The Gluon dK/dV kernel (kernels/gluon_backward.py) for sm_90a; ``kv_regs``: its KV_REGS (None: what a launch
    of these features picks, ``gluon_backward.kv_regs``); ``trace``: with the program trace buffer."""
    from tileattn import configs
    from tileattn.kernels import fused_dq as fdq, gluon_backward as gb
    c = configs._GLUON_BWD[d]
    bm, stages, creg, preg, maxnreg, pipe = (cfg or (c.block_m, c.stages, c.consumer_regs, c.producer_regs,
                                                     c.maxnreg, c.pipeline))[:6]
    split = bool(cfg[6]) if cfg and len(cfg) > 6 else c.split
    dt = gl.float16 if fp16 else gl.bfloat16

    def desc(rows):
        layout = gl.NVMMASharedLayout.get_default_for([1, rows, 1, d], dt)
        return f"tensordesc<{'fp16' if fp16 else 'bf16'}[1,{rows},1,{d}],{layout!r}>"
    sig = {"q_desc": desc(bm), "do_desc": desc(bm), "k_desc": desc(64), "v_desc": desc(64), "dk_desc": desc(64),
           "dv_desc": desc(64), "st_desc": f"tensordesc<fp32[{bm}],{gb._stats_layout(bm)!r}>",
           "dq_desc": (f"tensordesc<fp32[64,{bm}],{fdq._acc_layout(64, bm)!r}>" if fused_dq
                       else f"tensordesc<fp32[{bm}],{gb._stats_layout(bm)!r}>"),
           "qk_scale": "fp32", "sm_scale": "fp32", "softcap": "fp32", "DK": f"*{'fp16' if fp16 else 'bf16'}",
           "DV": f"*{'fp16' if fp16 else 'bf16'}", "CU_Q": "*i32", "CU_K": "*i32", "ALIBI": "*fp32",
           **({"TRACE": "*i64"} if trace else {})}
    consts = dict(HEAD_D=d, STAGES=stages, CAUSAL=causal and not window, WINDOW=window, PIPELINE=bool(pipe),
                  VARLEN=varlen, HAS_SOFTCAP=softcap, HAS_ALIBI=alibi, SPLIT=split, CONSUMER_REGS=creg,
                  PRODUCER_REGS=preg,
                  **(fdq.kernel_flags(d) if fused_dq else {}),  # TILEATTN_FUSED_DQ_SLOTS / _EARLY as at launch
                  KV_REGS=(gb.kv_regs(d, _call_params(softcap, alibi, window, causal), fused_dq) if kv_regs is None
                           else kv_regs))
    fn = gb._dkdv_kernel
    _complete(fn, sig, consts)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ("DK", "DV")}
    return triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": maxnreg})


def compile_reduce_add():
    """A minimal Gluon kernel around ``gluon_common.tma_reduce_add`` (an fp32 [64, 32] tile staged in shared memory,
    reduce-added through a host descriptor), for sm_90a."""
    from triton.experimental import gluon
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, tma
    from tileattn.kernels.gluon_common import tma_reduce_add

    @gluon.jit
    def kernel(desc):
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, 32, 16])
        buf = gl.allocate_shared_memory(gl.float32, [64, 32], desc.layout)
        buf.store(gl.full([64, 32], 1.0, gl.float32, layout=layout))
        fence_async_shared()
        gl.thread_barrier()
        tma_reduce_add(desc, [gl.program_id(0) * 64, 0], buf)
        tma.store_wait(pendings=0)

    layout = gl.NVMMASharedLayout.get_default_for([64, 32], gl.float32)
    return triton.compile(GluonASTSource(fn=kernel, signature={"desc": f"tensordesc<fp32[64,32],{layout!r}>"},
                                         constexprs={}), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def compile_dq(d=128, causal=False, cfg=None, fp16=False, resid=True, dlse=False, varlen=False, window=False,
               softcap=False, alibi=False, resid8=False, trace=False, persistent=False):
    """The Gluon dQ kernel (kernels/gluon_dq.py) for sm_90a; cfg = (block_n, k_stages, creg, preg, maxnreg);
    ``trace``: with the program trace buffer; ``persistent``: its persistent grid (v35b)."""
    from tileattn import configs
    from tileattn.kernels import gluon_dq as gq
    c = configs._GLUON_BWD[d]
    bn, ks, creg, preg, maxnreg = cfg or (c.dq_block_n, c.dq_k_stages, c.consumer_regs, c.producer_regs, c.maxnreg)
    dt, name = (gl.float16, "fp16") if fp16 else (gl.bfloat16, "bf16")

    def desc(rows):
        layout = gl.NVMMASharedLayout.get_default_for([1, rows, 1, d], dt)
        return f"tensordesc<{name}[1,{rows},1,{d}],{layout!r}>"
    sig = {"q_desc": desc(64), "do_desc": desc(64), "k_desc": desc(bn), "v_desc": desc(bn), "dq_desc": desc(64),
           "O": f"*{name}", "RESID": "*i8" if resid8 else f"*{name}", "DO": f"*{name}", "LSE": "*fp32", "DLSE": "*fp32",
           "DELTA": "*fp32", "STATS": "*fp32", "qk_scale": "fp32", "sm_scale": "fp32", "softcap": "fp32",
           "DQ": f"*{name}",
           "CU_Q": "*i32", "CU_K": "*i32", "ALIBI": "*fp32", **({"TRACE": "*i64"} if trace else {})}
    consts = dict(BLOCK_N=bn, HEAD_D=d, K_STAGES=ks, V_STAGES=2, CAUSAL=causal and not window, WINDOW=window,
                  HAS_RESID=resid, HAS_DLSE=dlse, VARLEN=varlen, HAS_SOFTCAP=softcap, HAS_ALIBI=alibi,
                  CONSUMER_REGS=creg, PRODUCER_REGS=preg, **({"PERSISTENT": True} if persistent else {}))
    fn = gq._dq_kernel
    _complete(fn, sig, consts)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ("O", "RESID", "DO", "LSE", "DLSE",
                                                                          "DELTA", "STATS", "DQ")}
    return triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": maxnreg})


def ptxas_messages(ptx: str) -> str:
    """ptxas -v's stderr for sm_90a (register use, spills, and performance warnings such as C7514)."""
    import subprocess
    import tempfile
    from triton.backends.nvidia.compiler import get_ptxas
    p = get_ptxas(90)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        open(src, "w").write(ptx)
        r = subprocess.run([getattr(p, "path", p), "-v", "-arch=sm_90a", src, "-o", src + ".o"],
                           capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr)
    return r.stderr


def main(argv=None):
    """One variant (argv: this script's arguments); with --check returns 0 when it passes, else 1."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--config")
    ap.add_argument("--no-resid", action="store_true")
    ap.add_argument("--resid8", action="store_true", help="the residual packed to int8 (TILEATTN_RESIDUAL=int8)")
    ap.add_argument("--softcap", action="store_true")
    ap.add_argument("--softcap-fixed-max", action="store_true",
                    help="forward: the softcap form with a fixed softmax max (HAS_SOFTCAP=2, NOTES v20c)")
    ap.add_argument("--sink", action="store_true")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--window", action="store_true", help="a sliding window (left and right bounds)")
    ap.add_argument("--alibi", action="store_true", help="ALiBi slopes")
    ap.add_argument("--tile-map", action="store_true", help="with --varlen: the forward's work list")
    ap.add_argument("--persistent", action="store_true", help="the persistent forward (with --dq: the persistent dQ "
                    "kernel, v35b)")
    ap.add_argument("--flat", action="store_true", help="the persistent forward, one pipeline across items")
    ap.add_argument("--stagger", type=int, default=0, help="forward with --persistent: the odd programs' start "
                    "delay in ns (TILEATTN_GLUON_FWD_STAGGER)")
    ap.add_argument("--streamk", action="store_true", help="forward with --persistent: stream-K ranges "
                    "(TILEATTN_GLUON_FWD_STREAMK)")
    ap.add_argument("--skip", action="store_true", help="forward with --causal --wg 3: v38a's per-warpgroup skip of "
                    "the key tiles a warpgroup does not see")
    ap.add_argument("--wg", type=int, default=2, choices=(2, 3), help="forward: consumer warpgroups (3: v37a, "
                    "with --persistent)")
    ap.add_argument("--varlen", action="store_true", help="the packed varlen variant (forward, --bwd or --dq)")
    ap.add_argument("--dq", action="store_true", help="the dQ backward kernel instead (--config bn,kstages,creg,"
                    "preg,maxnreg; --no-resid: delta from the rounded O; --dlse)")
    ap.add_argument("--dlse", action="store_true")
    ap.add_argument("--reduce-add", action="store_true", help="print how many TMA reduce-adds a minimal kernel "
                    "around gluon_common.tma_reduce_add compiles to")
    ap.add_argument("--fused-dq", action="store_true", help="with --bwd: the fused backward's dK/dV kernel, dQ "
                    "reduce-added (TILEATTN_GLUON_BWD_FUSED=1)")
    ap.add_argument("--bwd", action="store_true", help="the dK/dV backward kernel instead (--config bm,stages,"
                    "creg,preg,maxnreg,pipeline)")
    ap.add_argument("--kv-regs", type=int, help="with --bwd: the kernel's KV_REGS (K / V as register A operands; "
                    "default: what a launch with these features picks)")
    ap.add_argument("--trace", action="store_true", help="with --bwd / --dq: the program trace buffer (bwd_trace.py); "
                    "forward with --persistent: the per-item trace buffer (fwd_trace.py)")
    ap.add_argument("--sass", action="store_true", help="print the main loop's SASS")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless ptxas reports no spills and no serialised wgmma (C7514), and the kernel's "
                         "shared memory fits sm_90's 227 KB")
    ap.add_argument("--spill-budget", type=int, default=0,
                    help="with --check: the spill stores (bytes) accepted (the D=128 dK/dV kernel has a few)")
    a = ap.parse_args(argv)
    cfg = tuple(int(x) for x in a.config.split(",")) if a.config else None
    if a.window and a.causal:
        ap.error("--window is its own mask (a causal call with a left bound is a window)")
    if a.reduce_add:
        ptx = compile_reduce_add().asm["ptx"]
        print("reduce-adds", ptx.count("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add"))
        return 0
    if a.dq:
        k = compile_dq(a.head_dim, a.causal, cfg, a.fp16, not a.no_resid, a.dlse, a.varlen, a.window, a.softcap,
                       a.alibi, a.resid8, a.trace, a.persistent)
    elif a.bwd:
        k = compile_bwd(a.head_dim, a.causal, cfg, a.fp16, a.varlen, a.window, a.softcap, a.alibi, a.fused_dq,
                        a.kv_regs, a.trace)
    else:
        softcap = 2 if a.softcap_fixed_max else a.softcap
        k = compile_fwd(a.head_dim, a.causal, cfg, not a.no_resid, softcap, a.sink, a.fp16, a.window, a.varlen,
                        a.alibi, a.tile_map, a.persistent, a.flat, a.resid8, a.wg, a.skip, a.trace, a.stagger,
                        a.streamk)
    if a.check:
        report = ptxas_messages(k.asm["ptx"])
        print(report)
        spill = re.search(r"(\d+) bytes spill stores", report)
        ok = "serialized" not in report and spill is not None and int(spill.group(1)) <= a.spill_budget
        # the products contracting over the head dim: Q K^T and P V (forward), S^T and dP^T per consumer warpgroup
        # (dK/dV; with ``split`` one of the two per warpgroup)
        from tileattn import configs
        split = bool(cfg[6]) if a.bwd and cfg and len(cfg) > 6 else configs._GLUON_BWD.get(a.head_dim) and \
            configs._GLUON_BWD[a.head_dim].split
        per = 2 if (not a.bwd or split) else 4
        ok = ok and k.asm["ptx"].count("wgmma.mma_async") >= per * (a.head_dim // 16)
        # shared memory within sm_90's per-block limit (227 KB): ptxas does not check it, the launch would fail
        # (the persistent D=128 forward uses 229.8 KB of the 232,448 bytes since session 22's v24a)
        if k.metadata.shared > SM90_MAX_SHARED:
            print(f"shared memory {k.metadata.shared} B exceeds sm_90's {SM90_MAX_SHARED} B per block")
            ok = False
        return 0 if ok else 1
    print(cc._ptxas_report(k.asm["ptx"], 90), "smem", k.metadata.shared)
    sass = sl._sass(k.asm["ptx"])
    for body in sl.loops(sass):
        mix = collections.Counter()
        for _, t in body:
            for key, pat in list(sl.PATTERNS.items()) + [("SHFL", "SHFL"), ("MUFU", "MUFU"), ("WARPSYNC", "WARPGROUP")]:
                if re.search(pat, t):
                    mix[key] += 1
        print(f"loop @{body[0][0]:#x}: {len(body)} instructions", dict(mix))
        if a.sass:
            for addr, t in body:
                print(f"  {addr:#06x} {t}")


def many(lines):
    """--many: one variant's arguments per line (stdin), all checked in this one process (the imports cost ~5 s
    per process); prints each variant's result between markers; returns 0 when every one passed."""
    import contextlib
    import io
    import shlex
    import traceback
    failed = 0
    for line in filter(None, (x.strip() for x in lines)):
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                rc = main(shlex.split(line) + ["--check"])
        except BaseException:  # a compile error (or argparse's exit) fails this variant only
            rc = 1
            buf.write(traceback.format_exc())
        failed += rc != 0
        print(f"=== VARIANT {line}\n=== {'ok' if rc == 0 else 'FAIL'}\n{buf.getvalue()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(many(sys.stdin) if sys.argv[1:] == ["--many"] else main())
