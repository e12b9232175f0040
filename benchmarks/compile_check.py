"""Compile kernel variants for a GPU target on a machine without a GPU; print registers and spills.

Usage: PYTHONPATH=src python benchmarks/compile_check.py [arch=90] [--features]
(needs triton's bundled ptxas; no GPU, no interpreter). Catches compile errors the interpreter can't see
(e.g. non-constexpr globals) and shows register pressure per config.
"""
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tileattn import configs
from tileattn.kernels.backward import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess
from tileattn.kernels.forward import _fwd_kernel

FLOATS = {"qk_scale", "sm_scale", "softcap", "dropout_p"}
INT32_PTRS = {"CU_Q", "CU_K"}
FP32_PTRS = {"LSE", "DELTA", "DLSE", "DSINK_ROWS", "ALIBI", "SINK"}


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


def compile_one(fn, dtype, constexprs, cfg, arch):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INT32_PTRS:
            sig[name] = "*i32"
        elif name == "RNG":
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
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return _ptxas_report(k.asm["ptx"], arch), k.metadata.shared


FEATURES = {
    "plain": {},
    "window": {"HAS_LEFT": True, "HAS_RIGHT": True},
    "softcap+alibi": {"HAS_SOFTCAP": True, "HAS_ALIBI": True},
    "sink+dropout+varlen": {"HAS_SINK": True, "HAS_DROPOUT": True, "IS_VARLEN": True},
}


def main():
    arch = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 90
    feats = FEATURES if "--features" in sys.argv else {"plain": {}}
    bad = 0
    for block_d in (64, 128, 256) if "--features" not in sys.argv else (64,):
        for causal in (False, True):
            fc = configs._table_fwd(arch // 10, block_d, causal)
            bc = configs._table_bwd(arch // 10, block_d, causal)
            for fname, f in feats.items():
                base = {"BLOCK_DQK": block_d, "BLOCK_DV": block_d, "HAS_LEFT": False, "HAS_RIGHT": causal,
                        "HAS_SOFTCAP": False, "HAS_ALIBI": False, "HAS_SINK": False, "HAS_DROPOUT": False,
                        "IS_VARLEN": False, "FP32": False, "HAS_DLSE": False, "EVEN_DQK": True, "EVEN_DV": True, **f}
                rows = [("fwd", _fwd_kernel, fc), ("dkdv", _bwd_dkdv_kernel, bc.dkdv), ("dq", _bwd_dq_kernel, bc.dq),
                        ("pre", _bwd_preprocess, configs.KernelConfig(bc.pre_block_m, 0, 4, 1))]
                for name, fn, cfg in rows:
                    consts = {**base, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
                    try:
                        rep, smem = compile_one(fn, "bf16", consts, cfg, arch)
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
