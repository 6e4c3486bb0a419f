#!/usr/bin/env bash
# Re-run the README's GPU tables on a machine with two GPUs (NCCL), one group at a time, each step under a time
# limit, with full logs and JSON in $OUT (default ./gpu-results). Usage:
#
#   bash benchmarks/gpu_tables.sh s1        # S1 on 2 and 1 GPUs (40 and 72 latent frames, extrapolated to 257)
#   bash benchmarks/gpu_tables.sh s1-n1     # S1 on 1 GPU, 72 latent frames, + one-block and diffusers baselines
#   bash benchmarks/gpu_tables.sh baseline  # one GPU, full-sequence sampling, 72 latent frames
#   bash benchmarks/gpu_tables.sh decode    # Block Decode, 257 latent frames at 832x480, 1 and 2 GPUs
#   bash benchmarks/gpu_tables.sh 14b       # Wan2.1-14B shapes on 2 GPUs, bf16 and fp8 weights
#   bash benchmarks/gpu_tables.sh 14b-1gpu  # Wan2.1-14B shapes on 1 GPU
#   bash benchmarks/gpu_tables.sh fp8       # Wan2.1-14B fp8 and Wan2.2 A14B (two experts, fp8, cfg_low 1), 2 GPUs
#   bash benchmarks/gpu_tables.sh fit24     # which Wan2.2 A14B settings fit two 24 GB cards (memory cap)
#   bash benchmarks/gpu_tables.sh parity    # 1 vs 2 GPUs: compiled or not, twice, one block-step in flight
#   bash benchmarks/gpu_tables.sh tests     # the gpu / multi_gpu pytest tier (tests/test_gpu.py; needs pytest)
#   bash benchmarks/gpu_tables.sh n1-speed  # one GPU: block-step profile (before/after in .old/ if present), S1
#                                           # with fa3 and fa3_fp8 and the fp8 error on the final latents
#   bash benchmarks/gpu_tables.sh n1-extra  # n1-speed's references: the block-step before (.old/), diffusers' S1
#   bash benchmarks/gpu_tables.sh n1-length # one GPU: S1's block-step at 257 latent frames (1,025 video frames)
#   bash benchmarks/gpu_tables.sh bench-s1  # python -m dualparal_core bench: S1 on GPU 0 + full-sequence baselines
#   bash benchmarks/gpu_tables.sh bench-len # the same bench, 72 and 257 latent frames (1,025 video frames), ours only
#   bash benchmarks/gpu_tables.sh bench-fp8 # the same bench, S1 with fa3 and fa3_fp8, the fp8 latents' error
#   bash benchmarks/gpu_tables.sh n1-table  # one GPU, the bench: S1 with fa3, fa3_fp8, fa3_fp8 + fp8 GEMMs, and
#                                           # full-sequence diffusers SDPA and FA3 (issue 15)
#   bash benchmarks/gpu_tables.sh n1-i2v    # one GPU: prompt timeline vs one prompt (1.3B, issue 18), then Wan2.1
#                                           # T2V 14B and I2V 14B shapes, 32 latent frames x 4 steps, extrapolated
#                                           # to 257 latent frames x 10 steps (issue 17); WITH_PROF=1: then
#                                           # n1-table's block-step profile
#   bash benchmarks/gpu_tables.sh n1-len    # one GPU: the bench at 72 and 257 latent frames (issue 15's length
#                                           # goal), after the block-step before the kernel changes (.old/)
#   bash benchmarks/gpu_tables.sh n1-kern   # one GPU: the block-step with the Triton kernels, beside Inductor's
#                                           # rope, fa3_fp8, the offloaded and fp8 caches (sync check, traces),
#                                           # the block-step before (.old/), and the GPU tests of this work
#   bash benchmarks/gpu_tables.sh n1-kv     # one GPU, the bench: S1 with fa3, fa3_fp8, and fa3 with the
#                                           # offloaded and the fp8 context cache (time, peak, latent error)
#   bash benchmarks/gpu_tables.sh n1-short  # the two above in one 10-minute window: the GPU tests of the kernels
#                                           # and the cache, the block-step (fa3, Inductor's rope, offload; .old/),
#                                           # S1 with fa3 and with the offloaded cache
#   bash benchmarks/gpu_tables.sh n1-verify # the whole one-GPU test tier (pool, kernels, caches, fp8 GEMMs), then
#                                           # S1 with fa3 beside the fp8 context cache (its time, peak, error)
#
# Every DualParal row runs through the product's WorkerPool (benchmarks/shipped.py): QKV always fused, the chains
# compiled unless --no-compile. Rows measured before 2026-12-06 used the benchmark's own launcher (README).
# 14B steps measure one length and extrapolate from the steady-state block-step ticks (bench_s1.py --extrapolate).
# Wheels carried in .whl/ (diffusers for --diffusers-baseline, pytest for `tests`) are installed first.
# Each group ends within 10 minutes (the limits below); run them as separate commands on a lent machine.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
DIFFUSERS=$("$PY" -c 'import diffusers' 2>/dev/null && echo --diffusers-baseline)

