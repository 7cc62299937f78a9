#!/bin/bash
# The keep-* rungs of quinn-raw, alternated: 6 cycles of 5 rounds per rung, 50 MB, one
# process per rung and cycle. Prints each rung's median time and mean CPU; the rows go to OUT.
# usage: bench/experiments/keep-rope.sh OUT.jsonl [DIR_WITH_quinn-raw]
set -euo pipefail
out=${1:?usage: keep-rope.sh OUT.jsonl [BIN_DIR]}
bin=${2:-$(dirname "$0")/../../target/release}
: > "$out"
for _ in 1 2 3 4 5 6; do
  for m in raw keep-copy keep-rope keep-rope-scratch keep-rope-no-hash; do
    "$bin/quinn-raw" --mode "$m" --rounds 5 --json --label "$m" >> "$out" 2>/dev/null
  done
done
python3 - "$out" <<'P'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
for lab in ["raw", "keep-copy", "keep-rope", "keep-rope-scratch", "keep-rope-no-hash"]:
    r = [x for x in rows if x["label"] == lab]
    t = [x["time_ms"] for x in r]
    c = [x["cpu_s"] for x in r]
    print(f"{lab:18} rounds {len(t):3}  median {st.median(t):6.1f} ms  mean CPU {st.mean(c):.3f} s  min {min(t):6.1f} ms")
P
