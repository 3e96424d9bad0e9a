#!/usr/bin/env bash
# Seed-scale device run (the 16-core host beside the lent GPU): synthesize the 1.6B-parameter V3
# shape, compress it for cpu4 with this folder's recipe, validate the bundle at 4 threads (the
# target's) and 16, and run runtime_tests on it. Writes report.json/html here, t16/ for 16 threads,
# validate logs and runtime_tests.txt. The bundle is side_by_side.sh's (common.sh's build_bundle:
# reused when already in WORK; streamed compress, the GPU for the torch stages, compress_stream.log).
# Usage: bash device_runs/v3-1.6b-cpu4-16c/run.sh
# (WORK=/path for the ~12 GB of checkpoint, cache and bundle; default /tmp/v3-1.6b; SHAPE=v3-nano
# tries the script on a small shape, writing into WORK/out; common.sh).
set -uo pipefail
source "$(dirname "$0")/common.sh"

step "host: $(nproc) cores; $(python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__)')"
build_bundle
ek info "$work/ckpt" | tail -3
step "validate, 4 threads"
ek validate "$work/bundle" --target "$here/recipe.toml" --report-dir "$out" > "$out/validate_t4.txt" 2>&1
echo "exit $?" >> "$out/validate_t4.txt"
step "validate, 16 threads"
sed 's/^threads = 4$/threads = 16/' "$here/recipe.toml" > "$work/recipe16.toml"
ek validate "$work/bundle" --target "$work/recipe16.toml" --report-dir "$out/t16" > "$out/validate_t16.txt" 2>&1
echo "exit $?" >> "$out/validate_t16.txt"
sed -i "s#$root/##g" "$out/validate_t4.txt" "$out/validate_t16.txt"   # paths in the logs relative to the repo
step runtime_tests
python3 -m pytest -q -p no:cacheprovider "$root/runtime_tests" --bundle "$work/bundle" > "$out/runtime_tests.txt" 2>&1
step "done"
du -sh "$work/bundle" "$work/ckpt"
