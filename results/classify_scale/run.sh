#!/usr/bin/env bash
# Every run of results/classify_scale/README.md (issue #29), then full-test scoring, the per-run files and the tables.
# One torch thread per run (experiment=classify_scale sets threads: 1); runs whose summary.json exists are skipped,
# so rerunning resumes the set (delete an unfinished run's folder first). The committed runs were made at commit
# d4f5018 (see README: later engine changes alter float32 rounding, not the method).
# usage: results/classify_scale/run.sh ROOT OUT [runs|dense|report]
#   ROOT from: python unpack_cifar10.py ROOT   (all 50,000 / 10,000 images; the experiment takes 6,400 / 1,000 of them)
#   OUT e.g. runs/classify_scale
set -uo pipefail
root=${1:?CIFAR-10 ImageFolder root}; out=$(realpath -m "${2:?output directory}")
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../.." && pwd); bin="$repo/.venv/bin"
mkdir -p "$out"

run() {  # run CELL SEED OVERRIDES...: one run in OUT/CELL/seedSEED
  local cell=$1 seed=$2; shift 2
  [ -f "$out/$cell/seed$seed/summary.json" ] && return 0
  "$bin/deepzero-task" classify experiment=classify_scale data.root="$root" seed="$seed" \
    hydra.run.dir="$out/$cell/seed$seed" "$@" > "$out/${cell}_s$seed.log" 2>&1 || echo "failed: $cell seed $seed"
}

runs() {  # seed-major within each cell pair, so a cut-short set stays paired by seed
  for s in 0 1 2; do run fo $s mode=fo sparsity=dense; done
  for s in 0 1 2; do run fo_masked90 $s mode=fo; done   # backprop gradient kept on ZO-GraSP 90 %'s coordinates
  for s in 0 1 2; do
    run zo_grasp90 $s sparsity=zo_grasp
    run random90 $s sparsity=random
    run uniform90 $s sparsity=uniform
    run zo_grasp95 $s sparsity=zo_grasp sparsity.sparsity=0.95
  done
}

dense() {  # ~4.3 s per step of 16,739 queries: ~70 min per run on one core
  for s in 0 1 2; do run dense $s sparsity=dense; done
}

report() {  # score on all 10,000 test images, copy the per-run files, rebuild tables.md and curves.png
  "$bin/python" "$repo/scripts/sparsity_full_test.py" "$root" "$out"/*/seed* --cache "$out/test_set.pt"
  for summary in "$out"/*/seed*/summary.json; do
    src=$(dirname "$summary"); dst="$here/per_run/${src#"$out"/}"
    mkdir -p "$dst"
    cp "$src/.hydra/config.yaml" "$src/.hydra/overrides.yaml" "$src/summary.json" "$src/metrics.jsonl" \
      "$src/full_test.json" "$dst/"
    [ -f "$src/ratios.json" ] && cp "$src/ratios.json" "$dst/"
  done
  "$bin/python" "$here/tables.py"
}

case "${3:-runs}" in
  runs) runs; report ;;
  dense) dense; report ;;
  report) report ;;
  *) echo "usage: $0 ROOT OUT [runs|dense|report]" >&2; exit 2 ;;
esac
