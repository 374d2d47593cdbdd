#!/usr/bin/env python3
"""Add the `image` column to certify.tsv tables written before certify recorded it (issue #26).

A table's `idx` is the row's position in the certified class-balanced subset, and the subsets of
different sizes put other images at the same positions, so tables must be paired by image. The
subset is a pure function of the test labels, the limits and the seed, so the image behind each row
is recomputed here with the same library functions a run uses (`build_datasets`'s test subset, then
`balanced_subset` of `certify.limit`), without decoding any image; every row's label is checked
against it. Tables that already have the column are left as they are.

usage: python results/certify/image_ids.py --data-root /tmp/cifar10 --test-limit 2000 TSV [TSV ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from deepzero_apps.checkpoint import atomic_write_text
from deepzero_apps.data import LabeledTensorDataset, balanced_subset, build_datasets, image_ids
from deepzero_apps.smoothing import load_certification


def subset_ids(data_root: str, test_limit: int, limit: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Ids and labels of the `limit` images certify certifies from an image-folder tree, in row order."""
    test = build_datasets("imagefolder", data_root, test_limit=test_limit, seed=seed, mean=(0.0,) * 3, std=(1.0,) * 3).test
    targets = test.dataset.targets if hasattr(test, "dataset") else test.targets
    labels = torch.tensor([targets[i] for i in test.indices] if hasattr(test, "indices") else targets)
    chosen = balanced_subset(LabeledTensorDataset(torch.zeros(len(labels), 1), labels, image_ids(test)), limit, seed)
    return chosen.ids, chosen.tensors[1].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tables", nargs="+", type=Path)
    ap.add_argument("--data-root", required=True, help="the image-folder tree the runs used (unpack_cifar10.py)")
    ap.add_argument("--test-limit", type=int, required=True, help="the runs' data.test_limit")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for tsv in args.tables:
        rows = load_certification(tsv)
        if all(r.image for r in rows):
            print(f"{tsv}: has image ids")
            continue
        ids, labels = subset_ids(args.data_root, args.test_limit, len(rows), args.seed)
        bad = [r.idx for r in rows if labels[r.idx] != r.label]
        if bad:
            raise SystemExit(f"{tsv}: rows {bad[:5]} have other labels than the recomputed images; wrong --test-limit?")
        lines = tsv.read_text().splitlines()
        out = [lines[0] + "\timage"] + [line + "\t" + ids[r.idx] for line, r in zip(lines[1:], rows, strict=True)]
        atomic_write_text(tsv, "\n".join(out) + "\n")
        print(f"{tsv}: {len(rows)} rows, labels checked, image ids added")


if __name__ == "__main__":
    main()
