#!/usr/bin/env bash
# Side by side at seed scale on the 16-core host: the v3-1.6b cpu4 bundle (this folder's recipe,
# streamed compress with the GPU for the torch stages) against onnxruntime quantize_dynamic and
# llama.cpp Q8_0 of the same pruned checkpoint, same threads, one process tree
# (benchmarks/run.py). llama.cpp is built from benchmarks/.llama/pack (carried; see
# `python -m benchmarks.llamacpp pack --wheels`), whose wheels/ also holds what the host's Python
# lacks (onnxsim, tomli-w; common.sh). Writes compress_stream.log here, benchmarks/results/run_16c_t$T_v3-1.6b.*
# (the table) and profile_v3-1.6b_16c_t$T.* (onnxruntime's profiler on the bundle, benchmarks/scale_speed.py).
# Usage: bash device_runs/v3-1.6b-cpu4-16c/side_by_side.sh   (WORK=/path, THREADS=4 by default;
# SHAPE=v3-nano MACHINE="..." tries it on a small shape, writing into WORK/out (llama.cpp refuses
# pruned v3-nano: 4 experts in 4 groups fail its n_expert_groups < n_expert check); VARIANTS=llama-q8_0,edgekit-cpu4
# and PROFILE=0 make it shorter; RESULT=prefix and PROFILE_OUT=prefix move the table and the profile;
# ROUNDS=3 measures every variant 3 times, interleaved (run.py --rounds), QUICK=1 with fewer repetitions)
set -uo pipefail
source "$(dirname "$0")/common.sh"
threads=${THREADS:-4}
results=benchmarks/results; [ "$shape" = v3-1.6b ] || results="$out"

step "host: $(nproc) cores; $(python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__)')"
step "llama.cpp build (beside the bundle build; done before compress's own latency check)"
python3 -m benchmarks.llamacpp build > "$work/llama_build.log" 2>&1 &
llama_pid=$!
trap 'kill "$llama_pid" 2>/dev/null' EXIT     # a failed bundle build does not leave the build running
build_bundle
wait "$llama_pid" || { tail -20 "$work/llama_build.log"; exit 2; }
pruned=$(ls -d "$work"/cache/prune/*/ | head -1)
ln -sfn "$pruned" "$work/$shape-pruned"
step "side by side, $threads threads (pruned checkpoint: $pruned)"
python3 benchmarks/run.py --checkpoint "$work/$shape-pruned" --bundle "$work/bundle" \
    --variants "${VARIANTS:-ort-dynamic-int8,llama-q8_0,edgekit-cpu4}" --threads "$threads" --work "$work/bench" \
    --rounds "${ROUNDS:-1}" $([ "${QUICK:-0}" = 1 ] && echo --quick) \
    --machine "${MACHINE:-16-core Xeon host (H200 beside it)}" \
    --note "$shape compressed for cpu4 (half the routed experts removed); every row runs that pruned checkpoint" \
    --out "${RESULT:-$results/run_16c_t${threads}_$shape}"
[ "${PROFILE:-1}" = 0 ] && { step done; exit 0; }
step "profile of the bundle"
python3 benchmarks/scale_speed.py --dir "$work/bundle" --threads "$threads" --runs 10 --decode-tokens 16 --profile \
    --work "$work/scale" \
    --out "${PROFILE_OUT:-$results/profile_${shape}_16c_t${threads}}"
step done
