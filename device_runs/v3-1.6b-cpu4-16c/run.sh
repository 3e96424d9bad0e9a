#!/usr/bin/env bash
# Seed-scale device run (the 16-core host beside the lent GPU): synthesize the 1.6B-parameter V3
# shape, compress it for cpu4 with this folder's recipe, validate the bundle at 4 threads (the
# target's) and 16, and run runtime_tests on it. Writes report.json/html here, t16/ for 16 threads,
# validate logs and runtime_tests.txt. A bundle already in WORK (side_by_side.sh builds the same)
# is reused, else it is built as there: streamed compress, the GPU for the torch stages
# (compress_stream.log). Usage: bash device_runs/v3-1.6b-cpu4-16c/run.sh
# (WORK=/path for the ~12 GB of checkpoint, cache and bundle; default /tmp/v3-1.6b; SHAPE=v3-nano
# tries the script on a small shape).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${WORK:-/tmp/v3-1.6b}
shape=${SHAPE:-v3-1.6b}
mkdir -p "$work"
export PYTHONPATH="$root:$work/site${PYTHONPATH:+:$PYTHONPATH}" EDGEKIT_CACHE="$work/cache" PYTHONUNBUFFERED=1
ek() { python3 -m edgekit.cli "$@"; }
step() { echo "[$(date +%H:%M:%S)] $*"; }

step "host: $(nproc) cores; $(python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__)')"
[ -f "$work/ckpt/config.json" ] || { step synth; ek synth "$shape" -o "$work/ckpt" || exit 2; }
ek info "$work/ckpt" | tail -3
if [ ! -f "$work/bundle/manifest.json" ]; then       # side_by_side.sh builds the same bundle
    step "compress --stream (recipe: $here/recipe.toml)"
    t0=$(date +%s)
    ek compress "$work/ckpt" --target "$here/recipe.toml" --stream --device auto -o "$work/bundle" --force \
        > "$here/compress_stream.log" 2>&1
    rc=$?
    step "compress exit $rc in $(( $(date +%s) - t0 )) s"
    [ "$rc" -le 1 ] || { tail -20 "$here/compress_stream.log"; exit "$rc"; }
fi
step "validate, 4 threads"
ek validate "$work/bundle" --target "$here/recipe.toml" --report-dir "$here" > "$here/validate_t4.txt" 2>&1; echo "exit $?" >> "$here/validate_t4.txt"
step "validate, 16 threads"
sed 's/^threads = 4$/threads = 16/' "$here/recipe.toml" > "$work/recipe16.toml"
ek validate "$work/bundle" --target "$work/recipe16.toml" --report-dir "$here/t16" > "$here/validate_t16.txt" 2>&1
echo "exit $?" >> "$here/validate_t16.txt"
step runtime_tests
python3 -m pytest -q -p no:cacheprovider "$root/runtime_tests" --bundle "$work/bundle" > "$here/runtime_tests.txt" 2>&1
step "done"
du -sh "$work/bundle" "$work/ckpt"
