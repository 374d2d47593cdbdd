#!/usr/bin/env bash
# Every run of results/certify/subsets/ (issue #26 item 2), then the per-run files and subsets.py's tables.
# One torch thread per run; finished runs (a summary.json) are skipped, so rerunning resumes the set.
# usage: results/certify/subsets_run.sh DATA OUT [curve|seeds|fresh|collect]   (no step: all four in turn)
#   DATA from: python unpack_cifar10.py DATA --limit-per-class 1000
#   OUT e.g. runs/certify_subsets (seed 0's curve in OUT/seed0, the repeats in OUT/seed1, OUT/seed2)
set -euo pipefail
data=${1:?CIFAR-10 ImageFolder root}; out=$(realpath -m "${2:?output directory}")
here=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1
BEST_PARAMS=norm BEST_BUDGET=300000  # seed 0's curve: the most certified at r = 0.25 (a 3-way tie), then at r = 0
curve() {  # sigma 0.25, Stab+MSE, dense CGE over each subset at 100k / 300k / 1M images, each paired with MSE-only
  for p in adapter norm last; do
    python "$here/budget_curve.py" --data-root "$data" --root "$out/seed0" --run --sigmas 0.25 \
      --budgets 100000 300000 1000000 --modes deepzero --set mse_weight=1 finetune.params=$p sparsity=dense \
      --tag stabmse_$p
  done
}

seeds() {  # the chosen setting and its MSE-only start with seeds 1 and 2 (every stage retrained)
  for s in 1 2; do
    python "$here/budget_curve.py" --data-root "$data" --root "$out/seed$s" --run --seed $s --sigmas 0.25 \
      --budgets $BEST_BUDGET --modes deepzero --set mse_weight=1 finetune.params=$BEST_PARAMS sparsity=dense \
      --tag stabmse_$BEST_PARAMS
  done
}

fresh() {  # the chosen run and MSE-only certified on 500 images (a copy of the run, resumed: no retraining)
  local r="$out/seed0" run=deepzero_${BEST_BUDGET}_stabmse_$BEST_PARAMS
  local f="$r/sigma0.25_500images" c="$r/sigma0.25/cache"
  local x=(experiment=certify_budget_curve "data.root=$data" sigma=0.25 progress=false threads=1 certify.limit=500
           "classifier.cache_dir=$r/classifier" "pretrain.cache_dir=$c/pretrain" "zo_ae_ds.cache_dir=$c/autoencoder")
  mkdir -p "$f"
  [ -f "$f/mse/summary.json" ] || deepzero-task certify "${x[@]}" method=mse "hydra.run.dir=$f/mse"
  if [ ! -f "$f/$run/summary.json" ]; then
    [ -d "$f/$run" ] || { cp -r "$r/sigma0.25/$run" "$f/" && rm "$f/$run/summary.json"; }
    deepzero-task certify "${x[@]}" method=deepzero mse_weight=1 finetune.params=$BEST_PARAMS sparsity=dense \
      query_budget=$BEST_BUDGET resume=true resume_allow_changes=true "hydra.run.dir=$f/$run"
  fi
}

collect() {  # the committed files: per-run tables, summaries, curves and configs; the stages' summaries
  for src in "$out"/seed*/sigma0.25*/* "$out"/seed*/classifier "$out"/seed*/sigma0.25/cache/pretrain; do
    [ -f "$src/summary.json" ] || continue
    dst="$here/subsets/${src#"$out"/}"
    mkdir -p "$dst"
    for f in summary.json stage.json certify.tsv certified_accuracy.json metrics.jsonl run_config.yaml; do
      [ -f "$src/$f" ] && cp "$src/$f" "$dst/"
    done
  done
  python "$here/subsets.py"
}

if [ $# -ge 3 ]; then "$3"; else curve; seeds; fresh; collect; fi
