#!/usr/bin/env bash
# Long-horizon results of docs/LONG_HORIZON.md: the cache policies on the long tasks (evaluation
# waits 280-400 steps, twice the longest in training) and late_cued_reach with and without 100-400
# waiting frames before the episode. Two chains run side by side (one per core).
# Usage: experiments/long_eval.sh MODEL OUT N [POSITIONS]
#   POSITIONS: the gated rows' position mode, episode (default: the library's) or cache
set -euo pipefail
MODEL=${1:-models/compact-vla}
OUT=${2:-outputs/long_eval}
N=${3:-50}
POS=${4:-episode}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
E="nice -n 10 kv-vla eval --model $MODEL --episodes $N --no-progress"
G="--policies gated --recent-chunks 2 --gate-threshold 0.0 --positions $POS"
(
  $E --tasks long_cued_reach --policies full --out "$OUT/reach_full"
  $E --tasks long_cued_reach $G --max-tokens 288 --out "$OUT/reach_gated288"
  $E --tasks long_cued_reach --policies none,window --recent-chunks 6 --max-tokens 0 --out "$OUT/reach_none_window"
  $E --tasks long_cued_reach --policies sinks --sink-tokens 4 --recent-chunks 5 --max-tokens 0 --out "$OUT/reach_sinks"
  $E --tasks late_cued_reach --policies full --out "$OUT/late_full"
  $E --tasks late_cued_reach $G --max-tokens 80 --out "$OUT/late_gated80"
) > "$OUT/chain_a.log" 2>&1 &
(
  $E --tasks long_cued_pick --policies full --out "$OUT/pick_full"
  $E --tasks long_cued_pick $G --max-tokens 288 --out "$OUT/pick_gated288"
  $E --tasks long_cued_pick --policies none,window --recent-chunks 6 --max-tokens 0 --out "$OUT/pick_none_window"
  $E --tasks long_cued_pick --policies sinks --sink-tokens 4 --recent-chunks 5 --max-tokens 0 --out "$OUT/pick_sinks"
  $E --tasks late_cued_reach:lead=100-400 --policies full --out "$OUT/lead_full"
  $E --tasks late_cued_reach:lead=100-400 $G --max-tokens 80 --out "$OUT/lead_gated80"
) > "$OUT/chain_b.log" 2>&1 &
wait
