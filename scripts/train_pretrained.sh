#!/usr/bin/env bash
# Build the shipped improver in pretrained/<family>/ with the project's own commands:
# a training dataset, a held-out dataset, meta-training, and the lesser policies of the demo.
# Usage: scripts/train_pretrained.sh [FAMILY] [TRAIN_TASKS] [STEPS] [PER_TASK] [REFINE_ROUNDS] [HEAD_STEPS]   (defaults: reach-v3 40 2500 all 0 0)
# PER_TASK: keep at most this many lesser policies per held-out task (push-v3 ships 1: its zoo is nearly all <= 30%).
# REFINE_ROUNDS: rounds of `improver refine-locator` after meta-training (the locator trained on the loop's own episodes).
# HEAD_STEPS: if above 0, one more round after those that fits only the behaviour head (DAgger, --head-steps).
# Environment: REFINE_ARGS, loop options of every refinement round (e.g. "--task-exploration 0.04 --wide-task-exploration 0.08");
# LOCATOR_STEPS, the locator's fit steps per round (default 500); AIM_CANDIDATES, offsets the head round tries
# for the improver's aim_offset (e.g. "-0.04 -0.02 0.02 0.04 0.06"; default: none).
set -euo pipefail
family=${1:-reach-v3}
train_tasks=${2:-40}
steps=${3:-2500}
per_task=${4:-}
refine_rounds=${5:-0}
head_steps=${6:-0}
read -r -a refine_args <<< "${REFINE_ARGS:-}"
read -r -a aim_candidates <<< "${AIM_CANDIDATES:-}"
work=${WORK:-runs/$family}
out=pretrained/$family
improver=${IMPROVER:-.venv/bin/improver}

"$improver" generate --suite "ML1:$family" --out "$work/train" --tasks "$train_tasks"
"$improver" generate --suite "ML1:$family" --split test --out "$work/heldout" --tasks 10
"$improver" meta-train --data "$work/train" --out "$work/run" --steps "$steps" --lr 1e-3 --distill-weight 0 --checkpoint-every 250
trained=$work/run/improver
for round in $(seq 1 "$refine_rounds"); do
  "$improver" refine-locator --improver "$trained" --data "$work/train" --out "$work/refine$round" --steps "${LOCATOR_STEPS:-500}" "${refine_args[@]}"
  trained=$work/refine$round/improver
done
if [ "$head_steps" -gt 0 ]; then
  "$improver" refine-locator --improver "$trained" --data "$work/train" --out "$work/refine-head" --steps 0 --head-steps "$head_steps" "${refine_args[@]}" \
    ${aim_candidates[0]+--aim-candidates "${aim_candidates[@]}"}
  trained=$work/refine-head/improver
fi
rm -rf "$out"
mkdir -p "$out"
cp -r "$trained" "$out/improver"
"$improver" starting-policies --data "$work/heldout" --out "$out/lesser" --max-success 0.3 ${per_task:+--per-task "$per_task"}
