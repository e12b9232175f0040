#!/usr/bin/env bash
# One call on the GPU machine: run the named stages, logging each under $OUT (or ./gpu_logs).
# Stages: info smoke tests tests-sweep tests-rest tests-gluon tests-core plan plan-suite r8 s22 s22b s23 s24 s25 s25b s25c s26 s26b s26c s26d s29 s31 s31b s36 s37 s40 s42 s44 s48 s49 s50 s51 trace route decode-tests sweep-subset portable features decode precision dqtiles tune recheck hostcost gluon gluon-next gluon-on gluon-bwd varlen window gluon-features s14 s14t s17b s18 grid s21 s21b s21d bench  (BENCH_DIMS, BENCH_ARGS, TUNE_DIMS, TILES_SET env vars adjust them)
# Usage: TILEATTN_COMMIT=<sha> bash scripts/gpu_run.sh info smoke features bench
# (the device copy has no .git: pass the commit so the bench CSV/TXT name it)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT/src" PYTHONUNBUFFERED=1
OUT="${OUT:-$ROOT/gpu_logs}"
mkdir -p "$OUT"
status=0
# a test run cut by its timeout can leave pytest-xdist workers running kernels: stop them before anything is timed
# (run 79's benchmark ran beside such workers)
reap() { pkill -9 -f "pytest|xdist|execnet" 2>/dev/null; sleep 1; }
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case "$stage" in
    info) nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total,power.limit --format=csv
          python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' ;;
    smoke) python3 benchmarks/smoke.py 2>&1 | tee "$OUT/smoke.log" || status=1 ;;
    tests) python3 -m pytest tests -q -n 14 -p no:cacheprovider -rf -v -p no:benchmark --durations=15 2>&1 | tee "$OUT/tests.log" | tail -40 || status=1 ;;
    # the suite in two halves (each ~4 min on an H200), so that each fits a call beside other stages
    tests-sweep) timeout 400 python3 -m pytest tests/test_sweep.py -q -n 14 -p no:cacheprovider -rf -p no:benchmark 2>&1 | tee "$OUT/tests_sweep.log" | tail -15 || status=1 ;;
    # tests-rest in two calls of under 10 minutes each: the Gluon kernels' tests and sm_90a/sm_80 compile checks,
    # then the rest (neither has test_sweep.py: tests-sweep)
    tests-gluon) python3 -m pytest tests/test_gluon_forward.py tests/test_gluon_backward.py tests/test_gluon_flat.py \
                   tests/test_gpu_compile.py -q -n 14 -p no:cacheprovider -rf -p no:benchmark --durations=5 2>&1 \
                   | tee "$OUT/tests_gluon.log" | tail -20; [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    tests-core) python3 -m pytest tests -q -n 14 -p no:cacheprovider -rf -p no:benchmark --ignore=tests/test_sweep.py \
                  --ignore=tests/test_gluon_forward.py --ignore=tests/test_gluon_backward.py \
                  --ignore=tests/test_gluon_flat.py --ignore=tests/test_gpu_compile.py --durations=5 2>&1 \
                  | tee "$OUT/tests_core.log" | tail -20; [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    plan) # session 20: launch plans (kernels/plans.py, default since session 21): their tests and the launch
          # cache's, host time per call with plans on / off, the short cells with plans off / on against cuDNN
          timeout 240 python3 -m pytest tests/test_plans.py tests/test_launch.py -q -n 8 -p no:cacheprovider \
            -p no:benchmark -rf 2>&1 | tee "$OUT/plan_tests.log" | tail -4
          [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
          timeout 90 python3 benchmarks/host_cost.py 2>&1 | tee "$OUT/host_cost.log"
          timeout 220 python3 -m tileattn.bench --head-dims 128,64,256 --modes fwd,bwd --causal both \
            --seqlens 512,1024 --providers tileattn_noplans,tileattn_plans,sdpa_cudnn --rounds 3 --no-plot \
            --out-dir "$OUT/plans_bench" 2>&1 | grep -v "meas/s" | tee "$OUT/plans_bench.log" | tail -60 ;;
    r8) # session 21's int8 residual (NOTES v23a/v23b, opt-in TILEATTN_RESIDUAL=int8): its GPU tests with it on
        # (test_gluon_forward's int8 test compares both formats itself), then the short cells full / int8 / cuDNN
        # and the forward's GPU time with gradients under both formats
        TILEATTN_RESIDUAL=int8 timeout 300 python3 -m pytest tests/test_delta_correction.py tests/test_plans.py \
          tests/test_backward.py tests/test_gluon_forward.py -k "not compiles" -q -n 14 -p no:cacheprovider \
          -p no:benchmark -rf 2>&1 | tee "$OUT/r8_tests.log" | tail -6
        [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
        timeout 150 python3 -m tileattn.bench --head-dims 64,128,256 --modes fwd,bwd --causal both \
          --seqlens 512,1024,2048 --providers tileattn_r16,tileattn_r8,sdpa_cudnn --no-plot --out-dir "$OUT/r8" 2>&1 \
          | grep -v "meas/s" | tee "$OUT/r8_bench.log" | tail -60
        for f in full int8; do echo "== TILEATTN_RESIDUAL=$f"
          TILEATTN_RESIDUAL=$f timeout 60 python3 benchmarks/kernel_vs_wall.py --grad; done 2>&1 | tee "$OUT/r8_kvw.log" ;;
    s22) # session 22's leftovers (~4 min): v25a (the persistent forward at D=256, forced: TILEATTN_GLUON_PERSISTENT=1)
         # — its tests (test_persistent_matches_grid: bit-identical to the plain grid, accuracy rule), then its speed
         # at D=256 512-2k in CUDA-graph replay beside the plain grid and cuDNN; the GC probe (run 129's anomaly)
         timeout 240 python3 -m pytest tests/test_gluon_forward.py -k "persistent" -q -n 14 -p no:cacheprovider \
           -p no:benchmark -rf 2>&1 | tee "$OUT/s22_tests.log" | tail -6
         [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
         timeout 150 python3 benchmarks/short_variants.py "pers@256:TILEATTN_GLUON_PERSISTENT=1" \
           --cells "256,32,8,512,1;256,16,8,1024,1;256,8,8,2048,1;256,32,8,512,0;256,16,8,1024,0;256,8,8,2048,0" \
           2>&1 | grep -v Warning | tee "$OUT/s22_short.log"
         timeout 150 python3 benchmarks/gc_probe.py 2>&1 | grep -v Warning | tee "$OUT/s22_gc.log" ;;
    s22b) # (~5 min) the forward's exp2 half on the FMA units (TILEATTN_POLY_EXP=1, read at import, v27a): the
          # Gluon forward's tests with it on, then the forward cells without it / one exp2 in 2 / one in 4 on the
          # polynomial (three processes, each with its cuDNN anchor). (Run 132 also ran v26a's probe, since
          # replaced by the fused backward: s23.)
          TILEATTN_POLY_EXP=1 timeout 200 python3 -m pytest tests/test_gluon_forward.py -k "not compiles" -q -n 14 \
            -p no:cacheprovider -p no:benchmark -rf 2>&1 | tee "$OUT/s22_poly_tests.log" | tail -6
          [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
          for f in 0 1 4; do TILEATTN_POLY_EXP=$f timeout 100 python3 -m tileattn.bench --head-dims 64,128 --modes fwd \
            --causal both --seqlens 1024,4096,16384 --providers tileattn,sdpa_cudnn --no-plot \
            --out-dir "$OUT/poly$f" 2>&1 | grep -v "meas/s" | tee "$OUT/s22_poly$f.log" | tail -30
            TILEATTN_POLY_EXP=$f timeout 60 python3 -m tileattn.bench_features --seqlens 2048,8192 \
              --cases dense,softcap --out-dir "$OUT/poly$f" 2>&1 | grep -v "^#" | tee -a "$OUT/s22_poly$f.log"; done ;;
    s23) # (~6 min) the fused backward (TILEATTN_GLUON_BWD_FUSED=1, v28a): its tests (test_fused_dq.py), then both
         # forms' time per backward and per kernel beside cuDNN's (bwd_fused.py: D=128 / 64, 1k / 4k / 16k)
         timeout 300 python3 -m pytest tests/test_fused_dq.py -q -n 14 -p no:cacheprovider -p no:benchmark -rf \
           2>&1 | tee "$OUT/s23_fused_tests.log" | tail -12
         [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
         timeout 200 python3 benchmarks/bwd_fused.py --seqlens 4096,16384 --slots 2 --no-profile 2>&1 | grep -v Warning \
           | tee "$OUT/s23_bwd_fused.log" ;;
    s24) # (~4 min) v28c, the fused backward with dQ^T issued first and staged while the step's other products run
         # (TILEATTN_FUSED_DQ_EARLY=1; CPU-compiled, 0 B spills): the fused tests (both orders), then the two-kernel,
         # fused and early forms beside cuDNN (D=128 / 64, 4k / 16k)
         timeout 300 python3 -m pytest tests/test_fused_dq.py -q -n 14 -p no:cacheprovider -p no:benchmark -rf \
           2>&1 | tee "$OUT/s24_fused_tests.log" | tail -12
         [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
         timeout 200 python3 benchmarks/bwd_fused.py --seqlens 4096,16384 --early --no-profile 2>&1 \
           | grep -v Warning | tee "$OUT/s24_bwd_fused.log" ;;
    s25) # (~4 min) session 24's v29a: K (and V) as register A operands of the dK/dV kernel's S^T / dP^T
         # (TILEATTN_GLUON_BWD_KV_REGS): its tests (bit-identity with the shared-memory form, accuracy), then the
         # backward with each level beside cuDNN (run 139 also timed v29b, Q and dO of the dQ kernel in registers:
         # no gain, removed)
         timeout 240 python3 -m pytest tests/test_gluon_backward.py -k "operands_in_registers" -q -n 14 \
           -p no:cacheprovider -p no:benchmark -rf 2>&1 | tee "$OUT/s25_tests.log" | tail -12
         [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
         timeout 150 python3 benchmarks/bwd_variants.py --head-dims 128 --profile --variants \
           "kv0=TILEATTN_GLUON_BWD_KV_REGS:0,kv1=TILEATTN_GLUON_BWD_KV_REGS:1" \
           2>&1 | grep -v Warning | tee "$OUT/s25_bwd_d128.log"
         timeout 100 python3 benchmarks/bwd_variants.py --head-dims 64 --profile --variants \
           "kv0=TILEATTN_GLUON_BWD_KV_REGS:0,kv1=TILEATTN_GLUON_BWD_KV_REGS:1,kv2=TILEATTN_GLUON_BWD_KV_REGS:2" 2>&1 | grep -v Warning \
           | tee "$OUT/s25_bwd_d64.log" ;;
    s25b) # (~4 min before the grid) KV_REGS by default (D=128 non-causal, D=64 causal): the Gluon backward's and the
          # fused form's GPU tests
          timeout 230 python3 -m pytest tests/test_gluon_backward.py tests/test_fused_dq.py -q -n 14 -p no:cacheprovider \
            -p no:benchmark -rf --durations=5 2>&1 | tee "$OUT/s25b_tests.log" | tail -12
          [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap ;;
    s26) # (~5 min) session 25's linear ALiBi form on the plain grid (TILEATTN_GLUON_ALIBI=linear, the default now;
         # general = the previous form on the persistent grid): its tests, then the feature table both ways, twice
         timeout 200 python3 -m pytest tests/test_gluon_forward.py tests/test_features.py tests/test_gluon_flat.py \
           -k "alibi or schedule" -q -n 14 -p no:cacheprovider -p no:benchmark -rf 2>&1 | tee "$OUT/s26_tests.log" | tail -6
         [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
         for i in 1 2; do for form in general linear; do
           echo "--- $form $i"; TILEATTN_GLUON_ALIBI=$form timeout 100 python3 -m tileattn.bench_features \
             --cases dense,causal,alibi,alibi_causal --out-dir "$OUT/s26_${form}_$i" 2>&1 | grep -v Warning
         done; done 2>&1 | tee "$OUT/s26_features.log" ;;
    s26b) # (~6 min) the Gluon forward, flat and feature suites with the linear ALiBi form by default
          timeout 420 python3 -m pytest tests/test_gluon_forward.py tests/test_gluon_flat.py tests/test_features.py \
            -q -n 14 -p no:cacheprovider -p no:benchmark -rf --durations=5 2>&1 | tee "$OUT/s26b_tests.log" | tail -12
          [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap ;;
    s26c) # (~3 min) ALiBi's two forms on the plain grid (TILEATTN_GLUON_PERSISTENT=0): the form's own share of v31a
          for i in 1 2; do for form in general linear; do
            echo "--- $form $i"; TILEATTN_GLUON_PERSISTENT=0 TILEATTN_GLUON_ALIBI=$form timeout 100 python3 -m \
              tileattn.bench_features --cases dense,alibi,alibi_causal --out-dir "" 2>&1 | grep -v Warning
          done; done 2>&1 | tee "$OUT/s26c_features.log" ;;
    s26d) # (~5 min; needs commit b9415ff: v31c was removed after run 146) the backward's programs tiles outer
          # for causal / window calls (TILEATTN_GLUON_BWD_ORDER=tile):
          # its tests (bit-identical to heads outer), then both orders interleaved in one process (non-causal cells:
          # unaffected, the noise control)
          timeout 150 python3 -m pytest tests/test_gluon_backward.py -k "tile_outer" -q -n 8 -p no:cacheprovider \
            -p no:benchmark -rf 2>&1 | tee "$OUT/s26d_tests.log" | tail -5; [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
          timeout 150 python3 benchmarks/bwd_variants.py --head-dims 128 --seqlens 1024,2048,4096,8192 --profile \
            --variants "head=TILEATTN_GLUON_BWD_ORDER:head,tile=TILEATTN_GLUON_BWD_ORDER:tile" 2>&1 | grep -v Warning \
            | tee "$OUT/s26d_bwd_d128.log"
          timeout 90 python3 benchmarks/bwd_variants.py --head-dims 64 --seqlens 2048,8192 --profile \
            --variants "head=TILEATTN_GLUON_BWD_ORDER:head,tile=TILEATTN_GLUON_BWD_ORDER:tile" 2>&1 | grep -v Warning \
            | tee "$OUT/s26d_bwd_d64.log" ;;
    trace) # (~1 min) session 25: the dK/dV kernel's per-program trace, causal vs not (benchmarks/bwd_trace.py)
           timeout 100 python3 benchmarks/bwd_trace.py --head-dims 128 --seqlens 4096,16384 2>&1 | grep -v Warning \
             | tee "$OUT/bwd_trace.log" ;;
    s29) # (~4 min) session 26's plan: paged decode with v33b's split count (TILEATTN_DECODE_WAVES=all) and contiguous
         # decode with 4 programs per SM (5 slots with the rounding) as explore rows, then the decode tests with it
         TILEATTN_DECODE_WAVES=all timeout 120 python3 -m pytest tests/test_decode.py -q -n 14 -p no:cacheprovider \
           -p no:benchmark -rf 2>&1 | tee "$OUT/s29_decode_tests.log" | tail -3; [ "${PIPESTATUS[0]}" = 0 ] || status=1
         reap
         timeout 250 python3 -m tileattn.bench_decode --out-dir "$OUT" --flex-pages= \
           --explore "TILEATTN_DECODE_WAVES=all;32,4,3,4;TILEATTN_DECODE_WAVES=all&TILEATTN_DECODE_PAGED_SPLITS=1" \
           2>&1 | grep -v Warning | tee "$OUT/s29_decode.log" ;;
    s31) # (~7 min) v35b: the persistent Gluon dQ kernel (TILEATTN_GLUON_DQ_PERSISTENT=1, not GPU-run yet): its
         # bit-identity test and the Gluon backward tests with it, both forms' speed in one process (D=128; the
         # dK/dV kernel is the same in both: its times are the noise control); v35a: the fused decode merge
         # (one round trip per 4 splits) with its decode tests, and the decode table with it as explore rows
         timeout 100 python3 -m pytest tests/test_gluon_backward.py -k "persistent" -q -n 6 -p no:cacheprovider \
           -p no:benchmark -rf 2>&1 | tee "$OUT/s31_persistent_tests.log" | tail -5; [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
         TILEATTN_GLUON_DQ_PERSISTENT=1 timeout 200 python3 -m pytest tests/test_gluon_backward.py -q -n 14 \
           -k "dq_kernel or reproducible or softcap or alibi or window or accuracy" -p no:cacheprovider -p no:benchmark -rf \
           2>&1 | tee "$OUT/s31_tests.log" | tail -5; [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
         timeout 200 python3 benchmarks/bwd_variants.py --head-dims 128 --seqlens 1024,2048,4096,16384 --profile \
           --variants "grid=TILEATTN_GLUON_DQ_PERSISTENT:0,pers=TILEATTN_GLUON_DQ_PERSISTENT:1" 2>&1 | grep -v Warning \
           | tee "$OUT/s31_bwd.log"
         TILEATTN_DECODE_COMBINE=fused timeout 100 python3 -m pytest tests/test_decode.py -q -n 14 -p no:cacheprovider \
           -p no:benchmark -rf 2>&1 | tee "$OUT/s31_decode_tests.log" | tail -3; [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
         timeout 250 python3 -m tileattn.bench_decode --out-dir "$OUT" --explore "TILEATTN_DECODE_COMBINE=fused" \
           2>&1 | grep -v Warning | tee "$OUT/s31_decode.log" ;;
    s31b) # (~2 min) v35b's default (persistent dQ for batched calls without a causal mask or window): its
          # bit-identity tests and the Gluon backward tests without a mask, by default
          timeout 150 python3 -m pytest tests/test_gluon_backward.py \
            -k "persistent or full" -q -n 14 -p no:cacheprovider \
            -p no:benchmark -rf 2>&1 | tee "$OUT/s31b_tests.log" | tail -5; [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap ;;
    s36) # (~1.5 min) run 161's outlier, D=256 causal 512's forward (180 µs against 132-153 in runs 111-140):
         # D=256 512 / 1k forward, both masks, tileattn / FA2 / cuDNN, 3 rounds taking turns
         timeout 200 python3 -m tileattn.bench --head-dims 256 --seqlens 512,1024 --modes fwd --rounds 3 --no-plot \
           --providers tileattn,sdpa_flash,sdpa_cudnn --out-dir "$OUT" --prefix s36 2>&1 | grep -v "it/s\]" \
           | tee "$OUT/s36.log" || status=1 ;;
    s37) # (~1.5 min) D=64 backward, the dK/dV kernel's step shape (table: 64-row steps, 3 slots; run 58 chose it
         # before KV_REGS and the pipelined loop's later changes): 32-row steps / 4 slots, 64-row / 4 slots
         timeout 200 python3 benchmarks/bwd_variants.py --head-dims 64 --seqlens 1024,4096,16384 --profile \
           --variants "base=,m32=TILEATTN_GLUON_BWD_CONFIG:32;4;240;24;168;1,m64s4=TILEATTN_GLUON_BWD_CONFIG:64;4;240;24;168;1" \
           2>&1 | grep -v Warning | tee "$OUT/s37_bwd_d64.log" ;;
    s40) # (~4 min) v37a, the D=64 persistent forward with three consumer warpgroups (TILEATTN_GLUON_FWD_WG=3, not
         # GPU-run yet): its tests (bit-identity with two warpgroups, accuracy), then the D=64 non-causal forward
         # cells (the grid's shapes) with two / three warpgroups beside cuDNN, CUDA-graph replay, with and without grad
         timeout 150 python3 benchmarks/short_variants.py \
           --cells "64,32,32,512,0;64,16,32,1024,0;64,8,32,2048,0;64,4,32,4096,0;64,1,32,16384,0" \
           "wg3:TILEATTN_GLUON_FWD_WG=3" 2>&1 | grep -v Warning | tee -a "$OUT/s40_fwd.log"
         timeout 200 python3 -m pytest tests/test_gluon_forward.py -k "three" -v -n 8 -p no:cacheprovider \
           -p no:benchmark -rf 2>&1 | grep -E "PASS|FAIL|ERR|passed|failed" | tee "$OUT/s40_tests.log" | tail -3
         [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap ;;
    s42) # (~3 min) v37a's causal form (batched causal D=64 calls on the work list built for 192-row items, by
         # default from 2048 query rows since run 178): the three-warpgroup tests (incl. the causal cases), then the
         # D=64 causal forward cells, default / three warpgroups forced beside cuDNN, CUDA-graph replay
         timeout 200 python3 -m pytest tests/test_gluon_forward.py -k "three" -v -n 8 -p no:cacheprovider \
           -p no:benchmark -rf 2>&1 | grep -E "PASS|FAIL|ERR|passed|failed" | tee "$OUT/s42_tests.log" | tail -3
         [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
         timeout 150 python3 benchmarks/short_variants.py \
           --cells "64,16,32,1024,1;64,8,32,2048,1;64,4,32,4096,1;64,1,32,16384,1" \
           "wg3:TILEATTN_GLUON_FWD_WG=3" 2>&1 | grep -v Warning | tee -a "$OUT/s42_fwd.log" ;;
    s44) # (~3 min; run 183) v38a (default since session 31): causal calls on three warpgroups skip, per
         # warpgroup, the key tiles its rows do not see: its bit-identity tests and the three-warpgroup ones, then
         # the D=64 causal forward cells, two / three warpgroups / three with the skip beside cuDNN (3 rotated rounds)
         timeout 200 python3 -m pytest tests/test_gluon_forward.py -k "causal_skip or three" -v -n 8 \
           -p no:cacheprovider -p no:benchmark -rf 2>&1 | grep -E "PASS|FAIL|ERR|passed|failed" \
           | tee "$OUT/s44_tests.log" | tail -3; [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
         # (at 512 the default is the portable kernel: g2 / g3skip force the Gluon one there, its table config)
         timeout 240 python3 benchmarks/short_variants.py \
           --cells "64,32,32,512,1;64,16,32,1024,1;64,8,32,2048,1;64,4,32,4096,1;64,1,32,16384,1" \
           "wg2:TILEATTN_GLUON_FWD_WG=2" "wg3:TILEATTN_GLUON_FWD_WG=3+TILEATTN_GLUON_FWD_SKIP=0" \
           "skip:TILEATTN_GLUON_FWD_WG=3+TILEATTN_GLUON_FWD_SKIP=1" \
           "g2:TILEATTN_GLUON_FWD_CONFIG=128,3,2,240,24,168+TILEATTN_GLUON_FWD_WG=2" \
           "g3skip:TILEATTN_GLUON_FWD_CONFIG=128,3,2,240,24,168+TILEATTN_GLUON_FWD_WG=3+TILEATTN_GLUON_FWD_SKIP=1" \
           2>&1 | grep -v Warning | tee "$OUT/s44_fwd.log" ;;
    s48) # (~3 min) contiguous decode per forced split count against the default count and cuDNN (decode_splits.py),
         # then the 4k sink forward that read 0.77 x dense in run 193 (dense and sink, twice)
         timeout 300 python3 benchmarks/decode_splits.py 2>&1 | grep -v Warning | tee "$OUT/s48_decode_splits.log"
         for i in 1 2; do timeout 120 python3 -m tileattn.bench_features --seqlens 4096 --cases dense,sink \
           --out-dir "$OUT/f$i" 2>&1 | grep -v Warning | tee -a "$OUT/s48_sink.log"; done ;;
    s49) # (~5 min) fwd_trace.py's instruments on the GPU (outputs bit-identical with TRACE + STAGGER), then the
         # per-item traces with and without the odd programs started half an item late (run 195's hypothesis: D=256's
         # ~6.5 us per item of epilogue stores + Q load are HBM bursts of all SMs at once)
         timeout 150 python3 -m pytest tests/test_gluon_forward.py -k "trace_and_stagger or stagger_knob" -q -n 4 \
           -p no:cacheprovider -p no:benchmark -rf 2>&1 | tail -3 | tee "$OUT/s49_tests.log"; [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
         (cd benchmarks && timeout 300 python3 fwd_trace.py --stagger \
           --cells "256,1024,0;256,2048,0;256,16384,0;128,1024,0;64,1024,0;256,1024,1;256,1024,0,infer" 2>&1 \
           | grep -v Warning | tee "$OUT/s49_fwd_trace.log"
          TILEATTN_RESIDUAL=int8 timeout 60 python3 fwd_trace.py --cells "256,1024,0" 2>&1 | grep -v Warning \
           | sed 's/^D=/int8 residual: D=/' | tee -a "$OUT/s49_fwd_trace.log") ;;
    s50) # (~2 min) decode_trace.py's instrument on the GPU (outputs bit-identical with TRACE), then the split
         # kernel's per-program traces on the decode table's shapes (how its programs fill the SMs; the step beside)
         timeout 120 python3 -m pytest tests/test_decode.py -k "trace" -q -n 2 -p no:cacheprovider -p no:benchmark \
           -rf 2>&1 | tail -3 | tee "$OUT/s50_tests.log"; [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
         (cd benchmarks && timeout 150 python3 decode_trace.py 2>&1 | grep -v Warning | tee "$OUT/s50_decode_trace.log") ;;
    s51) # (~5 min) stream-K ranges (TILEATTN_GLUON_FWD_STREAMK=1, not GPU-run yet): its tests, then non-causal
         # forward cells (the grid's shapes) default / streamk beside cuDNN
         timeout 200 python3 -m pytest tests/test_gluon_streamk.py -q -n 8 -p no:cacheprovider -p no:benchmark -rf \
           2>&1 | tail -3 | tee "$OUT/s51_tests.log"; [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
         cells="128,16,16,1024,0;128,4,16,4096,0;128,2,16,8192,0;128,1,16,16384,0;256,16,8,1024,0;256,8,8,2048,0"
         cells="$cells;256,4,8,4096,0;256,1,8,16384,0;64,16,32,1024,0;64,1,32,16384,0"
         timeout 280 python3 benchmarks/short_variants.py --cells "$cells" "streamk:TILEATTN_GLUON_FWD_STREAMK=1" \
           2>&1 | grep -v Warning | tee "$OUT/s51_fwd.log" ;;
    route) # (~1 min) the routing test (the default schedule reaches the launch, incl. varlen ALiBi's general form)
           timeout 150 python3 -m pytest tests/test_gluon_forward.py -k "schedule" -q -n 8 -p no:cacheprovider \
             -p no:benchmark -rf 2>&1 | tee "$OUT/route_tests.log" | tail -5; [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap ;;
    decode-tests) timeout 200 python3 -m pytest tests/test_decode.py -q -n 14 -p no:cacheprovider -p no:benchmark -rf \
                    2>&1 | tee "$OUT/decode_tests.log" | tail -5; [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap ;;
    s25c) # (~4 min) the core GPU suite with KV_REGS by default (run 141 also timed v30a, Q as the register A
          # operand of the forward's Q K^T, at ad9af50: no gain, removed)
          timeout 300 python3 -m pytest tests -q -n 14 -p no:cacheprovider -rf -p no:benchmark \
            --ignore=tests/test_sweep.py --ignore=tests/test_gluon_forward.py --ignore=tests/test_gluon_backward.py \
            --ignore=tests/test_gluon_flat.py --ignore=tests/test_gpu_compile.py --durations=5 2>&1 \
            | tee "$OUT/tests_core.log" | tail -8; [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    plan-suite) # the forward, backward, feature and API tests with launch plans on (the suite runs with them off:
                # conftest) — each test's repeated calls replay plans
          TILEATTN_LAUNCH_PLANS=1 timeout 560 python3 -m pytest tests/test_forward.py tests/test_backward.py \
            tests/test_features.py tests/test_api.py -q -n 14 -p no:cacheprovider -p no:benchmark -rf 2>&1 \
            | tee "$OUT/plan_suite.log" | tail -6
          [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    tests-rest) python3 -m pytest tests -q -n 14 -p no:cacheprovider -rf -p no:benchmark --ignore=tests/test_sweep.py --durations=10 2>&1 | tee "$OUT/tests_rest.log" | tail -30 || status=1 ;;
    # the sweep configs that run on the sm90 table entries changed in d31fdd6 (benchmarks/sweep_table_subset.txt)
    sweep-subset) python3 -m pytest $(cat benchmarks/sweep_table_subset.txt) -q -n 14 -p no:cacheprovider -rf -p no:benchmark 2>&1 | tee "$OUT/sweep_subset.log" | tail -8 || status=1 ;;
    portable) python3 -m pytest tests/test_portable.py -q -n 14 -p no:cacheprovider -rf -p no:benchmark 2>&1 | tee "$OUT/portable.log" | tail -5 || status=1 ;;
    features) python3 -m tileattn.bench_features --out-dir "$OUT" 2>&1 | tee "$OUT/features.log" || status=1 ;;
    decode) python3 -m tileattn.bench_decode --out-dir "$OUT" ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode.log" || status=1 ;;
    precision) python3 benchmarks/delta_precision.py 2>&1 | tee "$OUT/delta_precision.log" || status=1 ;;
    dqtiles) OUT="$OUT" bash benchmarks/dq_tile_sweep.sh "${TILES_SET:-next}" 2>&1 | tee "$OUT/dq_tiles.log" || status=1 ;;
    tune) python3 benchmarks/tune.py --head-dims "${TUNE_DIMS:-256}" --out "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log" || status=1 ;;
    # run 25's anomaly (D=128 causal 512/1k far below runs 23-24) and the TMA edge loops after the V-zeroing fix:
    # the causal forward cells with the edge-loop variants beside the default, twice; the feature costs at 2k
    recheck) { for i in 1 2; do python3 -m tileattn.bench --head-dims 128,256 --causal true --seqlens 512,1024,2048,4096 \
               --modes fwd --providers tileattn,tileattn_merged,tileattn_notma,sdpa_flash,sdpa_cudnn --no-plot \
               --out-dir "$OUT/recheck$i" 2>&1 | grep -v "it/s\]"; done
             python3 -m tileattn.bench --head-dims 128 --causal true --seqlens 512,1024 --modes bwd --no-plot \
               --providers tileattn,sdpa_flash,sdpa_cudnn --out-dir "$OUT/recheck_bwd" 2>&1 | grep -v "it/s\]"
             python3 -m tileattn.bench_features --seqlens 2048 --cases dense,causal,sink,window 2>&1 | grep -v "^#"
             TILEATTN_TMA=1 python3 -m tileattn.bench_features --seqlens 2048 --cases window 2>&1 | grep -v "^#"
             } | tee "$OUT/recheck.log" ;;
    # host time per call (tiny shapes): this tree with the launch cache on and off (interleaved in one process),
    # an older tree if bisect/old holds one (git worktree add bisect/old <sha>; carry it), then a cProfile
    hostcost) { echo "== this tree"; python3 benchmarks/host_profile.py --wall-only --calls 2000
                if [ -d bisect/old/src ]; then echo "== bisect/old"
                  TILEATTN_SRC=bisect/old/src python3 benchmarks/host_profile.py --wall-only --calls 2000; fi
                echo "== this tree, cProfile"; python3 benchmarks/host_profile.py --calls 500 --top 25
              } 2>&1 | tee "$OUT/hostcost.log" ;;
    # the Hopper Gluon forward: its tests, then the forward grid beside the portable Triton forward and the anchors
    gluon) python3 -m pytest tests/test_gluon_forward.py -q -n 14 -p no:cacheprovider -rf -p no:benchmark 2>&1 \
             | tee "$OUT/gluon_tests.log" | tail -${GLUON_TAIL:-15} || status=1
           python3 -m tileattn.bench --head-dims "${BENCH_DIMS:-64,128}" --modes fwd --check --no-plot \
             --providers tileattn,tileattn_triton,sdpa_flash,sdpa_cudnn --out-dir "$OUT" --prefix gluon_fwd ${BENCH_ARGS:-} 2>&1 \
             | tee "$OUT/gluon_bench.log" | grep -v "it/s\]" || status=1 ;;
    # session 10's leftovers: the Gluon probe with the opt-in entries (D=256, softcap, sink, window), the test files run 54 did not reach,
    # then D=256 / D=128 forwards: Gluon (all entries) vs the portable kernel vs cuDNN, same call
    gluon-next) TILEATTN_GLUON=all python3 benchmarks/gluon_probe.py --timeout 40 2>&1 | tee "$OUT/gluon_probe.log"
           if grep -q "TIMEOUT\|rc=" "$OUT/gluon_probe.log"; then status=1; else
           python3 -m pytest tests -q -n 14 -p no:cacheprovider -rf -p no:benchmark --ignore=tests/test_sweep.py \
             --ignore=tests/test_forward.py --ignore=tests/test_backward.py --ignore=tests/test_api.py \
             --ignore=tests/test_memory.py --ignore=tests/test_flash_api.py 2>&1 | tee "$OUT/tests_rest_remainder.log" | tail -15 || status=1
           python3 -m tileattn.bench --head-dims 256,128 --modes fwd --no-plot --out-dir "$OUT" --prefix gluon_next \
             --providers tileattn,tileattn_gluon_all,tileattn_triton,sdpa_cudnn 2>&1 | tee "$OUT/gluon_next_bench.log" | grep -v "it/s\]"
           for g in 1 all; do echo "== TILEATTN_GLUON=$g"; TILEATTN_GLUON=$g python3 -m tileattn.bench_features \
             --cases dense,softcap,sink,window --seqlens 2048,8192 --head-dim 128 2>&1 | grep -v "^#"; done \
             | tee "$OUT/gluon_next_features.log"; fi ;;
    # session 11: the Gluon forward's features on by default: their tests, host time, feature costs at D=64/256
    gluon-on) python3 -m pytest tests/test_gluon_forward.py tests/test_features.py tests/test_flash_api.py tests/test_api.py \
                -q -n 14 -p no:cacheprovider -rf -p no:benchmark 2>&1 | tee "$OUT/gluon_on_tests.log" | tail -12 || status=1
              python3 benchmarks/host_profile.py --wall-only --calls 2000 2>&1 | tee "$OUT/hostcost.log"
              for d in 64 256; do for g in 1 0; do echo "== D=$d TILEATTN_GLUON=$g"; TILEATTN_GLUON=$g python3 -m tileattn.bench_features \
                --cases dense,softcap,sink,window --seqlens 2048,8192 --head-dim $d 2>&1 | grep -v "^#\|^wrote\|^done"; done; done \
                | tee "$OUT/gluon_on_features.log" ;;
    # session 11: the Gluon dK/dV kernel (opt-in): probe (stops on a hang), its tests, then the backward grid
    gluon-bwd) TILEATTN_GLUON=all python3 benchmarks/gluon_probe.py --bwd --timeout 60 2>&1 | tee "$OUT/gluon_bwd_probe.log"
           if grep -q "TIMEOUT\|rc=" "$OUT/gluon_bwd_probe.log"; then status=1; else
           python3 -m pytest tests/test_gluon_backward.py -q -n 14 -p no:cacheprovider -rf -p no:benchmark 2>&1 \
             | tee "$OUT/gluon_bwd_tests.log" | tail -${GLUON_TAIL:-15} || status=1
           python3 -m tileattn.bench --head-dims "${BENCH_DIMS:-64,128}" --modes bwd --no-plot --out-dir "$OUT" --prefix gluon_bwd \
             --providers tileattn,tileattn_gluon_all,sdpa_cudnn ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gluon_bwd_bench.log" | grep -v "it/s\]"; fi ;;
    # the Gluon varlen forward and backward (default-on): a hang-safe first look at the varlen backward tests, then
    # the test files that route varlen calls through them, then varlen per useful FLOP against dense
    varlen) timeout 200 python3 -m pytest tests/test_gluon_backward.py -k varlen -x -q -p no:cacheprovider -rf \
              -p no:benchmark 2>&1 | tee "$OUT/varlen_probe.log" | tail -8
            if [ "${PIPESTATUS[0]}" != 0 ]; then status=1; else
            timeout 420 python3 -m pytest tests/test_gluon_forward.py tests/test_gluon_backward.py tests/test_varlen.py \
              tests/test_forward.py tests/test_compat.py tests/test_flash_api.py -q -n 14 \
              -p no:cacheprovider -rf -p no:benchmark 2>&1 | tee "$OUT/varlen_tests.log" | tail -15 || status=1
            python3 -m tileattn.bench_features --seqlens 2048,8192 \
              --cases dense,varlen,varlen_equal --out-dir "$OUT" 2>&1 | grep -v "^#" | tee "$OUT/varlen_features.log"; fi ;;
    # session 13: sliding windows through the Gluon backward: a hang-safe first look, the test files that route
    # windowed and varlen calls through it, then window / varlen per useful FLOP (windows 512 and 2048, D=128 and 64)
    window) timeout 200 python3 -m pytest tests/test_gluon_backward.py -k "window and 128" -x -q -p no:cacheprovider \
              -rf -p no:benchmark 2>&1 | tee "$OUT/window_probe.log" | tail -8
            if [ "${PIPESTATUS[0]}" != 0 ]; then status=1; else
            timeout 400 python3 -m pytest tests/test_gluon_backward.py tests/test_gluon_forward.py tests/test_features.py \
              tests/test_varlen.py -q -n 14 -p no:cacheprovider -rf -p no:benchmark 2>&1 | tee "$OUT/window_tests.log" \
              | tail -15 || status=1
            for w in 512 2048; do python3 -m tileattn.bench_features --seqlens 2048,8192 --window $w \
              --cases dense,window,varlen --out-dir "$OUT/w$w" 2>&1 | grep -v "^#"; done | tee "$OUT/window_features.log"
            python3 -m tileattn.bench_features --seqlens 2048,8192 --head-dim 64 --cases dense,window --out-dir "$OUT/d64" \
              2>&1 | grep -v "^#" | tee -a "$OUT/window_features.log"; fi ;;
    # session 13: softcap and ALiBi through the Gluon kernels: a hang-safe first look, the test files whose feature
    # calls go through them, then every feature's cost per useful FLOP at D=128 and 64
    gluon-features) timeout 240 python3 -m pytest tests/test_gluon_backward.py tests/test_gluon_forward.py -x -q \
               -k "(softcap and 128 and bf16) or (test_alibi and 128 and head)" -p no:cacheprovider -rf \
               -p no:benchmark 2>&1 | tee "$OUT/features_probe.log" | tail -8
             if [ "${PIPESTATUS[0]}" != 0 ]; then status=1; else
             timeout 420 python3 -m pytest tests/test_gluon_backward.py tests/test_gluon_forward.py tests/test_features.py \
               tests/test_varlen.py tests/test_flash_api.py tests/test_api.py -q -n 14 -p no:cacheprovider -rf \
               -p no:benchmark 2>&1 | tee "$OUT/features_tests.log" | tail -15 || status=1
             for d in 128 64; do python3 -m tileattn.bench_features --seqlens 2048,8192 --head-dim $d \
               --out-dir "$OUT/d$d" 2>&1 | grep -v "^#"; done | tee "$OUT/features.log"; fi ;;
    # session 14: the split D=256 dK/dV kernel hang-safe first, then D=256 backward Gluon-all (plain, pipelined) vs the
    # default vs cuDNN, the varlen work list off/on twice; s14t: session 14's tests
    s14) TILEATTN_GLUON=all timeout 240 python3 -m pytest tests/test_gluon_backward.py -x -q -p no:cacheprovider -rf \
           -p no:benchmark -k "split_d256_accuracy and 1x130" 2>&1 | tee "$OUT/s14_probe.log" | tail -8
         if [ "${PIPESTATUS[0]}" != 0 ]; then status=1; else
         python3 -m tileattn.bench --head-dims 256 --modes bwd --no-plot --out-dir "$OUT" --prefix d256_bwd \
           --providers tileattn,tileattn_gluon_all,sdpa_cudnn 2>&1 | tee "$OUT/d256_bwd.log" | grep -v "it/s\]"
         echo "== split pipelined (TILEATTN_GLUON_BWD_CONFIG=32,3,240,24,168,1)"
         TILEATTN_GLUON=all TILEATTN_GLUON_BWD_CONFIG=32,3,240,24,168,1 timeout 120 python3 -m pytest tests/test_gluon_backward.py \
           -x -q -p no:cacheprovider -p no:benchmark -k "split_d256_accuracy and 1x130" 2>&1 | tail -3 | tee "$OUT/s14_pipe_tests.log"
         TILEATTN_GLUON_BWD_CONFIG=32,3,240,24,168,1 python3 -m tileattn.bench --head-dims 256 --modes bwd --no-plot --out-dir "$OUT" \
           --prefix d256_bwd_pipe --providers tileattn_gluon_all,sdpa_cudnn 2>&1 | tee "$OUT/d256_bwd_pipe.log" | grep -v "it/s\]"
         for m in 0 1 0 1; do echo "== TILEATTN_VARLEN_TILEMAP=$m"; TILEATTN_VARLEN_TILEMAP=$m python3 -m tileattn.bench_features \
           --seqlens 2048,8192 --cases dense,varlen,varlen_equal 2>&1 | grep -v "^#"; done | tee "$OUT/tilemap.log"; fi ;;
    s14t) timeout 420 python3 -m pytest tests/test_gluon_backward.py tests/test_interpreter_patch.py tests/test_varlen.py \
           tests/test_decode.py tests/test_launch.py -q -n 14 -p no:cacheprovider -rf -p no:benchmark \
           -k "split or scope or compiles or interpreter or fp32 or tile_map or varlen or decode or kvcache or launch" \
           2>&1 | tee "$OUT/s14_tests.log" | tail -15 || status=1
         timeout 300 python3 -m pytest tests/test_gluon_forward.py tests/test_features.py tests/test_flash_api.py -q -n 14 \
           -p no:cacheprovider -rf -p no:benchmark -k "varlen or huge or in_place or bad" 2>&1 \
           | tee "$OUT/s14_tests2.log" | tail -10 || status=1 ;;
    # s17b: the split dK/dV form at D=128 (7th value of TILEATTN_GLUON_BWD_CONFIG), accuracy first, then the D=128
    # backward default vs split variants, one process each (runs 85-87 measured the rest of session 16's stages)
    s17b) TILEATTN_GLUON_BWD_CONFIG=64,3,240,24,168,1,1 timeout 240 python3 -m pytest tests/test_gluon_backward.py -q -n 14 \
           -p no:cacheprovider -p no:benchmark -k "(test_accuracy or test_dlse_and_sink or test_sliding_window or test_alibi) and 128" \
           2>&1 | tee "$OUT/split128_tests.log" | tail -6
         ok=${PIPESTATUS[0]}; reap
         if [ "$ok" != 0 ]; then status=1; else
         for c in default 64,3,240,24,168,1,1 64,3,240,24,168,0,1 128,2,240,24,168,0,1; do echo "== dK/dV $c"
           if [ "$c" = default ]; then unset TILEATTN_GLUON_BWD_CONFIG; else export TILEATTN_GLUON_BWD_CONFIG=$c; fi
           timeout 120 python3 -m tileattn.bench --head-dims 128 --modes bwd --providers tileattn,sdpa_cudnn --no-plot \
             --out-dir "$OUT/split128_$(echo $c | tr , _)" 2>&1 | grep -A8 "== bwd" | grep -v "^$"; done | tee "$OUT/split128.log"
         unset TILEATTN_GLUON_BWD_CONFIG; fi ;;
    # the whole grid with every anchor (SDPA flash / cuDNN / mem-efficient, compiled FlexAttention), fwd and bwd
    grid) timeout 560 python3 -m tileattn.bench --modes fwd,bwd --out-dir "$OUT" --prefix grid 2>&1 \
            | tee "$OUT/grid.log" | grep -v "it/s\]" || status=1 ;;
    s18) # the defaults from runs 85-87 (D=64 non-causal Gluon from 512 keys, D=256 3 K slots and causal from 1k,
         # the softcap fold on): the forward-side tests, then those shapes' forward against the portable kernel
         timeout 200 python3 -m pytest tests/test_gluon_forward.py tests/test_features.py -q -n 14 -p no:cacheprovider \
           -p no:benchmark -rf -k "not compiles" 2>&1 | tee "$OUT/s18_tests.log" | tail -4
         [ "${PIPESTATUS[0]}" = 0 ] || status=1; reap
         timeout 150 python3 -m tileattn.bench --head-dims 64,256 --seqlens 512,1024,2048 --modes fwd --no-plot \
           --providers tileattn,tileattn_triton,sdpa_cudnn --out-dir "$OUT" --prefix s18 2>&1 | tee "$OUT/s18_bench.log" \
           | grep -v "it/s\]" ;;
    s21) # session 19's first stage: the flat persistent forward (v21a, TILEATTN_GLUON_FLAT=1): its GPU tests
         # (bit-identity with the plain grid, scope), then forward TFLOP/s default / flat / persistent / cuDNN at
         # D=128 and 64, causal and not, 512..4k and 16k (the SM clock beside each timing, bench_clock)
         timeout 240 python3 -m pytest tests/test_gluon_flat.py -q -n 14 -p no:cacheprovider -p no:benchmark -rf \
           2>&1 | tee "$OUT/flat_tests.log" | tail -6
         ok=${PIPESTATUS[0]}; reap
         if [ "$ok" != 0 ]; then status=1; else
           timeout 300 python3 -m tileattn.bench --head-dims 128,64 --modes fwd --seqlens 512,1024,2048,4096,16384 \
             --providers tileattn,tileattn_flat,tileattn_persistent,sdpa_cudnn --out-dir "$OUT" --prefix flat \
             2>&1 | grep -v "meas/s" | tee "$OUT/flat_bench.log" | tail -60; fi ;;
    s21b) # the flat forward's feature cases per dense (window and varlen per useful FLOP) off / on, twice; D=64
          # below the table's Gluon thresholds (portable by default): the Gluon grid vs flat; D=256 at 512-1k: the
          # default (portable below 1k keys) vs the Gluon forward with the threshold lifted
          for v in 0 1 0 1; do echo "== TILEATTN_GLUON_FLAT=$v (persistent forced)"
            TILEATTN_GLUON_PERSISTENT=1 TILEATTN_GLUON_FLAT=$v timeout 90 python3 -m tileattn.bench_features \
              --seqlens 2048,8192 --head-dim 128 --cases dense,causal,window,softcap,varlen 2>&1 | grep -v "^#"; done \
            | tee "$OUT/flat_features.log"
          TILEATTN_GLUON_FWD_CONFIG=128,3,2,240,24,168 timeout 120 python3 -m tileattn.bench --head-dims 64 \
            --modes fwd --seqlens 512,1024,2048 --providers tileattn,tileattn_flat,sdpa_cudnn --no-plot \
            --out-dir "$OUT" --prefix flat64 2>&1 | grep -v "meas/s" | tee "$OUT/flat64_bench.log" | tail -20
          for c in default 64,3,2,240,24,168; do echo "== D=256 TILEATTN_GLUON_FWD_CONFIG=$c"
            if [ "$c" = default ]; then unset TILEATTN_GLUON_FWD_CONFIG; else export TILEATTN_GLUON_FWD_CONFIG=$c; fi
            timeout 120 python3 -m tileattn.bench --head-dims 256 --modes fwd --seqlens 512,1024 \
              --providers tileattn,sdpa_cudnn --no-plot --out-dir "$OUT/d256_$(echo $c | tr , _)" 2>&1 \
              | grep -A4 "== fwd"; done | tee "$OUT/d256_short.log"
          unset TILEATTN_GLUON_FWD_CONFIG
          # the portable kernel's fixed softmax max (TILEATTN_SOFTCAP_FIXED_MAX=all; D=64 softcap runs portable):
          # its tests, then softcap / dense at D=64 with 1 (default) / all, twice
          TILEATTN_SOFTCAP_FIXED_MAX=all timeout 120 python3 -m pytest tests/test_forward.py -q -n 14 \
            -p no:cacheprovider -p no:benchmark -rf -k portable_softcap_fixed_max 2>&1 | tail -3; reap
          for v in 1 all 1 all; do echo "== D=64 TILEATTN_SOFTCAP_FIXED_MAX=$v"
            TILEATTN_SOFTCAP_FIXED_MAX=$v timeout 90 python3 -m tileattn.bench_features --seqlens 2048,8192 \
              --head-dim 64 --cases dense,softcap 2>&1 | grep -v "^#"; done | tee "$OUT/portable_fixed_max.log" ;;
    s20w) # session 20's first stage: causal calls on the persistent grid walking the host's L2-grouped work list
         # (v22a, _hostinfo.causal_schedule): its GPU tests (bit-identity with the plain grid, list and LPT), then
         # forward TFLOP/s plain grid (default) / persistent + list / persistent + LPT / flat + list / cuDNN, D=128
         # and 64 causal, twice
         timeout 300 python3 -m pytest tests/test_gluon_forward.py tests/test_gluon_flat.py -q -n 14 \
           -p no:cacheprovider -p no:benchmark -rf -k "work_list or causal_schedule or persistent or flat" \
           2>&1 | tee "$OUT/causal_list_tests.log" | tail -6
         ok=${PIPESTATUS[0]}; reap
         if [ "$ok" != 0 ]; then status=1; fi
         for i in 1 2; do timeout 240 python3 -m tileattn.bench --head-dims 128,64 --modes fwd --causal true \
           --seqlens 512,1024,2048,4096,8192,16384 --no-plot \
           --providers tileattn,tileattn_persistent,tileattn_persistent_lpt,tileattn_flat,sdpa_cudnn \
           --out-dir "$OUT/causal_list_$i" \
           2>&1 | grep -v "meas/s" | tee "$OUT/causal_list_bench_$i.log" | tail -30; done
         # D=64 causal below 2048 keys runs the portable kernel by default: the Gluon grid and persistent + list with
         # the table's thresholds lifted (the config override) against it
         TILEATTN_GLUON_FWD_CONFIG=128,3,2,240,24,168 timeout 120 python3 -m tileattn.bench --head-dims 64 \
           --modes fwd --causal true --seqlens 512,1024,2048 --no-plot --out-dir "$OUT/causal_list_d64" \
           --providers tileattn_triton,tileattn,tileattn_persistent,sdpa_cudnn 2>&1 | grep -v "meas/s" \
           | tee "$OUT/causal_list_d64.log" | tail -12 ;;
    s19f) # session 19's last call: D=256 at 512-1k with causal 512 on Gluon (the new table) against the portable
          # kernel and cuDNN, then with the non-causal threshold lifted too (run 99's non-causal 512: Gluon 201 vs
          # portable 294); paged decode through descriptors with 32- and 64-key tiles at 3 stages. First the routing
          # test and the D=256 accuracy tests of the Gluon forward
          timeout 150 python3 -m pytest tests/test_gluon_forward.py -q -n 14 -p no:cacheprovider -p no:benchmark -rf \
            -k "scope_on_hopper or (accuracy and 256)" 2>&1 | tee "$OUT/d256_tests.log" | tail -3; reap
          timeout 120 python3 -m tileattn.bench --head-dims 256 --modes fwd --seqlens 512,1024 \
            --providers tileattn,tileattn_triton,sdpa_cudnn --no-plot --out-dir "$OUT/d256" 2>&1 \
            | grep -v "meas/s" | tee "$OUT/d256.log" | grep -A4 "== fwd"
          TILEATTN_GLUON_FWD_CONFIG=64,3,2,240,24,168 timeout 120 python3 -m tileattn.bench --head-dims 256 \
            --modes fwd --seqlens 512 --providers tileattn,tileattn_triton,sdpa_cudnn --no-plot \
            --out-dir "$OUT/d256_lifted" 2>&1 | grep -v "meas/s" | tee "$OUT/d256_lifted.log" | grep -A3 "== fwd"
          timeout 300 python3 -m tileattn.bench_decode --out-dir "$OUT" --explore \
            "TILEATTN_DECODE_PAGED_TMA=1;TILEATTN_DECODE_PAGED_TMA=1&32,4,3,2;TILEATTN_DECODE_PAGED_TMA=1&64,4,3,2" \
            2>&1 | tee "$OUT/paged_tma_decode.log" | tail -60 ;;
    s19g) # D=256 from 512 keys on Gluon (both masks): the routing test, then the default against the portable kernel
          timeout 100 python3 -m pytest tests/test_gluon_forward.py -q -n 4 -p no:cacheprovider -p no:benchmark -rf \
            -k "scope_on_hopper or features_take_gluon" 2>&1 | tee "$OUT/scope.log" | tail -3; reap
          timeout 100 python3 -m tileattn.bench --head-dims 256 --modes fwd --seqlens 512,768,1024 \
            --providers tileattn,tileattn_triton,sdpa_cudnn --no-plot --out-dir "$OUT" 2>&1 | grep -v "meas/s" \
            | tee "$OUT/d256_default.log" | grep -A5 "== fwd\|SM clock" ;;
    s21d) # paged decode through tensor descriptors (opt-in TILEATTN_DECODE_PAGED_TMA=1, session 18; 3 stages since
          # session 19): its GPU tests, then the decode table with it as extra rows (every page size; it applies
          # where page % 64 == 0)
          timeout 200 python3 -m pytest tests/test_decode.py -q -n 14 -p no:cacheprovider -p no:benchmark -rf \
            -k "paged_cache or tma_contiguous or paged" 2>&1 | tee "$OUT/paged_tma_tests.log" | tail -4
          ok=${PIPESTATUS[0]}; reap
          # every contiguous decode call on 64-key tiles with 3 stages (opt-in TILEATTN_DECODE_LONG_SPLITS, here
          # from one split): the decode tests against the float64 reference
          TILEATTN_DECODE_LONG_SPLITS=1 timeout 200 python3 -m pytest tests/test_decode.py -q -n 14 \
            -p no:cacheprovider -p no:benchmark -rf 2>&1 | tee "$OUT/long_splits_tests.log" | tail -4
          [ "${PIPESTATUS[0]}" = 0 ] || ok=1; reap
          if [ "$ok" != 0 ]; then status=1; else
            timeout 300 python3 -m tileattn.bench_decode --out-dir "$OUT" \
              --explore "TILEATTN_DECODE_PAGED_TMA=1;TILEATTN_DECODE_LONG_SPLITS=16" \
              2>&1 | tee "$OUT/paged_tma_decode.log" | tail -40; fi ;;
    bench) python3 -m tileattn.bench --head-dims "${BENCH_DIMS:-64,128}" --out-dir "$OUT" ${BENCH_ARGS:-} 2>&1 \
             | tee "$OUT/bench.log" | grep -v "it/s\]" || status=1 ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
done
exit $status
