# Sourced by run.sh and side_by_side.sh: settings, helpers and the one bundle build both use.
# WORK (default /tmp/v3-1.6b) holds checkpoint, stage cache and bundle; SHAPE (default v3-1.6b)
# picks the shape. Files meant for the repo (logs, reports) go to $out: this folder for the
# v3-1.6b run, $WORK/out for a trial on another shape, so a trial never overwrites the committed run.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${WORK:-/tmp/v3-1.6b}
shape=${SHAPE:-v3-1.6b}
out="$here"; [ "$shape" = v3-1.6b ] || out="$work/out"
mkdir -p "$work" "$out"
# what the host's Python lacks (onnxsim, tomli-w) ships in the carried llama.cpp pack
site="$work/site"
if [ -d "$root/benchmarks/.llama/pack/wheels" ] && [ ! -d "$site" ]; then
    python3 -m pip install -q --no-index --no-deps --target "$site" "$root"/benchmarks/.llama/pack/wheels/*.whl
fi
export PYTHONPATH="$root:$site" EDGEKIT_CACHE="$work/cache" PYTHONUNBUFFERED=1
ek() { python3 -m edgekit.cli "$@"; }
step() { echo "[$(date +%H:%M:%S)] $*"; }

# synth SHAPE into WORK/ckpt and compress it for this folder's recipe (streamed, the GPU for the torch
# stages) into WORK/bundle, each unless already there; the log is $out/compress_stream.log
build_bundle() {
    [ -f "$work/ckpt/config.json" ] || { step synth; ek synth "$shape" -o "$work/ckpt" || exit 2; }
    [ -f "$work/bundle/manifest.json" ] && return 0
    step "compress --stream (recipe: $here/recipe.toml)"
    local t0 rc
    t0=$(date +%s)
    ek compress "$work/ckpt" --target "$here/recipe.toml" --stream --device auto -o "$work/bundle" --force \
        > "$out/compress_stream.log" 2>&1
    rc=$?
    step "compress exit $rc in $(( $(date +%s) - t0 )) s"
    [ "$rc" -le 1 ] || { tail -20 "$out/compress_stream.log"; exit "$rc"; }
}