step() {  # name limit_s command...: full log in $OUT/name.log, a line per step in $OUT/steps.txt
    local name=$1 limit=$2 start
    shift 2
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $(( $(date +%s) - start )) s: $*" | tee -a "$OUT/steps.txt"
}

S1="$PY benchmarks/bench_s1.py --compile"
B="$PY -m dualparal_core bench --model 1.3b --devices 0 --steps 10 --attention auto"
FA=$("$PY" -c 'import fa3_fwd_interface' 2>/dev/null && echo fa3)
case "${1:-}" in
s1) step s1 480 $S1 --world 2 1 --frames 40 72 --extrapolate 257 --verify --timeout 460 --json "$OUT/s1.json" ;;
s1-n1) step s1n1 560 $S1 --world 1 --frames 72 --baseline $DIFFUSERS --timeout 540 --json "$OUT/s1n1.json" ;;
baseline) step base 300 $S1 --world --baseline --frames 72 --timeout 280 --json "$OUT/base.json" ;;
bench-s1) step bench_s1 590 $B --frames 72 --baseline-attention sdpa $FA --baseline-steps 3 --timeout 280 \
    --json "$OUT/bench_s1.json" ;;
bench-len) step bench_len 590 $B --frames 72 257 --no-baseline --timeout 420 --json "$OUT/bench_len.json" ;;
bench-fp8) step bench_fp8 590 $B --frames 72 --attention fa3 fa3_fp8 --no-baseline --timeout 250 \
    --json "$OUT/bench_fp8.json" ;;
tests) step gputests 560 "$PY" -m pytest -q -p no:cacheprovider -m "gpu or multi_gpu" tests/test_gpu.py ;;
decode) step decode 300 "$PY" benchmarks/bench_decode.py --devices 0,1 --json "$OUT/decode.json" ;;
14b)
    step b14 200 $S1 --model 14b --world 2 --frames 24 --extrapolate 72 257 --timeout 190 --json "$OUT/b14.json"
    step f14 230 $S1 --model 14b --weights fp8 --world 2 --frames 24 --extrapolate 72 257 --timeout 220 \
        --json "$OUT/f14.json" ;;
fp8)
    step f14 230 $S1 --model 14b --weights fp8 --world 2 --frames 24 --extrapolate 72 257 --timeout 220 \
        --json "$OUT/f14.json"
    step a14 250 $S1 --model 14b --experts 2 --weights fp8 --cfg-low 1 --world 2 --frames 24 --extrapolate 72 \
        --timeout 240 --json "$OUT/a14.json" ;;
fit24) step fit24 560 "$PY" benchmarks/fit_24gb.py --timeout 240 --json "$OUT/fit24.json" ;;
14b-1gpu) step n1_14 330 $S1 --model 14b --world 1 --frames 24 --extrapolate 72 257 --timeout 320 \
    --json "$OUT/n1_14.json" ;;
