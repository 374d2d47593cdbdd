#!/usr/bin/env bash
# Every run of results/sparsity/README.md, in two lanes on a shared 2-core CPU (one torch thread each, nice 10).
# Lane "sparse": the 9 sparse-CGE cells, seed by seed (seed-major, so a cut-short set stays paired by seed), as
# Hydra multiruns (one process per protocol and seed: start-up took ~2 minutes a process on the loaded machine).
# Lane "refs": first-order and dense-CGE references beside it. Runs whose summary.json exists are skipped, so
# rerunning resumes the set (delete an unfinished run's folder first). Then full-test scoring and the tables.
# usage: results/sparsity/run.sh ROOT OUT [sparse|refs|both|report]
#   ROOT from: python unpack_cifar10.py ROOT --limit-per-class 1000 ; OUT e.g. runs/sparsity
set -uo pipefail
root=${1:?CIFAR-10 ImageFolder root}; out=$(realpath -m "${2:?output directory}")
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../.." && pwd); bin="$repo/.venv/bin"
mkdir -p "$out"

sweep() {  # sweep SEED EXPERIMENT KEY V1,V2,...: one multirun over KEY's values, runs in OUT/EXPERIMENT_VALUE_sSEED
  local seed=$1 exp=$2 key=$3 todo=() v interp=$3
  [ "$key" = sparsity ] && interp=sparsity.method
  for v in ${4//,/ }; do [ -f "$out/${exp}_${v/null/None}_s$seed/summary.json" ] || todo+=("$v"); done
  [ ${#todo[@]} -eq 0 ] && return 0
  local list; list=$(IFS=,; echo "${todo[*]}")
  nice -n 10 "$bin/deepzero-task" classify -m experiment="$exp" data.root="$root" seed="$seed" "$key=$list" \
    hydra.sweep.dir="$out" "hydra.sweep.subdir=${exp}_\${$interp}_s$seed" \
    > "$out/${exp}_s$seed.log" 2>&1 || echo "failed: $exp seed $seed (see $out/${exp}_s$seed.log)"
}

run() {  # run NAME OVERRIDES...: one reference run in OUT/NAME
  local name=$1; shift
  [ -f "$out/$name/summary.json" ] && return 0
  nice -n 10 "$bin/deepzero-task" classify experiment=sparsity_cnn3 data.root="$root" seed="${name##*_s}" \
    hydra.run.dir="$out/$name" "$@" > "$out/$name.log" 2>&1 || echo "failed: $name (see $out/$name.log)"
}

sparse_lane() {
  for s in 0 1 2; do
    sweep $s sparsity_scorer sparsity zo_grasp,grasp,random,uniform
    sweep $s sparsity_sweep sparsity.sparsity 0.8,0.95,0.99
    sweep $s sparsity_resampling sparsity.mask_interval 1,null
  done
}

refs_lane() {
  for s in 0 1 2; do run fo_s$s mode=fo sparsity=dense sparsity.sparsity=0; done
  for s in 0 1 2; do run dense_s$s sparsity=dense sparsity.sparsity=0; done
}

report() {  # final weights on the whole test set, small per-run files into results/sparsity/per_run, tables + plot
  local runs=("$out"/*/)
  nice -n 10 "$bin/python" "$repo/scripts/sparsity_full_test.py" "$root" "${runs[@]}" --cache "$out/test_set.pt"
  for r in "${runs[@]}"; do
    [ -f "$r/summary.json" ] || continue
    local dst="$here/per_run/$(basename "$r")"; mkdir -p "$dst"
    cp "$r/summary.json" "$r/metrics.jsonl" "$r/full_test.json" "$dst/"
    cp "$r/.hydra/config.yaml" "$dst/config.yaml"
    [ -f "$r/ratios.json" ] && cp "$r/ratios.json" "$dst/"
  done
  "$bin/python" "$repo/scripts/sparsity_tables.py" "$here/per_run" --out "$here"
}

case "${3:-both}" in
  sparse) sparse_lane ;;
  refs) refs_lane ;;
  both) sparse_lane & refs_lane & wait; report ;;
  report) report ;;
esac
