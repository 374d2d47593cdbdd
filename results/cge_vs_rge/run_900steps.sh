#!/usr/bin/env bash
# One seed, 4 epochs (900 steps) of the same protocol as run.sh; the ZO runs on 2 torchrun ranks
# (bit-identical to one process for RGE, within float rounding for batched CGE). About 38 minutes here.
# usage: results/cge_vs_rge/run_900steps.sh CIFAR_ROOT OUT_DIR
set -euo pipefail
root=${1:?CIFAR-10 ImageFolder root}; out=${2:?output directory}
common="experiment=cge_vs_rge data=imagefolder data.root=$root data.train_limit=7200 data.test_limit=10000
        data.augment=false model.depth=1 epochs=4 batch_size=32 progress=false log_every=25 seed=0"
ranks="torchrun --standalone --nproc-per-node 2 --no-python"
$ranks deepzero-task classify $common estimator=rge_qd hydra.run.dir="$out/rge_s0"
$ranks deepzero-task classify $common estimator=cge hydra.run.dir="$out/cge_s0"
deepzero-task classify $common mode=fo hydra.run.dir="$out/fo_s0"
