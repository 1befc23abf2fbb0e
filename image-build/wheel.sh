#!/bin/bash
# The appliance's wheel, built from this checkout's files (tracked, and untracked that git does
# not ignore: what `git status` shows), in a clean copy so that nothing stale (build/, caches)
# gets in. setup.py prebuilds the kernels' host twin and GPU fatbins into it (needs g++ and nvcc).
# Reproducible: SOURCE_DATE_EPOCH (default: the last commit's time) fixes every timestamp in the
# zip, and the kernels are compiled from relative paths.
#   image-build/wheel.sh OUTDIR        -> OUTDIR/appliance-<version>-cp3XX-cp3XX-linux_<arch>.whl
set -euo pipefail
out=$(realpath -m "${1:?usage: wheel.sh OUTDIR}")
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$repo/.venv/bin/python}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct)}
src=$(mktemp -d /tmp/appliance-wheel-src.XXXXXX)
trap 'rm -rf "$src"' EXIT
# --ignore-failed-read: a tracked file deleted in the work tree is simply not there
(cd "$repo" && git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) \
    | tar -xf - -C "$src"
mkdir -p "$out"
# The build happens in a fixed folder name so the kernels' relative paths are all that varies: none.
(cd "$src" && APPLIANCE_KERNEL_CACHE="$src/.kernel-cache" \
    "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --no-cache-dir -w "$out" . 2>&1 \
    | grep -v -e 'would be ignored' || true)
ls "$out"/appliance-*.whl
