"""An image's layers, uncompressed, from buildah's local storage (vfs driver).

    python3 deploy/image/layers.py IMAGE [--markdown]

For each layer: its uncompressed size (the "diff-size" containers/storage recorded when it
unpacked or committed the layer: the bytes of that layer's tar, as `docker history` shows)
and the step that made it (the image history's created_by). Empty steps (ENV, ARG, ...) are
left out. The total is the image's uncompressed size. Needs root (reads the storage).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path


def buildah(*args: str) -> str:
    return subprocess.run(
        ["buildah", "--storage-driver", "vfs", *args], capture_output=True, text=True, check=True
    ).stdout


def layers(image: str) -> list[tuple[int, str]]:
    info = json.loads(buildah("inspect", "--type", "image", image))
    oci = info["OCIv1"]
    diff_ids = oci["rootfs"]["diff_ids"]
    steps = [h.get("created_by", "") for h in oci.get("history", []) if not h.get("empty_layer")]
    if len(steps) != len(diff_ids):  # no usable history: number the layers instead
        steps = [f"layer {i + 1}" for i in range(len(diff_ids))]
    root = Path(json.loads(buildah("info"))["store"]["GraphRoot"])
    sizes = {}
    for entry in json.loads((root / "vfs-layers" / "layers.json").read_text()):
        if "diff-digest" in entry:
            sizes[entry["diff-digest"]] = entry.get("diff-size", 0)
    return [(sizes.get(d, 0), step) for d, step in zip(diff_ids, steps, strict=True)]


def describe(step: str) -> str:
    words = step.replace("/bin/sh -c ", "").replace("#(nop) ", "").split()
    if words and re.fullmatch(r"\|\d+", words[0]):  # buildah's "|N ARG=value x N" prefix of a RUN
        words = words[1 + int(words[0][1:]) :]
    step = " ".join(words)
    return step if len(step) <= 110 else step[:107] + "..."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image")
    p.add_argument("--markdown", action="store_true", help="a Markdown table instead of aligned text")
    a = p.parse_args(argv)
    rows = layers(a.image)
    total = sum(size for size, _ in rows)
    if a.markdown:
        print("| # | size (MB) | step |\n|---:|---:|---|")
        for i, (size, step) in enumerate(rows, 1):
            cell = describe(step).replace("|", "\\|")
            print(f"| {i} | {size / 1e6:.1f} | `{cell}` |")
        print(f"| | **{total / 1e6:.1f}** | total, uncompressed ({len(rows)} layers) |")
    else:
        for i, (size, step) in enumerate(rows, 1):
            print(f"layer {i:>2}: {size / 1e6:8.1f} MB  {describe(step)}")
        print(f"layers total: {total / 1e6:.1f} MB uncompressed ({len(rows)} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
