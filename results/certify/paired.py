#!/usr/bin/env python3
"""Paired comparison of certify runs over the same test images, from their committed certify.tsv.

An image counts as certified at radius r when the smoothed prediction is correct with radius >= r
(Cohen et al.'s table). For each pair of modes: images certified by one only, and the two-sided exact
sign test on those discordant images (McNemar's exact test), the paired test a 100-image table needs.

Tables are paired by the image each row names (the `image` column: a dataset path or index), never
by row position: subsets of different sizes put other images at the same rows. Tables written
before that column existed get it from `image_ids.py`.

`--exclude TSV` leaves out the images of another table, e.g. those already looked at when a run was
chosen, so what remains is a test on images that played no part in the choice.

usage: python results/certify/paired.py [RUN_ROOT] [--radius 0.25 ...] [--pairs deepzero:zo_ae_ds ...]
                                        [--exclude certify.tsv]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepzero_apps.smoothing import certified_by_image, paired_sign_test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", type=Path, default=Path(__file__).parent / "cifar10")
    ap.add_argument("--radius", type=float, nargs="+", default=[0.25])
    ap.add_argument("--pairs", nargs="+", default=["deepzero:zo_ae_ds", "deepzero:mse", "fo_ds:mse", "fo_ds_lr1e-4:mse"])
    ap.add_argument("--exclude", type=Path, help="a certify.tsv whose images are left out")
    args = ap.parse_args()
    try:
        excluded = certified_by_image(args.exclude, 0.0).keys() if args.exclude else set()
        for pair, radius in ((pair, radius) for pair in args.pairs for radius in args.radius):
            a, b = pair.split(":")
            ca, cb = ({i: c for i, c in certified_by_image(args.root / m / "certify.tsv", radius).items()
                       if i not in excluded} for m in (a, b))
            only_a, only_b, p = paired_sign_test(ca, cb)
            print(json.dumps({"a": a, "b": b, "radius": radius, "images": len(ca), "certified_a": sum(ca.values()),
                              "certified_b": sum(cb.values()), "only_a": only_a, "only_b": only_b,
                              "sign_test_p": float(f"{p:.3g}")}))
    except ValueError as e:  # a table without image ids, or two tables of different images
        raise SystemExit(f"paired.py: {e}") from None


if __name__ == "__main__":
    main()
