#!/usr/bin/env bash
# v3-mini compressed for cpu4-moe (export_recipes/cpu4-moe.toml: 9/16 routed experts pruned, 4-bit QAT
# distillation on the python domain's whole training text, 4-bit experts (per row) + lm_head) on the H200
# host: torch stages on the GPU, onnxruntime on its CPU.
# Writes, in this folder: compress.log, report.json (the build-time report: gates on the whole
# python/eval split, out-of-domain drops, stage timings) and recipe.toml (the recipe as run).
#
# Knobs (environment):
#   EXPERTS=<recipe's>    fraction of routed experts removed per MoE layer
#   STEPS=3500 BATCH=16   distillation steps / windows per step (~0.12 s/step at batch 16 on one H200)
#   WORK=/tmp/v3-mini-moe scratch (bundle, stage cache)
#   DEVICE=cuda           where the torch stages run; OUTDIR=this folder: where the files above go
# The recipe's [export] simplify is turned off when this Python has no onnxsim (then said in the log).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${WORK:-/tmp/v3-mini-moe}
out=${OUTDIR:-$here}
steps=${STEPS:-3500}
batch=${BATCH:-16}
experts=${EXPERTS:-$(sed -n 's/^experts = \([0-9.]*\).*/\1/p' "$root/export_recipes/cpu4-moe.toml")}
mkdir -p "$work" "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" EDGEKIT_CACHE="$work/cache" PYTHONUNBUFFERED=1
step() { echo "[$(date +%H:%M:%S)] $*"; }

recipe="$out/recipe.toml"
sed -e "s/^experts = [0-9.]*/experts = $experts/" -e "s/^recover_steps = [0-9]*/recover_steps = $steps/" -e "s/^recover_batch_size = [0-9]*/recover_batch_size = $batch/" \
    "$root/export_recipes/cpu4-moe.toml" > "$recipe"
if ! python3 -c "import onnxsim" 2>/dev/null; then
    step "no onnxsim here: [export] simplify = false"
    sed -i 's/^moe = "contrib"$/moe = "contrib"\nsimplify = false/' "$recipe"
fi

step "compress (experts pruned $experts, steps $steps, batch $batch)"
t0=$(date +%s)
python3 -m edgekit.cli compress v3-mini --target "$recipe" --device "${DEVICE:-cuda}" -o "$work/bundle" --force \
    2>&1 | grep -v "step/s\|s/step\|it/s\]\|s/it\]\|batch/s\]" > "$out/compress.log"
rc=${PIPESTATUS[0]}
step "compress exit $rc in $(( $(date +%s) - t0 )) s"
tail -14 "$out/compress.log"
[ -f "$work/bundle/report.json" ] && cp "$work/bundle/report.json" "$out/report.json"
exit "$rc"
