"""Content fingerprints of an image folder: first hash against a resume over the unchanged folder.

`eval.fingerprint.items_digest` digests every image by its bytes; `ImageHashes` caches each file's
SHA-256 by (path, size, mtime) in SQLite, so a resumed run only stats the files and reads the
cache. This writes N files of S bytes (random, like compressed JPEGs), digests them twice through
`items_digest` with a fresh cache file, and prints seconds per 10k images for both passes.

    python benchmarks/image_hashes.py --images 10000 --size 160000 [--check 1.0]

`--check T` exits 1 when the resume takes T seconds or more per 10k images.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from lvlm_hallu.eval.fingerprint import ImageHashes, items_digest
from lvlm_hallu.eval.runner import Item


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--size", type=int, default=160_000, help="bytes per image (COCO val2014 averages ~160 kB)")
    ap.add_argument("--check", type=float, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="image-hashes-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i in range(args.images):
            (folder / f"{i:012d}.jpg").write_bytes(os.urandom(args.size))
        items = [Item(str(i), "Describe.", str(folder / f"{i:012d}.jpg")) for i in range(args.images)]
        cache = Path(tmp) / "cache.sqlite3"
        per10k = 10_000 / args.images
        t0 = time.perf_counter()
        first = items_digest(items, ImageHashes(cache))
        t1 = time.perf_counter()
        hashes = ImageHashes(cache)
        again = items_digest(items, hashes)
        t2 = time.perf_counter()
        assert first == again and hashes.hashed == 0
    print(f"{platform.node()} {os.cpu_count()} CPUs, {args.images} images x {args.size} bytes")
    print(f"first hash  {(t1 - t0) * per10k:.2f} s per 10k images")
    print(f"resume      {(t2 - t1) * per10k:.3f} s per 10k images (0 files hashed)")
    if args.check is not None and (t2 - t1) * per10k >= args.check:
        print(f"FAIL: resume {(t2 - t1) * per10k:.3f} s >= {args.check} s per 10k images")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