parity)  # which of compilation and pipelining changes the latents (verify job: 24 frames, 3 steps)
    B="$PY benchmarks/bench_s1.py --frames 8 --steps 2 --verify --timeout 80"
    step p_plain 90 $B --world 1 2 --no-compile --save-verify "$OUT/parity/plain"
    step p_fc_a 90 $B --world 1 2 --compile --save-verify "$OUT/parity/fc_a"
    step p_fc_b 90 $B --world 1 2 --compile --save-verify "$OUT/parity/fc_b"
    step p_fc_inflight1 90 $B --world 2 --compile --in-flight 1 --save-verify "$OUT/parity/fc_if1"
    "$PY" - "$OUT/parity" <<'PY' | tee "$OUT/parity.txt"
import itertools, pathlib, sys
import numpy as np
runs = {f"{p.parent.name}/{p.stem}": np.load(p) for p in sorted(pathlib.Path(sys.argv[1]).glob("*/*.npy"))}
for a, b in itertools.combinations(runs, 2):
    x, y = runs[a], runs[b]
    print(f"{a} vs {b}: max |diff| {np.abs(x - y).max():.3g}, relative L2 {np.linalg.norm(x - y) / np.linalg.norm(y):.3g}")
PY
    ;;
n1-speed)
    step prof 130 "$PY" benchmarks/profile_step.py --backends fa3 fa3_fp8 --json "$OUT/prof.json"
    for att in ${ATTS:-fa3 fa3_fp8}; do
        step "s1_$att" 150 $S1 --world 1 --frames 72 --attention $att --timeout 140 --save-latents "$OUT/lat" \
            --json "$OUT/s1_$att.json"
    done
    [ -f "$OUT/lat/fa3_fp8_N1_T72.npy" ] && "$PY" -c "import numpy as n,sys; a,b=(n.load(f'$OUT/lat/{x}_N1_T72.npy') for x in ('fa3_fp8','fa3'));
print(f'final latents fa3_fp8 vs fa3: relative L2 {n.linalg.norm(a-b)/n.linalg.norm(b):.3g}')" | tee -a "$OUT/steps.txt"
    for f in "$OUT"/prof*.log "$OUT"/s1_*.log; do tail -4 "$f"; done ;;
n1-extra)  # the same-run references of n1-speed: the block-step before the kernel changes of 2026-12-06, diffusers'
    # sampling. Make the "before" tree first, on the host, and carry it (".old" is git-ignored locally):
    #   mkdir -p .old/benchmarks && git archive beb86a3 dualparal_core | tar -x -C .old \
    #     && cp benchmarks/profile_step.py .old/benchmarks/
    [ -d .old ] && (cd .old && step prof_old 100 "$PY" benchmarks/profile_step.py --backends fa3 --json "$OUT/prof_old.json")
    step diff 150 $S1 --world --diffusers-baseline --frames 72 --timeout 140 --json "$OUT/diff.json"
    for f in "$OUT"/prof_old.log "$OUT"/diff.log; do tail -4 "$f"; done ;;
n1-table)  # the block-step profile is n1-i2v's WITH_PROF step
    step bench_s1 570 $B --frames 72 --attention ${FA:-sdpa} ${FA:+fa3_fp8 fa3_fp8} --matmul bf16 ${FA:+bf16 fp8} \
        --baseline-attention sdpa $FA --baseline-steps 3 --timeout 170 --json "$OUT/bench_s1.json"
    tail -24 "$OUT/bench_s1.log" ;;
