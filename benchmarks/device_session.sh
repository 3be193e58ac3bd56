#!/usr/bin/env bash
# The one command for a lent GPU machine (issue 15, target 7), run from the repository root. In a session whose
# `status` says a machine is lent: `make device-wheels` here, then, once, the device tool's
#   run(command="bash benchmarks/device_session.sh", carry=[".whl"], timeout_s=600)
# It installs the carried wheels (this project's transformers and timm; the machine's image has other versions),
# runs benchmarks/device_check.py (the CUDA code paths on the tiny config, SAM's Triton attention at full-size shapes;
# at most 150 s), then the GPU suite, goal rows first (B bf16 batch 1 eager, the same with SAM's Triton attention
# chosen, H bf16 batch 8 eager, the same with the kernel, B bf16 batch 1 compiled: a compilation needs about 3
# minutes), for
# POSSAM_SUITE_BUDGET_S (default 220) seconds, then the later checks (POSSAM_GPU_LATE_CHECKS, default `compiled`:
# about 100 s of compilation, after the goal rows; added to device-check.json), then benchmarks/gpu_candidates.py
# (POSSAM_CANDIDATES=0 skips it) for at most 180 s, ending by about POSSAM_DEADLINE_S seconds after its start
# (default 480; a row started in time runs to its end, up to a minute more: within the 600 s limit; with the
# machine's start and the transfers about 11 of the session's 15 minutes, so plan one run, not two). Rows not started
# in time are reported as skipped. Every file lands in $OUT as it is written (at most 8 files come back):
# nvidia-smi.txt, device-check.json/.log, results-gpu.json, gpu.log, candidates.json/.log. POSSAM_GPU_CHECKS,
# POSSAM_GPU_LATE_CHECKS, POSSAM_GPU_VARIANTS, POSSAM_GPU_BUDGET_S (the suite's budget, whatever the steps before it
# took) and POSSAM_GPU_ARGS (default "--compile-mode reduce-overhead": the compiled rows with CUDA graphs, the best
# chance of the 60 images/s goal at batch 1; "" for inductor's default mode) narrow it.
# POSSAM_DEVICE=cpu PYTHON=.venv/bin/python POSSAM_GPU_VARIANTS=tiny runs the same steps on a CPU (the tests do).
# A setting it cannot use (a variant, a number of seconds, POSSAM_CANDIDATES other than 0 or 1) is refused before any
# step runs (exit status 2); otherwise the exit status is 1 when a step failed (candidates stopped at the deadline
# excepted), 0 when all passed. POSSAM_GPU_CHECKS or POSSAM_GPU_LATE_CHECKS set to nothing skips those checks.
set -uo pipefail
OUT=${OUT:-/tmp/possam-device}
PYTHON=${PYTHON:-python3}
DEVICE=${POSSAM_DEVICE:-cuda}
DEFAULT_CHECKS="versions outputs_match_cpu sam_attention_all_heads sam_attention_fused_kernel sam_attention_triton bf16 no_host_sync"
# unset: the default list; set to nothing: none
CHECKS=${POSSAM_GPU_CHECKS-"$DEFAULT_CHECKS training_step deformable_backward_triton"}
# after the suite's goal rows: the compiled check compiles the tiny model (about 100 s on an H200), time the goal rows
# need more
LATE_CHECKS=${POSSAM_GPU_LATE_CHECKS-compiled}
VARIANTS=${POSSAM_GPU_VARIANTS-vit-b vit-l vit-h}
# careless settings are refused here, before any device time is spent (a variant the suite refuses, or a deadline
# bash cannot count with, used to be found only after the device checks, and the session went on without its suite)
refuse() {
    echo "device_session.sh: $*" >&2
    exit 2
}
for NAME in POSSAM_DEADLINE_S POSSAM_SUITE_BUDGET_S POSSAM_GPU_BUDGET_S; do
    VALUE=${!NAME-}
    # at least 1, no leading zero (bash counts 0480 as octal), at most 7 digits
    if [ -n "$VALUE" ] && ! [[ $VALUE =~ ^[1-9][0-9]{0,6}$ ]]; then
        refuse "$NAME=$VALUE: give whole seconds, at least 1 (e.g. 480)"
    fi
done
# the lists split into words once (no file-name expansion), whatever blanks separate them
set -f
# shellcheck disable=SC2086
set -- $VARIANTS
[ $# -gt 0 ] || refuse "POSSAM_GPU_VARIANTS is empty: give some of tiny vit-b vit-l vit-h"
FIRST_VARIANT=$1
for VARIANT in "$@"; do
    case $VARIANT in
        tiny | vit-b | vit-l | vit-h) ;;
        *) refuse "POSSAM_GPU_VARIANTS: $VARIANT is not one of tiny vit-b vit-l vit-h" ;;
    esac
done
# shellcheck disable=SC2086
set -- $CHECKS
CHECKS="$*"
# shellcheck disable=SC2086
set -- $LATE_CHECKS
LATE_CHECKS="$*"
set +f
case ${POSSAM_CANDIDATES:-1} in
    0 | 1) ;;
    *) refuse "POSSAM_CANDIDATES=$POSSAM_CANDIDATES: 1 runs the candidates, 0 skips them" ;;
