#!/usr/bin/env bash
# The paper's comparison on the embedded CPU task: Dynamic vs Static KL vs no constraint, over seeds, then the
# figure and the final-value table.
#   bash scripts/reproduce_cpu.sh [OUT_DIR] [STEPS] [SEEDS...]      (defaults: runs/repro 60 0 1 2)
# Each run builds on the cached π0 (built once), starts its own local Ray cluster, and writes OUT_DIR/<arm>-s<seed>.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/repro}
steps=${2:-60}
shift $(( $# > 2 ? 2 : $# )) || true
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
mkdir -p "$out"
started=$(date +%s)
runs=()
for seed in "${seeds[@]}"; do
  for arm in dynamic static_kl none; do
    dir="$out/$arm-s$seed"
    runs+=("$dir")
    [ -f "$dir/summary.json" ] && continue  # finished earlier: the script resumes where it stopped
    python scripts/train.py --config configs/quickstart.yaml \
      algo.constraint=$arm trainer.steps="$steps" trainer.output_dir="$dir" trainer.overwrite=true \
      trainer.seed="$seed" data.seed="$seed" generator.sampling.seed="$seed" \
      metrics.wandb_mode=disabled metrics.progress_bar=false > "$dir.log" 2>&1 \
      || { echo "run $dir failed; see $dir.log" >&2; exit 1; }
    echo "$dir done ($(( $(date +%s) - started )) s so far)"
  done
done
python scripts/compare.py "${runs[@]}" --out "$out/compare.png" | tee "$out/table.md"
echo "total: $(( $(date +%s) - started )) s"
