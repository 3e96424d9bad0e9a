#!/usr/bin/env bash
# arm64 device validation run of the mobile-arm64 bundle on an x86-64 Debian host, under emulation:
# an arm64 Debian userland (mmdebstrap) run through qemu-user-static (binfmt), the aarch64
# onnxruntime wheel inside it, no torch. Runs there:
#   python -m pytest runtime_tests --bundle B -v      -> runtime_tests.txt
#   edgekit validate B --report-dir ...               -> validate.txt, report.json, report.html
#   python device_runs/arm64-qemu/validate_torchfree.py B R -> validate_torchfree.txt, report.json, report.html
#     (edgekit's validate() with the tokenizer loaded by `tokenizers`: `edgekit validate` imports torch here)
# Correctness gates are real (greedy tokens vs reference.json, hashes, .ort vs .onnx logits, accuracy
# on the recipe's slice of the eval split); latency is recorded but `unverified` (emulated host).
#
# Usage (root, from anywhere):  device_runs/arm64-qemu/run.sh [BUNDLE]
#   BUNDLE defaults to edgekit-out/v3-nano-mobile-arm64 and is built first when missing with
#   `python -m edgekit.cli compress --target device_runs/arm64-qemu/recipe.toml` ($PYTHON, default python3,
#   needs edgekit's host dependencies).
# Idempotent: the rootfs, the downloaded wheels and the arm64 venv are cached in $EDGEKIT_ARM64_CACHE
# (default ~/.cache/edgekit-arm64-qemu, outside the repo) and reused; outputs are rewritten.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${EDGEKIT_ARM64_CACHE:-$HOME/.cache/edgekit-arm64-qemu}
PYTHON=${PYTHON:-python3}
BUNDLE=$(realpath -m "${1:-$ROOT/edgekit-out/v3-nano-mobile-arm64}")
SUITE=bookworm
# the torch-free device side (pyproject's ranges, pinned to what the host build used)
WHEELS="onnxruntime==1.32.0 numpy==2.4.6 tokenizers==0.23.3 click==8.5.1 rich==15.0.0 pytest==9.2.0
        safetensors==0.8.0 tqdm==4.70.1 matplotlib==3.11.2 tomli-w==1.2.0 setuptools==80.9.0 wheel==0.45.1"
RFS=$CACHE/rootfs
say() { printf '\n== %s\n' "$*"; }

[ "$(uname -m)" = x86_64 ] || { echo "run.sh: this script emulates arm64 on x86-64; on an arm64 machine run the two commands above directly" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run.sh: needs root (binfmt, chroot, mounts)" >&2; exit 2; }
mkdir -p "$CACHE"

say "host tools (Debian packages: qemu-user-static binfmt-support mmdebstrap)"
if ! command -v qemu-aarch64-static >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v update-binfmts >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support mmdebstrap >/dev/null
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64

say "arm64 $SUITE rootfs in $RFS"
if [ ! -f "$RFS/.complete" ]; then
  rm -rf "$RFS.tmp"
  mmdebstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$RFS.tmp" \
    http://deb.debian.org/debian
  rm -rf "$RFS" && mv "$RFS.tmp" "$RFS" && touch "$RFS/.complete"
fi

say "aarch64 wheels in $CACHE/wheels"
if [ ! -f "$CACHE/wheels/.complete" ]; then
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
    -d "$CACHE/wheels" $WHEELS
  touch "$CACHE/wheels/.complete"
fi

MOUNTS=()
cleanup() { for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount -l "${MOUNTS[i]}" 2>/dev/null || true; done; }
trap cleanup EXIT
bind() { mkdir -p "$2"; mount --bind "$1" "$2"; MOUNTS+=("$2"); }
mount -t proc proc "$RFS/proc"; MOUNTS+=("$RFS/proc")
bind /dev "$RFS/dev"
# no /sys: with the host's /sys/devices/system/cpu visible, onnxruntime's cpuinfo segfaults under qemu-user
# (seen with 1.32.0); without it onnxruntime warns that cpuinfo failed and runs
bind "$CACHE/wheels" "$RFS/opt/wheels"
arm() { chroot "$RFS" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/venv/bin:/usr/bin:/bin "$@"; }

say "arm64 venv (/opt/venv) from the downloaded wheels"
if [ ! -f "$RFS/opt/venv/.complete" ]; then
  rm -rf "$RFS/opt/venv"
  arm python3 -m venv /opt/venv
  # shellcheck disable=SC2086
  arm pip install -q --no-index --find-links /opt/wheels $WHEELS
  touch "$RFS/opt/venv/.complete"
fi

if [ ! -f "$BUNDLE/manifest.json" ]; then
  say "building the bundle on the host: $BUNDLE"
  (cd "$ROOT" && "$PYTHON" -m edgekit.cli compress --target device_runs/arm64-qemu/recipe.toml -o "$BUNDLE") || [ $? = 1 ]
fi

say "repo (tracked files) and bundle into the rootfs"
rm -rf "$RFS/work" && mkdir -p "$RFS/work/edgekit" "$RFS/work/bundle"
(cd "$ROOT" && git ls-files -z | xargs -0 cp --parents -t "$RFS/work/edgekit")
cp -r "$BUNDLE"/. "$RFS/work/bundle/"
rm -rf "$RFS/work/bundle/device-report"
# edgekit itself without its dependencies (torch is not installed here): what does the device side import?
# (editable: a regular install copies the 66 MB of package data, ~10 min under emulation)
arm pip install -q --no-index --no-deps --no-build-isolation -e /work/edgekit

say "environment"
arm /bin/sh -c 'uname -m; python -c "import platform, onnxruntime, numpy; print(platform.machine(), platform.python_version(), \"onnxruntime\", onnxruntime.__version__, onnxruntime.get_device(), \"numpy\", numpy.__version__)"; python -c "import torch" 2>&1 | tail -1' \
  | tee "$HERE/env.txt"

say "runtime_tests on arm64 (emulated)"
set +e
arm /bin/sh -c 'cd /work/edgekit && python -m pytest runtime_tests --bundle /work/bundle -v -p no:cacheprovider' 2>&1 \
  | tee "$HERE/runtime_tests.txt"
rt=${PIPESTATUS[0]}

say "edgekit validate on arm64 (emulated)"
arm /bin/sh -c 'cd /tmp && edgekit validate /work/bundle --report-dir /work/report-cli' 2>&1 | tee "$HERE/validate.txt"
va=${PIPESTATUS[0]}

say "edgekit's validate() on arm64 (emulated), torch-free tokenizer: device_runs/arm64-qemu/validate_torchfree.py"
arm /bin/sh -c 'cd /work/edgekit && python device_runs/arm64-qemu/validate_torchfree.py /work/bundle /work/report' 2>&1 \
  | tee "$HERE/validate_torchfree.txt"
ac=${PIPESTATUS[0]}
set -e
for f in report.json report.html; do
  [ -f "$RFS/work/report/$f" ] && cp "$RFS/work/report/$f" "$HERE/$f"
done
say "runtime_tests exit $rt, edgekit validate exit $va (0 pass/unverified, 1 gate failed, 2 error), validate_torchfree exit $ac"
[ "$rt" = 0 ] && [ "$ac" != 2 ]
