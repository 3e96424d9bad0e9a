#!/usr/bin/env bash
# Side by side at seed scale on the 16-core host: the v3-1.6b cpu4 bundle (this folder's recipe,
# streamed compress with the GPU for the torch stages) against onnxruntime quantize_dynamic and
# llama.cpp Q8_0 of the same pruned checkpoint, same threads, one process tree
# (benchmarks/run.py). llama.cpp is built from benchmarks/.llama/pack (carried; see
# `python -m benchmarks.llamacpp pack --wheels`), whose wheels/ also holds what the host's Python
# lacks (onnxsim, tomli-w). Writes compress_stream.log here, benchmarks/results/run_16c_t$T_v3-1.6b.*
# (the table) and profile_v3-1.6b_16c_t$T.* (onnxruntime's profiler on the bundle, benchmarks/scale_speed.py).
# Usage: bash device_runs/v3-1.6b-cpu4-16c/side_by_side.sh   (WORK=/path, THREADS=4 by default;
# SHAPE=v3-nano RESULT=/tmp/x PROFILE_OUT=/tmp/y MACHINE="..." tries it on a small shape (llama.cpp refuses
# pruned v3-nano: 4 experts in 4 groups fail its n_expert_groups < n_expert check); VARIANTS=llama-q8_0,edgekit-cpu4
# and PROFILE=0 make it shorter)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${WORK:-/tmp/v3-1.6b}
threads=${THREADS:-4}
shape=${SHAPE:-v3-1.6b}
mkdir -p "$work"
# the committed log is the v3-1.6b run's; a trial on another shape logs into WORK
log="$here/compress_stream.log"; [ "$shape" = v3-1.6b ] || log="$work/compress_stream.log"
site="$work/site"
if [ -d "$root/benchmarks/.llama/pack/wheels" ] && [ ! -d "$site" ]; then
    python3 -m pip install -q --no-index --no-deps --target "$site" "$root"/benchmarks/.llama/pack/wheels/*.whl
fi
export PYTHONPATH="$root:$site" EDGEKIT_CACHE="$work/cache" PYTHONUNBUFFERED=1
ek() { python3 -m edgekit.cli "$@"; }
step() { echo "[$(date +%H:%M:%S)] $*"; }

step "host: $(nproc) cores; $(python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__)')"
step "llama.cpp build"
python3 -m benchmarks.llamacpp build > "$work/llama_build.log" 2>&1 || { tail -20 "$work/llama_build.log"; exit 2; }
[ -f "$work/ckpt/config.json" ] || { step synth; ek synth "$shape" -o "$work/ckpt" || exit 2; }
if [ ! -f "$work/bundle/manifest.json" ]; then
    step "compress --stream (recipe: $here/recipe.toml)"
    t0=$(date +%s)
    ek compress "$work/ckpt" --target "$here/recipe.toml" --stream --device auto -o "$work/bundle" --force \
        > "$log" 2>&1
    rc=$?
    step "compress exit $rc in $(( $(date +%s) - t0 )) s"
    [ "$rc" -le 1 ] || { tail -20 "$log"; exit "$rc"; }
fi
pruned=$(ls -d "$work"/cache/prune/*/ | head -1)
ln -sfn "$pruned" "$work/$shape-pruned"
step "side by side, $threads threads (pruned checkpoint: $pruned)"
python3 benchmarks/run.py --checkpoint "$work/$shape-pruned" --bundle "$work/bundle" \
    --variants "${VARIANTS:-ort-dynamic-int8,llama-q8_0,edgekit-cpu4}" --threads "$threads" --work "$work/bench" \
    --machine "${MACHINE:-16-core Xeon host (H200 beside it)}" \
    --note "$shape compressed for cpu4 (half the routed experts removed); every row runs that pruned checkpoint" \
    --out "${RESULT:-benchmarks/results/run_16c_t${threads}_v3-1.6b}"
[ "${PROFILE:-1}" = 0 ] && { step done; exit 0; }
step "profile of the bundle (and onnxruntime's dynamic block sizing beside the default)"
python3 benchmarks/scale_speed.py --dir "$work/bundle" --threads "$threads" --runs 10 --decode-tokens 16 --profile \
    --session-config "session.dynamic_block_base=4" --work "$work/scale" \
    --out "${PROFILE_OUT:-benchmarks/results/profile_v3-1.6b_16c_t${threads}}"
step done
