#!/usr/bin/env bash
# Long-horizon results of docs/LONG_HORIZON.md: the cache policies on the long tasks (evaluation
# waits 280-400 steps, twice the longest in training) and late_cued_reach with and without 100-400
# waiting frames before the episode. Two chains run side by side (one per core); about 25 min here
# at N=50. `gated` runs at 288 tokens in both position modes and at the defaults (80 tokens,
# episode positions). Usage: experiments/long_eval.sh MODEL OUT N
# Table: python experiments/long_tables.py results OUT/*/
set -euo pipefail
MODEL=${1:-models/compact-vla}
OUT=${2:-outputs/long_eval}
N=${3:-50}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
E="nice -n 10 kv-vla eval --model $MODEL --episodes $N --no-progress"
G="--policies gated --recent-chunks 2 --gate-threshold 0.0"
(
  $E --tasks long_cued_reach --policies full --out "$OUT/reach_full"
  $E --tasks long_cued_reach $G --max-tokens 288 --positions episode --out "$OUT/reach_gated288"
  $E --tasks long_cued_reach $G --max-tokens 288 --positions cache --out "$OUT/reach_gated288_cache"
  $E --tasks long_cued_reach $G --out "$OUT/reach_gated_defaults"
  $E --tasks long_cued_reach --policies none,window --recent-chunks 6 --max-tokens 0 --out "$OUT/reach_none_window"
  $E --tasks long_cued_reach --policies sinks --sink-tokens 4 --recent-chunks 5 --max-tokens 0 --out "$OUT/reach_sinks"
  $E --tasks late_cued_reach --policies full --out "$OUT/late_full"
  $E --tasks late_cued_reach $G --max-tokens 80 --positions episode --out "$OUT/late_gated80"
) > "$OUT/chain_a.log" 2>&1 &
(
  $E --tasks long_cued_pick --policies full --out "$OUT/pick_full"
  $E --tasks long_cued_pick $G --max-tokens 288 --positions episode --out "$OUT/pick_gated288"
  $E --tasks long_cued_pick $G --max-tokens 288 --positions cache --out "$OUT/pick_gated288_cache"
  $E --tasks long_cued_pick $G --out "$OUT/pick_gated_defaults"
  $E --tasks long_cued_pick --policies none,window --recent-chunks 6 --max-tokens 0 --out "$OUT/pick_none_window"
  $E --tasks long_cued_pick --policies sinks --sink-tokens 4 --recent-chunks 5 --max-tokens 0 --out "$OUT/pick_sinks"
  $E --tasks late_cued_reach:lead=100-400 --policies full --out "$OUT/lead_full"
  $E --tasks late_cued_reach:lead=100-400 $G --max-tokens 80 --positions episode --out "$OUT/lead_gated80"
) > "$OUT/chain_b.log" 2>&1 &
wait