esac
# the session's exit status: 1 when a step failed (each step's files still come back)
STATUS=0
mkdir -p "$OUT"
WHEELS=${POSSAM_WHEELS:-.whl}
SITE=${POSSAM_SITE:-/tmp/site}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$SITE"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# settings that change the scripts' flags are checked by the scripts' own parsers before any step (a typo in
# POSSAM_GPU_ARGS would otherwise lose the suite, one in POSSAM_GPU_LATE_CHECKS the later checks); the default
# session skips this (a few seconds of imports)
if [ -n "${POSSAM_GPU_ARGS+set}${POSSAM_GPU_CHECKS+set}${POSSAM_GPU_LATE_CHECKS+set}${POSSAM_DEVICE+set}" ]; then
    # shellcheck disable=SC2086
    "$PYTHON" benchmarks/run.py --check-flags --suite gpu --device "$DEVICE" --time-budget-s 1 --variants $VARIANTS \
        ${POSSAM_GPU_ARGS---compile-mode reduce-overhead} --output "$OUT/results-gpu.json" \
        || refuse "the suite's flags (POSSAM_DEVICE, POSSAM_GPU_VARIANTS, POSSAM_GPU_ARGS) are refused, above"
    if [ -n "$CHECKS$LATE_CHECKS" ]; then  # both lists in one call: one interpreter start
        # shellcheck disable=SC2086
        "$PYTHON" benchmarks/device_check.py --check-flags --device "$DEVICE" --checks $CHECKS $LATE_CHECKS \
            --output "$OUT/device-check.json" \
            || refuse "the checks' flags (POSSAM_DEVICE, POSSAM_GPU_CHECKS, POSSAM_GPU_LATE_CHECKS) are refused, above"
    fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
if [ -n "$CHECKS" ]; then
    # shellcheck disable=SC2086  # the lists are meant to split into words
    timeout 150 "$PYTHON" benchmarks/device_check.py --device "$DEVICE" --output "$OUT/device-check.json" \
        --checks $CHECKS 2>&1 | tee "$OUT/device-check.log"
    [ "${PIPESTATUS[0]}" = 0 ] || STATUS=1
fi
# the suite: its goal rows first, within its budget (by default what the checks left of the first 370 s, at most
# POSSAM_SUITE_BUDGET_S, at least 1 s: the first row then still runs), leaving the candidates their share
LEFT=$(( ${POSSAM_DEADLINE_S:-480} - 110 - SECONDS ))
SUITE=${POSSAM_SUITE_BUDGET_S:-220}
BUDGET=${POSSAM_GPU_BUDGET_S:-$(( LEFT < SUITE ? LEFT : SUITE ))}
BUDGET=$(( BUDGET < 1 ? 1 : BUDGET ))
# shellcheck disable=SC2086
"$PYTHON" benchmarks/run.py --suite gpu --device "$DEVICE" --time-budget-s "$BUDGET" \
    --variants $VARIANTS ${POSSAM_GPU_ARGS---compile-mode reduce-overhead} --output "$OUT/results-gpu.json" 2>&1 \
    | tee "$OUT/gpu.log"
[ "${PIPESTATUS[0]}" = 0 ] || STATUS=1
# the later checks, added to device-check.json, within what is left before the deadline (at most 150 s)
LATE_S=$(( ${POSSAM_DEADLINE_S:-480} - 30 - SECONDS ))
LATE_S=$(( LATE_S > 150 ? 150 : LATE_S ))
if [ -n "$LATE_CHECKS" ] && [ "$LATE_S" -gt 20 ]; then
    # shellcheck disable=SC2086
    timeout "$LATE_S" "$PYTHON" benchmarks/device_check.py --device "$DEVICE" --output "$OUT/device-check.json" \
        --append --checks $LATE_CHECKS 2>&1 | tee -a "$OUT/device-check.log"
    LATE_STATUS=${PIPESTATUS[0]}
    if [ "$LATE_STATUS" = 124 ]; then
        echo "later checks ($LATE_CHECKS) stopped after ${LATE_S} s" | tee -a "$OUT/device-check.log"
    fi
    [ "$LATE_STATUS" = 0 ] || STATUS=1
elif [ -n "$LATE_CHECKS" ]; then
    echo "later checks ($LATE_CHECKS) skipped: ${LATE_S} s left before the deadline" | tee -a "$OUT/device-check.log"
fi
# candidate GPU paths side by side (benchmarks/gpu_candidates.py: deformable samplers, pixel counters, the transfer,
# the forward with each sampler and layout, by box, the post-processing by kept queries, SAM's attention; the
# first version took under a minute on an H200), on the first variant of the suite, until the deadline
CANDIDATES_S=$(( ${POSSAM_DEADLINE_S:-480} - SECONDS ))
CANDIDATES_S=$(( CANDIDATES_S > 180 ? 180 : CANDIDATES_S ))
if [ "${POSSAM_CANDIDATES:-1}" != 0 ] && [ "$CANDIDATES_S" -gt 20 ]; then
    timeout "$CANDIDATES_S" "$PYTHON" benchmarks/gpu_candidates.py --device "$DEVICE" --variant "$FIRST_VARIANT" \
        --output "$OUT/candidates.json" 2>&1 | tee "$OUT/candidates.log"
    CANDIDATES_STATUS=${PIPESTATUS[0]}
    # (stopped at the deadline is how the candidates end when they do not finish: what they wrote stands)
    [ "$CANDIDATES_STATUS" = 0 ] || [ "$CANDIDATES_STATUS" = 124 ] || STATUS=1
fi
exit "$STATUS"
