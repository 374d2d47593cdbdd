#!/usr/bin/env bash
# Every run of results/sparsity/README.md, in two lanes on a shared 2-core CPU (one torch thread each, nice 10):
# lane "sparse" runs the 9 sparse-CGE cells seed by seed (seed-major, so a cut-short set stays paired by seed);
# lane "refs" runs the first-order and dense-CGE references beside it. A run whose summary.json exists is skipped,
# so rerunning the script resumes the set. Then the tables, the plot and the committed per-run summaries.
# usage: results/sparsity/run.sh ROOT OUT   (ROOT from unpack_cifar10.py ROOT --limit-per-class 1000; OUT e.g. runs/sparsity)
set -uo pipefail
root=${1:?CIFAR-10 ImageFolder root}; out=${2:?output directory}
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../.." && pwd)
bin="$repo/.venv/bin"
mkdir -p "$out"

run() {  # run NAME OVERRIDES...
  local name=$1; shift
  [ -f "$out/$name/summary.json" ] && return 0
  nice -n 10 "$bin/deepzero-task" classify data.root="$root" seed="${name##*_s}" hydra.run.dir="$out/$name" "$@" \
    > "$out/$name.log" 2>&1 || echo "failed: $name (see $out/$name.log)"
}

sparse_lane() {
  for s in 0 1 2; do
    run zo90_s$s experiment=sparsity_scorer sparsity=zo_grasp
    run grasp90_s$s experiment=sparsity_scorer sparsity=grasp
    run random90_s$s experiment=sparsity_scorer sparsity=random
    run zo80_s$s experiment=sparsity_sweep sparsity.sparsity=0.8
    run zo95_s$s experiment=sparsity_sweep sparsity.sparsity=0.95
    run zo99_s$s experiment=sparsity_sweep sparsity.sparsity=0.99
    run zo90int1_s$s experiment=sparsity_resampling sparsity.mask_interval=1
    run uniform90_s$s experiment=sparsity_scorer sparsity=uniform
    run zo90fixed_s$s experiment=sparsity_resampling sparsity.mask_interval=null
  done
}

refs_lane() {
  for s in 0 1 2; do run fo_s$s experiment=sparsity_cnn3 mode=fo sparsity=dense sparsity.sparsity=0; done
  for s in 0 1 2; do run dense_s$s experiment=sparsity_cnn3 sparsity=dense sparsity.sparsity=0; done
}

case "${3:-both}" in
  sparse) sparse_lane ;;
  refs) refs_lane ;;
  both) sparse_lane & refs_lane & wait ;;
esac
