#!/usr/bin/env bash
# The closed-loop evaluation behind models/README.md: every cache policy on the memory tasks at one
# token budget, and full / gated / none on the tasks that need no memory. Two chains run in parallel
# (one per core); the merged report lands in $OUT (eval_info.json, results.md, success_vs_kv.png).
# Usage: scripts/eval_suite.sh [EPISODES] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
OUT=${2:-outputs/eval_suite}
BUDGET=240          # tokens: ~25% of a full cued episode (prompt + 2 recent chunks + ~9 chosen chunks)
MEM=cued_reach,touch_sequence
PLAIN=reach,push,pick_place
E=".venv/bin/kv-vla eval --episodes $N --no-progress"
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
(
  $E --policies full,none --tasks $MEM --out "$OUT/mem_full_none"
  $E --policies gated,attention,random --tasks $MEM --out "$OUT/mem_budget" \
     --recent-chunks 2 --max-tokens $BUDGET --gate-threshold 0.0
  $E --policies window --tasks $MEM --out "$OUT/mem_window" --recent-chunks 11
) > "$OUT/chain_a.log" 2>&1 &
(
  $E --policies full,none --tasks $PLAIN --out "$OUT/plain_full_none"
  $E --policies gated --tasks $PLAIN --out "$OUT/plain_gated" \
     --recent-chunks 2 --max-tokens $BUDGET --gate-threshold 0.0
  $E --policies zipvl,gated_tiered --tasks $MEM --out "$OUT/mem_zipvl" \
     --recent-chunks 2 --max-tokens $BUDGET --gate-threshold 0.0
) > "$OUT/chain_b.log" 2>&1 &
wait
.venv/bin/python -m kv_vla.eval.merge --out "$OUT" "$OUT"/mem_* "$OUT"/plain_*
