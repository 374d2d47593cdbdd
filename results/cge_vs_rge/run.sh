#!/usr/bin/env bash
# FO vs CGE vs RGE (q = d) on the depth-1 small CNN, CIFAR-10 subset, 3 seeds, equal steps.
# Runs two jobs at a time (one torch thread each) on a 2-core CPU; about 50 minutes here.
# usage: results/cge_vs_rge/run.sh CIFAR_ROOT OUT_DIR   (CIFAR_ROOT from ../shared/data/unpack_cifar10.py)
set -euo pipefail
root=${1:?CIFAR-10 ImageFolder root}; out=${2:?output directory}
common="experiment=cge_vs_rge data=imagefolder data.root=$root data.train_limit=7200 data.test_limit=10000
        data.augment=false model.depth=1 epochs=2 batch_size=32 progress=false log_every=25"
jobs=()
for seed in 0 1 2; do jobs+=("estimator=rge_qd seed=$seed hydra.run.dir=$out/rge_s$seed"); done
for seed in 0 1 2; do jobs+=("estimator=cge seed=$seed hydra.run.dir=$out/cge_s$seed"); done
for seed in 0 1 2; do jobs+=("mode=fo seed=$seed hydra.run.dir=$out/fo_s$seed"); done
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} sh -c "deepzero-task classify $(echo $common) {} > /dev/null 2>&1 || echo 'failed: {}'"
python "$(dirname "$0")/../../scripts/plot_cge_vs_rge.py" "$out" --out "$out/depth1.png" --table "$out/table.md"
