"""A site's copy of the appliance image: the same disk with this site's configuration on its data
partition (AE title, ports, the console and PACS destinations, routes), ready to flash.

    python image-build/site_image.py --config SITE.toml [--image build/image/appliance.img] --out SITE.img

The configuration is checked first (`appliance config check`); the data partition is rebuilt the
way `build.py` builds it (the configuration at /data/etc/appliance.toml, an empty spool owned by
the appliance's account), so the result is as reproducible as the image. The root slots and the
ESP are not touched: the site image takes the same updates as every other box.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import build  # noqa: E402


def check(config: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "appliance", "config", "check", str(config)],
                         capture_output=True, text=True, cwd=build.REPO)
    if res.returncode != 0:
        raise SystemExit(f"{config}: not a valid appliance configuration:\n{res.stdout}{res.stderr}")


def site_image(image: Path, config_text: str, out: Path) -> Path:
    manifest = json.loads((image.parent / "manifest.json").read_text())
    subprocess.run(["cp", "--sparse=always", str(image), str(out)], check=True)
    account = manifest["appliance_account"]
    start, size = build.manifest_layout(manifest)["data"]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = Path(tmp) / "data.img"
        build.data_partition(part, size, config_text, account["uid"], account["gid"], manifest["source_date_epoch"],
                             Path(tmp))
        build.place(part, out, start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--image", type=Path, default=build.REPO / "build" / "image" / "appliance.img")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    check(args.config)
    print(site_image(args.image.resolve(), args.config.read_text(), args.out.resolve()))


if __name__ == "__main__":
    main()
