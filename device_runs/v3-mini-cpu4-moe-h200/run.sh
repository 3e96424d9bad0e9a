#!/usr/bin/env bash
# v3-mini compressed for cpu4-moe (export_recipes/cpu4-moe.toml: 7/16 routed experts pruned, 4-bit QAT
# distillation, 4-bit experts + lm_head) on the H200 host: torch stages on the GPU, onnxruntime on its CPU.
# Writes, in this folder: compress.log, report.json (the build-time report: gates on the whole
# python/eval split, out-of-domain drops, stage timings) and recipe.toml (the recipe as run).
#
# Knobs (environment):
#   STEPS=3500 BATCH=16   distillation steps / windows per step (~0.11 s/step at batch 16 on one H200)
#   RECOVER=shipped       python/recover (771k tokens, shipped); RECOVER=train: the python part of
#                         v3-mini's own training tokens (9.4M tokens, disjoint from eval/dev/calib), read
#                         from TOKENS=DIR holding train.u16 (or train.u16.gz) + train.json, as
#                         `python -m edgekit.nano.train --model v3-mini --prepare-only` writes them
#   WORK=/tmp/v3-mini-moe scratch (bundle, stage cache, decoded recovery text)
#   DEVICE=cuda           where the torch stages run; OUTDIR=this folder: where the files above go
# The recipe's [export] simplify is turned off when this Python has no onnxsim (then said in the log).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${WORK:-/tmp/v3-mini-moe}
out=${OUTDIR:-$here}
steps=${STEPS:-3500}
batch=${BATCH:-16}
mkdir -p "$work" "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" EDGEKIT_CACHE="$work/cache" PYTHONUNBUFFERED=1
step() { echo "[$(date +%H:%M:%S)] $*"; }

recipe="$out/recipe.toml"
sed -e "s/^recover_steps = [0-9]*/recover_steps = $steps/" -e "s/^recover_batch_size = [0-9]*/recover_batch_size = $batch/" \
    "$root/export_recipes/cpu4-moe.toml" > "$recipe"
if ! python3 -c "import onnxsim" 2>/dev/null; then
    step "no onnxsim here: [export] simplify = false"
    sed -i 's/^moe = "contrib"$/moe = "contrib"\nsimplify = false/' "$recipe"
fi

recover=()
if [ "${RECOVER:-shipped}" = train ]; then
    step "recovery text: the python part of v3-mini's training tokens in ${TOKENS:?set TOKENS=DIR}"
    python3 - "$TOKENS" "$work/python-train.txt" <<'PY' || exit 2
import gzip, json, sys
from pathlib import Path
import numpy as np
from edgekit.checkpoint import load_tokenizer, resolve
src, out = Path(sys.argv[1]), Path(sys.argv[2])
meta = json.loads((src / "train.json").read_text())
raw = gzip.decompress((src / "train.u16.gz").read_bytes()) if (src / "train.u16.gz").is_file() \
    else (src / "train.u16").read_bytes()
ids = np.frombuffer(raw, dtype=np.uint16)
if len(ids) != meta["tokens"]:
    sys.exit(f"error: {src} holds {len(ids)} tokens, train.json says {meta['tokens']}; re-run --prepare-only")
a, b = meta["spans"]["python"]
tok = load_tokenizer(resolve("v3-mini"))
chunk = 1 << 16
text = "".join(tok.decode(ids[i: min(i + chunk, b)].tolist()) for i in range(a, b, chunk))
out.write_text(text, encoding="utf-8")
print(f"{b - a:,} tokens -> {out} ({len(text) / 1e6:.1f} MB)")
PY
    recover=(--recover "$work/python-train.txt")
fi

step "compress (steps $steps, batch $batch, recovery ${RECOVER:-shipped})"
t0=$(date +%s)
python3 -m edgekit.cli compress v3-mini --target "$recipe" --device "${DEVICE:-cuda}" "${recover[@]}" -o "$work/bundle" --force \
    2>&1 | grep -v "step/s\|s/step\|it/s\]\|s/it\]\|batch/s\]" > "$out/compress.log"
rc=${PIPESTATUS[0]}
step "compress exit $rc in $(( $(date +%s) - t0 )) s"
tail -14 "$out/compress.log"
[ -f "$work/bundle/report.json" ] && cp "$work/bundle/report.json" "$out/report.json"
exit "$rc"
