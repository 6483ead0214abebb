#!/usr/bin/env bash
# The closed-loop evaluation behind models/README.md: every cache policy on the four memory tasks
# at one token budget, and full / gated / none on the tasks that need no memory. Each run spreads its
# episodes over $WORKERS Ray workers (kv-vla eval --backend ray; an embedded Ray per run, or the
# cluster at $RAY_ADDRESS, see docs/ECOSYSTEM.md); the merged report lands in $OUT (eval_info.json,
# results.md, success_vs_kv.png). Usage: [MODEL=DIR] [WORKERS=2] [RAY_ADDRESS=HOST:PORT]
# scripts/eval_suite.sh [EPISODES] [OUT]   (MODEL defaults to the shipped models/compact-vla).
#
# Token budget (shipped model: 4 image tokens + 4 action slots = 8 tokens = one chunk per step, a
# prompt of 19-26 tokens): BUDGET=80 is the prompt, the open chunk, 2 recent chunks and ~4 chunks
# the policy chooses -- 20-22% of a full cued episode (~360-390 tokens), ~35% of a full
# touch_sequence episode (~230 tokens). `window` and `sinks` get the same tokens as recent chunks
# (window: 6 recent chunks; sinks: 4 sink tokens + 5 recent chunks).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-50}
OUT=${2:-outputs/eval_suite}
BUDGET=80
MEM=cued_reach,cued_pick,touch_sequence,late_cued_reach
PLAIN=reach,push,pick_place
MODEL=${MODEL:-models/compact-vla}
WORKERS=${WORKERS:-2}
E=".venv/bin/kv-vla eval --model $MODEL --episodes $N --no-progress --backend ray --workers $WORKERS"
BUDGETED="--recent-chunks 2 --max-tokens $BUDGET --gate-threshold 0.0"
# window and sinks match the budget with their recent window instead, as evaluated: no budget
UNBUDGETED="--max-tokens 0"
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
{
  $E --policies full,none --tasks $MEM --out "$OUT/mem_full_none"
  $E --policies gated,attention --tasks $MEM --out "$OUT/mem_budget" $BUDGETED
  $E --policies window --tasks $MEM --out "$OUT/mem_window" --recent-chunks 6 $UNBUDGETED
  $E --policies full,none --tasks $PLAIN --out "$OUT/plain_full_none"
  $E --policies gated --tasks $PLAIN --out "$OUT/plain_gated" $BUDGETED
  $E --policies random,zipvl,gated_tiered --tasks $MEM --out "$OUT/mem_budget_b" $BUDGETED
  $E --policies sinks --tasks $MEM --out "$OUT/mem_sinks" --sink-tokens 4 --recent-chunks 5 $UNBUDGETED
} > "$OUT/suite.log" 2>&1
.venv/bin/python -m kv_vla.eval.merge --out "$OUT" "$OUT"/mem_* "$OUT"/plain_*