n1-i2v)
    step timeline 140 "$PY" benchmarks/timeline_cost.py --attention ${FA:-sdpa} --json "$OUT/timeline.json"
    for v in t2v i2v; do
        step "${v}14" 210 $S1 --model 14b --world 1 --frames 32 --steps 4 --attention ${FA:-sdpa} \
            --extrapolate 257 --extrapolate-steps 10 --timeout 200 --json "$OUT/${v}14.json" $([ $v = i2v ] && echo --i2v)
    done
    [ -n "${WITH_PROF:-}" ] && step prof 170 "$PY" benchmarks/profile_step.py --backends fa3 fa3_fp8 --matmul fp8 \
        --json "$OUT/prof.json"
    tail -3 "$OUT/timeline.log"; for v in t2v i2v; do tail -6 "$OUT/${v}14.log"; done; tail -5 "$OUT/prof.log" ;;
n1-len)
    [ -d .old ] && (cd .old && step prof_old 100 "$PY" benchmarks/profile_step.py --backends fa3 --json "$OUT/prof_old.json")
    step bench_len 480 $B --frames 72 257 --attention ${FA:-sdpa} --no-baseline --timeout 420 --json "$OUT/bench_len.json"
    tail -5 "$OUT/prof_old.log"; tail -12 "$OUT/bench_len.log" ;;
n1-kern)
    step prof 240 "$PY" benchmarks/profile_step.py --backends fa3 fa3_fp8 --kv-cache offload fp8 --inductor-rope \
        --sync-debug --trace "$OUT/trace" --json "$OUT/prof.json"
    [ -d .old ] && (cd .old && step prof_old 100 "$PY" benchmarks/profile_step.py --backends fa3 --json "$OUT/prof_old.json")
    gzip -f "$OUT"/trace/*.json 2>/dev/null
    step gputests 200 "$PY" -m pytest -q -p no:cacheprovider -m "gpu or multi_gpu" tests/test_kvcache.py \
        tests/test_kernels.py tests/test_gpu.py
    grep -v "^\[DualParal\]\|Warning\|_warn_once\|^ *gap" "$OUT/prof.log" | tail -30; grep "gap" "$OUT/prof.log" | head -14
    tail -2 "$OUT/prof_old.log"; tail -15 "$OUT/gputests.log" ;;
n1-kv)
    step bench_kv 540 $B --frames 72 --attention ${FA:-sdpa} ${FA:+fa3_fp8} --kv-cache offload fp8 --no-baseline \
        --timeout 150 --json "$OUT/bench_kv.json"
    grep -v "^\[DualParal\]" "$OUT/bench_kv.log" | tail -12 ;;
n1-short)
    step gputests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py tests/test_kvcache.py
    tail -4 "$OUT/gputests.log"
    step prof 150 "$PY" benchmarks/profile_step.py --backends fa3 --kv-cache offload --inductor-rope --sync-debug \
        --trace "$OUT/trace" --json "$OUT/prof.json"
    grep -v "^\[DualParal\]\|Warning\|_warn_once" "$OUT/prof.log" | tail -24
    [ -d .old ] && (cd .old && step prof_old 80 "$PY" benchmarks/profile_step.py --backends fa3 --json "$OUT/prof_old.json")
    tail -1 "$OUT/prof_old.log"; gzip -f "$OUT"/trace/*.json 2>/dev/null
    step bench_kv 320 $B --frames 72 --attention ${FA:-sdpa} --kv-cache offload --no-baseline --timeout 150 \
        --json "$OUT/bench_kv.json"
    grep -v "^\[DualParal\]" "$OUT/bench_kv.log" | tail -8 ;;
n1-verify)
    step gputests 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_kernels.py \
        tests/test_kvcache.py tests/test_fp8_gemm.py
    tail -6 "$OUT/gputests.log"
    step bench_kv8 270 $B --frames 72 --attention ${FA:-sdpa} --kv-cache fp8 --no-baseline --timeout 130 \
        --json "$OUT/bench_kv8.json"
    grep -v "^\[DualParal\]" "$OUT/bench_kv8.log" | tail -6 ;;
n1-length)
    step len 560 $S1 --world 1 --frames 257 --attention fa3 --timeout 540 --json "$OUT/len.json" ;;
*) sed -n '2,/^set -u/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
