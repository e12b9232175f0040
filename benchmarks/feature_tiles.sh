#!/usr/bin/env bash
# Tile candidates for the short-program cases (sliding window, causal, varlen) at D=128, timed with bench_features
# (dense is re-timed in each invocation: ratios are against the same tiles' dense run, so compare the absolute
# TFLOP/s of a case across invocations of one call). Usage: OUT=dir bash benchmarks/feature_tiles.sh
# Why: with 1 CTA per SM (D=128 forward 64x64x4x3 uses 112 KB of shared memory) a program's prologue and epilogue
# are not overlapped with another program's main loop; a window program has ~16 key tiles against dense's 64.
# 64x64x4x2 (80 KB) fits two CTAs per SM.
set -u
OUT="${OUT:-gpu_logs}"
feat() {  # tag, then env assignments
  local tag=$1; shift
  echo "--- $tag: $*"
  env "$@" python3 -m tileattn.bench_features --seqlens "${SEQLENS:-2048,8192}" --cases "${CASES:-dense,causal,window,varlen,varlen_equal}" \
    --out-dir "$OUT/ft_$tag" 2>&1 | grep -v "^#\|wrote\|done in"
}
if [ "${1:-}" = window2 ]; then  # run 20: which half of run 19's best window pair (32x64x4x2 + 64x64x4x2) pays
  feat table TILEATTN_DELTA=residual
  feat w_dkdv32x64s2 TILEATTN_BWD_CONFIG=32,64,4,2,128,64,8,3
  feat w_dq64x64s2 TILEATTN_BWD_CONFIG=32,128,8,3,64,64,4,2
  feat w_dkdv64x128_dq64x64s2 TILEATTN_BWD_CONFIG=64,128,8,3,64,64,4,2
  exit 0
fi
if [ "${1:-}" = fwd_tma ]; then  # session 6: the TMA forward (never timed) and larger forward tiles it frees
  feat table TILEATTN_DELTA=residual
  feat tma TILEATTN_TMA=1
  feat tma128x64s3 TILEATTN_TMA=1 TILEATTN_FWD_CONFIG=128,64,8,3
  feat tma128x128s2 TILEATTN_TMA=1 TILEATTN_FWD_CONFIG=128,128,8,2
  feat fwd64x32s3 TILEATTN_FWD_CONFIG=64,32,4,3
  exit 0
fi
feat table TILEATTN_DELTA=residual
feat fwd64x64s2 TILEATTN_FWD_CONFIG=64,64,4,2
feat fwd128x64w8s2 TILEATTN_FWD_CONFIG=128,64,8,2
feat bwd_noncausal TILEATTN_BWD_CONFIG=64,128,8,3,128,64,8,3
feat bwd_small4w TILEATTN_BWD_CONFIG=32,64,4,3,64,64,4,3
feat bwd_small4w_s2 TILEATTN_BWD_CONFIG=32,64,4,2,64,64,4,2
feat bwd_dq64x64w8 TILEATTN_BWD_CONFIG=32,128,8,3,64,64,8,3
