#!/usr/bin/env bash
# The episode-length table of docs/LONG_HORIZON.md: peak KV, step time and success of full, gated
# (both position modes) and the heuristics on long_cued_reach with a middle of ~80, ~280 and ~980
# steps (episodes of about 100, 300 and 1,000 steps). Usage: [SPECS="80:4 280:2 980:1"] experiments/long_length_table.sh MODEL OUT
# (SPECS: wait:episodes per length)
set -euo pipefail
MODEL=${1:-models/compact-vla}
OUT=${2:-outputs/long_length}
export OMP_NUM_THREADS=1
E="nice -n 10 kv-vla eval --model $MODEL --no-progress"
B="--recent-chunks 2 --max-tokens 80 --gate-threshold 0.0"
for spec in ${SPECS:-80:4 280:2 980:1}; do
  W=${spec%%:*}; N=${spec##*:}
  T="--tasks long_cued_reach:wait=$W --episodes $N"
  $E $T --policies full,none --out "$OUT/w$W/full_none"
  $E $T --policies gated --out "$OUT/w$W/gated_episode" $B --positions episode
  $E $T --policies gated --out "$OUT/w$W/gated_cache" $B --positions cache
  $E $T --policies window --out "$OUT/w$W/window" --recent-chunks 6 --max-tokens 0
  $E $T --policies sinks --out "$OUT/w$W/sinks" --sink-tokens 4 --recent-chunks 5 --max-tokens 0
done
