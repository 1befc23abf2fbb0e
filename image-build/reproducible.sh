#!/bin/bash
# The reproducibility check: two builds of the same inputs, one after the other, each from its own
# fresh mmdebstrap run and wheel build, must give the same image, byte for byte.
#   image-build/reproducible.sh [OUTDIR]      (default build/image-repro; needs root)
# Prints both hashes and, if they differ, which partitions differ; exit 1 then.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$repo/build/image-repro}")
PY=${PY:-$repo/.venv/bin/python}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct)}
for n in 1 2; do
    start=$(date +%s)
    "$PY" "$repo/image-build/build.py" --out "$out/$n"
    echo "build $n: $(( $(date +%s) - start )) s"
done
"$PY" - "$out/1/manifest.json" "$out/2/manifest.json" <<'PYEOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
print(f"build 1: {a['sha256']}\nbuild 2: {b['sha256']}")
if a["sha256"] == b["sha256"] and a["compressed"]["sha256"] == b["compressed"]["sha256"]:
    print(f"reproducible: {a['bytes'] / 2**20:.0f} MiB image, {len(a['debian']['packages'])} Debian packages, "
          f"{len(a['python']['wheels'])} wheels")
    sys.exit(0)
for pa, pb in zip(a["partitions"], b["partitions"]):
    if pa["sha256"] != pb["sha256"]:
        print(f"partition {pa['number']} ({pa['name']}) differs")
if a["debian"]["packages"] != b["debian"]["packages"]:
    print("the Debian package lists differ (the archive changed between the builds?)")
sys.exit(1)
PYEOF
