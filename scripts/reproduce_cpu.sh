#!/usr/bin/env bash
# The paper's comparison on one config: Dynamic vs Static KL (several β) vs no constraint, over seeds, then the
# figure and the final-value table.
#   bash scripts/reproduce_cpu.sh CONFIG OUT_DIR STEPS SEED...
#   e.g. bash scripts/reproduce_cpu.sh configs/repro/reward_hacking.yaml runs/repro 100 0 1 2
# OVERRIDES="key=value ..." (space-separated) is added to every run's overrides (e.g. model.embedded.threads=1:
# another π0 build); give it its own OUT_DIR, since finished runs are matched without it.
# BETAS="0.3 1.0" (the default) sets the static_kl arms' algo.kl_coef: with one β, "Static saturates" would be a
# verdict on one arbitrary coefficient. Each run starts its own local Ray cluster on the cached π0 and writes
# OUT_DIR/<arm>-s<seed>; a run already trained to STEPS is skipped (any other is rerun from scratch), so a stopped
# reproduction resumes. Use one OUT_DIR per config: runs are matched by arm, seed and STEPS only. The table
# (OUT_DIR/table.md) ends with the CPU and the π0's quality line (OUT_DIR/machine.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 4 ]; then
  echo "usage: bash scripts/reproduce_cpu.sh CONFIG OUT_DIR STEPS SEED..." >&2
  exit 2
fi
config=$1 out=$2 steps=$3
shift 3
seeds=("$@")
read -r -a betas <<< "${BETAS:-0.3 1.0}"
read -r -a extra <<< "${OVERRIDES:-}"
[ -f "$config" ] || { echo "reproduce_cpu.sh: no config file '$config'" >&2; exit 2; }
mkdir -p "$out"
started=$(date +%s)
arms=(dynamic none)
for beta in "${betas[@]}"; do arms+=("static_kl:$beta"); done
runs=()
for seed in "${seeds[@]}"; do
  for arm in "${arms[@]}"; do
    constraint=${arm%%:*}
    overrides=(algo.constraint="$constraint")
    name=$constraint
    if [ "$constraint" = static_kl ]; then
      overrides+=(algo.kl_coef="${arm#*:}")
      name="static_kl-b${arm#*:}"
    fi
    dir="$out/$name-s$seed"
    runs+=("$dir")
    # done = trained to this STEPS and not stopped early (summary.json is also written by a crashed or stopped run)
    if python - "$dir/summary.json" "$steps" <<'PY'
import json, sys
try:
    summary = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(1)
sys.exit(0 if summary.get("policy_version") == int(sys.argv[2]) and "stopped" not in summary else 1)
PY
    then
      continue
    fi
    python scripts/train.py --config "$config" "${overrides[@]}" \
      trainer.steps="$steps" trainer.output_dir="$dir" trainer.overwrite=true \
      trainer.seed="$seed" data.seed="$seed" generator.sampling.seed="$seed" \
      metrics.wandb_mode=disabled metrics.progress_bar=false ${extra[@]+"${extra[@]}"} > "$dir.log" 2>&1 \
      || { echo "run $dir failed; see $dir.log" >&2; exit 1; }
    echo "$dir done ($(( $(date +%s) - started )) s so far)"
  done
done
python scripts/compare.py "${runs[@]}" --out "$out/compare.png" | tee "$out/table.md"
# What the numbers stand on: the CPU, and the π0 each run trained from (the embedded π0 follows its build's bands,
# not this CPU's digits; SmolLM2-style configs have no built π0). Also in OUT_DIR/machine.md.
python - "${runs[@]}" <<'PY' | tee "$out/machine.md" >> "$out/table.md"
import json, os, sys
from rlhf_refiner import pi0
print(f"\nCPU: {pi0.cpu_model()}, {os.cpu_count()} cores")
lines = {}
for run in sys.argv[1:]:
    quality = json.load(open(f"{run}/summary.json")).get("pi0_quality")
    if quality:
        lines.setdefault(pi0.format_quality(quality), []).append(os.path.basename(run))
for line, runs in lines.items():  # one line unless the π0 cache was rebuilt between runs
    print(f"π0 of {len(runs)} run{'s' if len(runs) > 1 else ''}: {line}")
PY
echo "total: $(( $(date +%s) - started )) s for ${#runs[@]} runs" | tee -a "$out/table.md"
