#!/usr/bin/env bash
# How much of #17's gated-vs-full gap is the gate's training seed? Rebuilds the shipped gate's 480
# training episodes (the first 60 per task, 40 for reach/push/pick_place, of the stage-11 folders:
# same seeds, so the same episodes), retrains gates on the shipped weights with the shipped recipe
# (train-gate seed 0 = the shipped gate; other seeds; optionally --summary-keys unrotated), then runs
# the four gated cells of docs/LONG_HORIZON.md's goals table over evaluation seeds 0-49.
# Usage: experiments/gate_rebuild_screen.sh WORK "NAME:TRAIN-GATE-FLAGS" ...
#   e.g. experiments/gate_rebuild_screen.sh /tmp/gates "rot:--seed 0" "rot_s1:--seed 1" "unrot:--summary-keys unrotated"
# Per gate about 5 min of training and 12 min of evaluation here (collection: about 1 min).
# Results: WORK/screen/NAME/{late80,lead80,pick288,reach288}/, full history in WORK/full/, the table
# (experiments/gate_screen_table.py) printed and in WORK/screen/table.json. Steps already done are skipped.
set -euo pipefail
WORK=$1; shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
MODEL=${MODEL:-models/compact-vla}
MODEL=$(cd "$MODEL" && pwd)
export OMP_NUM_THREADS=1
mkdir -p "$WORK"; cd "$WORK"
C="kv-vla collect --no-progress --workers 2"
$C --task long_cued_reach:wait=train --episodes 60 --out long_demos --seed-offset 1600000
$C --task long_cued_pick:wait=train --episodes 60 --out long_demos_pick --seed-offset 1700000
for t in late_cued_reach:20 cued_reach:60 cued_pick:60 touch_sequence:60 reach:40 push:40 pick_place:40; do
  $C --task "${t%%:*}" --episodes "${t##*:}" --out replay --seed-offset 1800000
done
$C --task late_cued_reach:lead=50-250 --episodes 20 --out lead_demos --seed-offset 1900000
$C --task late_cued_reach:lead=100-400 --episodes 20 --out lead_demos_long --seed-offset 2200000
D="long_demos long_demos_pick replay lead_demos lead_demos_long"
G="kv-vla train-gate --model $MODEL --data $D --epochs 1 --max-per-task 60 --device cpu --budget-chunks 3 --sparsity 0"
screen() {  # NAME: the goals table's four gated cells, two processes side by side
  local E="kv-vla eval --model $MODEL --gate gates/$1/gate.safetensors --episodes 50 --no-progress"
  E="$E --policies gated --recent-chunks 2 --gate-threshold 0.0 --positions episode"
  local O="screen/$1"; mkdir -p "$O"
  ( $E --tasks long_cued_pick --max-tokens 288 --out "$O/pick288"
    $E --tasks late_cued_reach --max-tokens 80 --out "$O/late80" ) > "$O/a.log" 2>&1 &
  ( $E --tasks late_cued_reach:lead=100-400 --max-tokens 80 --out "$O/lead80"
    $E --tasks long_cued_reach --max-tokens 288 --out "$O/reach288" ) > "$O/b.log" 2>&1 &
  wait
}
for spec in "$@"; do
  name=${spec%%:*}; flags=${spec#*:}
  # shellcheck disable=SC2086  # flags are words
  [ -f "gates/$name/gate.safetensors" ] || $G --out "gates/$name" $flags > "gates_$name.log" 2>&1
  [ -f "screen/$name/reach288/eval_info.json" ] || screen "$name"
done
if [ ! -f full/reach/eval_info.json ]; then  # full history on the same seeds, for the paired counts
  F="kv-vla eval --model $MODEL --episodes 50 --no-progress --policies full"
  ( $F --tasks long_cued_pick --out full/pick; $F --tasks late_cued_reach --out full/late ) > full_a.log 2>&1 &
  ( $F --tasks late_cued_reach:lead=100-400 --out full/lead; $F --tasks long_cued_reach --out full/reach ) > full_b.log 2>&1 &
  wait
fi
PYTHONPATH=$REPO python "$REPO/experiments/gate_screen_table.py" screen full --out screen/table.json
