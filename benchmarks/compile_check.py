"""Compile kernel variants for a GPU target on a machine without a GPU; print registers and spills.

Usage: PYTHONPATH=src python benchmarks/compile_check.py [arch=90] [--features | --quick]
(needs triton's bundled ptxas; no GPU, no interpreter). Catches compile errors the interpreter can't see
(e.g. non-constexpr globals) and shows register pressure per config.
"""
import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tileattn import configs
from tileattn.kernels.backward import _bwd_dkdv_kernel, _bwd_dq_kernel
from tileattn.kernels.forward import _fwd_kernel

FLOATS = {"qk_scale", "sm_scale", "softcap", "dropout_p"}
INT32_PTRS = {"CU_Q", "CU_K", "SEQLENS_K", "BATCH_IDX", "BLOCK_TABLE", "LEFTPAD", "COUNTERS"}
FP32_PTRS = {"LSE", "DELTA", "STATS", "DLSE", "DSINK_ROWS", "ALIBI", "SINK", "OUT_PART", "LSE_PART"}


def _ptxas_report(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    p = get_ptxas(arch)
    ptxas = getattr(p, "path", p)
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "k.ptx")
        open(f, "w").write(ptx)
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        r = subprocess.run([ptxas, "-v", f"-arch={sm}", f, "-o", os.path.join(d, "k.o")], capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return f"regs {regs.group(1) if regs else '?'} spill_stores {spill.group(1) if spill else '?'}"


def compile_one(fn, dtype, constexprs, cfg, arch, ints=None, descs=("K_DESC", "V_DESC"), given=()):
    """Compile ``fn`` for sm_<arch>. ``ints``: runtime values of integer arguments; like Triton's launcher, a value
    of 1 becomes a compile-time constant unless the kernel lists the argument in ``do_not_specialize``. ``descs``:
    the K and V arguments, host tensor descriptors when USE_TMA (else pointers). ``given``: arguments whose default
    is None passed anyway (TRACE: an int64 pointer), else they compile as None, as a launch that leaves them out."""
    constexprs = dict(constexprs)
    unspecialised = {param.name for param in getattr(fn, "params", []) if param.do_not_specialize}
    for param in getattr(fn, "params", []):
        if ints and ints.get(param.name) == 1 and param.name not in unspecialised:
            constexprs[param.name] = 1
        if param.is_constexpr and param.name not in constexprs and param.default is not inspect.Parameter.empty:
            constexprs[param.name] = param.default  # as a launch that leaves it out (else compiled as an i32)
        elif param.name not in constexprs and param.default is None and param.name not in given:  # TRACE=None
            constexprs[param.name] = None
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in descs:  # TMA descriptors (USE_TMA), else pointers
            block_d = constexprs["BLOCK_DQK" if name == descs[0] else "BLOCK_DV"]
            sig[name] = (f"tensordesc<{dtype}[1,{constexprs['BLOCK_N']},1,{block_d}]>" if constexprs.get("USE_TMA")
                         else f"*{dtype}")
        elif name in INT32_PTRS:
            sig[name] = "*i32"
        elif name in ("RNG", "TRACE"):
            sig[name] = "*i64"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name.isupper():
            sig[name] = f"*{dtype}"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    consts = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    attrs = {}
    if ints is not None:  # like the launcher: 16-byte-aligned pointers, integers divisible by 16 marked so
        for i, name in enumerate(fn.arg_names):
            if sig[name].startswith("*") or (sig[name] == "i32" and name not in unspecialised
                                             and name in ints and ints[name] % 16 == 0):  # 0 included, as Triton
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return _ptxas_report(k.asm["ptx"], arch), k.metadata.shared


FEATURES = {
    "plain": {},
    "window": {"HAS_LEFT": True, "HAS_RIGHT": True},
    "softcap+alibi": {"HAS_SOFTCAP": True, "HAS_ALIBI": True},
    "sink+dropout+varlen": {"HAS_SINK": True, "HAS_DROPOUT": True, "IS_VARLEN": True},
    "paged varlen": {"IS_VARLEN": True, "PAGED": True},  # forward only (flash_attn_varlen_func's block_table)
}


def launch_constexprs(block_d: int, **flags):
    """The kernels' constexpr arguments for a bf16 launch at head-dim tile ``block_d`` (features off, the residual
    kept), with ``flags`` on top; EVEN_M / EVEN_N / MERGE_EDGES, unless given, derived as the launchers derive
    them for a batched call whose lengths are multiples of the tiles (varlen and paged lengths are runtime
    values)."""
    c = {"BLOCK_DQK": block_d, "BLOCK_DV": block_d, "HAS_LEFT": False, "HAS_RIGHT": False, "HAS_SOFTCAP": False,
         "HAS_ALIBI": False, "HAS_SINK": False, "HAS_DROPOUT": False, "IS_VARLEN": False, "FP32": False,
         "HAS_DLSE": False, "EVEN_DQK": True, "EVEN_DV": True, "USE_TMA": False, "CORRECT": False,
         "HAS_RESID": True, "STORE_RESID": True, "DELTA_CHUNK": min(32, block_d), "PAGED": False, **flags}
    derived = {"EVEN_M": not c["IS_VARLEN"], "EVEN_N": not c["IS_VARLEN"] and not c["PAGED"],
               "MERGE_EDGES": configs.merge_edges(c["HAS_LEFT"], c["HAS_RIGHT"])}
    return {**derived, **c}


def typical_ints(block_d: int, seqlen: int = 4096, heads: int = 16):
    """Integer arguments of a contiguous (B, S, H, D) launch, so the compile gets the launcher's hints (integers
    divisible by 16 are marked so unless the kernel lists them in do_not_specialize). Without them this script
    misses effects such as run 7's backward slowdown (benchmarks/NOTES.md)."""
    row, seq = heads * block_d, seqlen * heads * block_d
    ints = {}
    for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):
        ints.update({f"stride_{t}b": seq, f"stride_{t}s": row, f"stride_{t}h": block_d})
    ints.update(stride_lb=heads * seqlen, stride_lh=seqlen, stride_ab=0, q_heads=heads, kv_heads=heads, group=1,
                max_seqlen_q=seqlen, max_seqlen_k=seqlen, num_m_tiles=seqlen // 64, num_n_tiles=seqlen // 64,
                win_left=-1, win_right=-1, dqk=block_d, dv=block_d, dim_v=block_d, stride_bt=0, page_size=1,
                stride_sh=16 * (1 + seqlen // 16 + 1), stride_st=heads * 16 * (1 + seqlen // 16 + 1))
    return ints


def regression_cases(arch):
    """Specialisations that once broke the compiler: ptxas (triton 3.6, sm_90a) segfaulted on the causal fp16
    forward when seqlen_k == 1 and the query-tile count == 1 were both constant-folded."""
    bad = 0
    cfg = configs._table_fwd(arch // 10, 32, True)
    consts = launch_constexprs(32, HAS_RIGHT=True, EVEN_M=False, EVEN_N=False, BLOCK_M=cfg.block_m,
                               BLOCK_N=cfg.block_n)  # 17 query rows, 1 key: no tile is whole
    for dtype in ("fp16", "bf16"):
        for fn in (_fwd_kernel, _bwd_dq_kernel, _bwd_dkdv_kernel):
            # the failing test's launch: q (2, 17, 2, 32), k/v (2, 1, 1, 32), contiguous
            ints = dict(stride_qb=1088, stride_qs=64, stride_qh=32, stride_kb=32, stride_ks=32, stride_kh=32,
                        stride_vb=32, stride_vs=32, stride_vh=32, stride_ob=1088, stride_os=64, stride_oh=32,
                        stride_dob=1088, stride_dos=64, stride_doh=32, stride_dqb=1088, stride_dqs=64,
                        stride_dqh=32, stride_dkb=32, stride_dks=32, stride_dkh=32, stride_dvb=32, stride_dvs=32,
                        stride_dvh=32, stride_lb=34, stride_lh=17, stride_ab=0, q_heads=2, kv_heads=1, group=2,
                        max_seqlen_q=17, max_seqlen_k=1, num_m_tiles=1, num_n_tiles=1, win_left=-1, win_right=0,
                        dqk=32, dv=32, dim_v=32)
            try:
                rep, _ = compile_one(fn, dtype, consts, cfg, arch, ints)
                print(f"sm{arch} regression seqlen_k=1 {dtype} {fn.__name__}: {rep}", flush=True)
            except Exception as e:  # noqa: BLE001
                bad += 1
                print(f"sm{arch} regression seqlen_k=1 {dtype} {fn.__name__}: FAILED {str(e)[:300]}", flush=True)
    return bad


def decode_cases(arch):
    """The split-KV decode kernels (contiguous and paged with every option, the fused combine, the combine
    kernel)."""
    from tileattn.kernels.decode import _decode_combine_kernel, _decode_split_kernel
    bad = 0
    cfg = configs.decode_config(128)
    base = {"BLOCK_M": 16, "BLOCK_N": cfg.block_n, "BLOCK_DQK": 128, "BLOCK_DV": 128, "EVEN_DQK": True,
            "EVEN_DV": True, "HAS_BATCH_IDX": False, "HAS_LEFTPAD": False, "HAS_LEFT": False, "HAS_RIGHT": False,
            "HAS_SOFTCAP": False, "HAS_ALIBI": False, "FP32": False, "FINAL": False, "HAS_SINK": False,
            "USE_TMA": False, "FUSED_COMBINE": False}
    ints = dict(num_splits=40, stride_qb=4096, stride_qs=4096, stride_qh=128, stride_ob=4096, stride_os=4096,
                stride_oh=128,
                stride_kb=8 * 2048 * 128, stride_ks=1024,
                stride_kh=128, stride_vb=8 * 2048 * 128, stride_vs=1024, stride_vh=128, stride_bt=64, stride_ab=0,
                q_heads=32, kv_heads=8, group=4, seqlen_q=1, batch=8, split_len=4096, page_size=16,
                win_left=-1, win_right=-1, dqk=128, dv=128)
    cases = [("decode contiguous", _decode_split_kernel, {**base, "PAGED": False}),
             ("decode paged+all", _decode_split_kernel, {**base, "PAGED": True, "HAS_LEFTPAD": True, "HAS_LEFT": True,
                                                         "HAS_RIGHT": True, "HAS_SOFTCAP": True, "HAS_ALIBI": True}),
             ("decode one split", _decode_split_kernel, {**base, "PAGED": True, "FINAL": True, "HAS_SINK": True}),
             ("decode split + merge", _decode_split_kernel, {**base, "PAGED": False, "FUSED_COMBINE": True,
                                                             "HAS_SINK": True}),
             ("decode combine", _decode_combine_kernel, {"BLOCK_S": 32, "BLOCK_DV": 128, "HAS_SINK": True}),
             ("decode traced", _decode_split_kernel, {**base, "PAGED": False})]  # decode_trace.py's TRACE
    if arch >= 90:  # caches through tensor descriptors: contiguous (cfg.tma) and paged (TILEATTN_DECODE_PAGED_TMA)
        pcfg = configs.decode_config(128, paged=True, paged_tma=True)
        cases += [("decode tma", _decode_split_kernel, {**base, "PAGED": False, "USE_TMA": True}),
                  ("decode paged tma", _decode_split_kernel, {**base, "BLOCK_N": pcfg.block_n, "PAGED": True,
                                                              "USE_TMA": True, "HAS_SINK": True})]
    for name, fn, consts in cases:
        block_n, stages = (pcfg.block_n, pcfg.num_stages) if name == "decode paged tma" else (cfg.block_n,
                                                                                            cfg.num_stages)
        kcfg = configs.KernelConfig(16, block_n, cfg.num_warps, stages if "combine" not in name else 1)
        try:
            rep, smem = compile_one(fn, "bf16", consts, kcfg, arch, ints if "combine" not in name else
                                    dict(stride_ob=4096, stride_os=4096, stride_oh=128, q_heads=32, seqlen_q=1,
                                         rows_total=256, num_splits=40, dv=128), descs=("K", "V"),
                                    given=("TRACE", ) if name == "decode traced" else ())
            print(f"sm{arch} {name}: {rep} smem {smem}", flush=True)
        except Exception as e:  # noqa: BLE001
            bad += 1
            print(f"sm{arch} {name}: FAILED {str(e)[:300]}", flush=True)
    return bad


def main():
    arch = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 90
    feats = FEATURES if "--features" in sys.argv else {"plain": {}}
    if "--quick" in sys.argv:  # also the softcap path (inline PTX tanh for bf16 when TILEATTN_FAST_TANH=1)
        feats = {"plain": {}, "softcap+alibi": FEATURES["softcap+alibi"]}
    bad = regression_cases(arch) + decode_cases(arch)
    if "--quick" in sys.argv:  # CI: the regression cases plus one head dim
        dims = (64,)
    elif "--features" in sys.argv:
        dims = (64,)
    else:
        dims = (64, 128, 256)
    for block_d in dims:
        for causal in (False, True):
            fc = configs._table_fwd(arch // 10, block_d, causal)
            bc = configs._table_bwd(arch // 10, block_d, causal)
            for fname, f in feats.items():
                rows = [("fwd", _fwd_kernel, fc), ("dkdv", _bwd_dkdv_kernel, bc.dkdv), ("dq", _bwd_dq_kernel, bc.dq)]
                if arch >= 90:  # the TMA forward (configs.use_tma: by table, or TILEATTN_TMA=1)
                    rows.insert(1, ("fwd+tma", _fwd_kernel, fc))
                # the other delta modes (configs.delta_mode): TILEATTN_DELTA=correct / rounded
                rows += [("dq correct", _bwd_dq_kernel, bc.dq_correct or bc.dq),
                         ("dq rounded", _bwd_dq_kernel, bc.dq)]
                for name, fn, cfg in rows:
                    consts = launch_constexprs(block_d, **{
                        "HAS_RIGHT": causal, **f, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                        "USE_TMA": name == "fwd+tma", "CORRECT": name == "dq correct", "HAS_RESID": name == "dq",
                        # the paged forward is inference-only: it never keeps a residual
                        "STORE_RESID": not f.get("PAGED", False)})
                    try:
                        ints = typical_ints(block_d)
                        if consts.get("PAGED"):  # a paged launch: 16-key pages, 64 pages per sequence
                            ints.update(page_size=16, stride_bt=64)
                        rep, smem = compile_one(fn, "bf16", consts, cfg, arch, ints)
                        flag = "" if rep.endswith(" 0") else "  SPILLS"
                        print(f"sm{arch} D{block_d:<3} causal={causal!s:5} {fname:20} {name:4} "
                              f"{(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)}: {rep} smem {smem}{flag}",
                              flush=True)
                    except Exception as e:  # noqa: BLE001
                        bad += 1
                        print(f"sm{arch} D{block_d} causal={causal} {fname} {name}: FAILED {str(e)[:400]}", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
