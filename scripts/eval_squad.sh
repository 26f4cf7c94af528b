#!/usr/bin/env bash
# The development evaluation on real text: held-out whole articles of the SQuAD-train subset
# (../shared/data/squad-train, read in place; see scripts/squad_split.py), topk 8, k 16, every
# eval mode side by side (no context, full context, all compressed, top-n full at REFRAG's
# positions, heuristic, random, policy). Then the same on data/rag_test.jsonl.
#
# Usage: scripts/eval_squad.sh [WEIGHTS_DIR]   (default: weights)
# Environment: SQUAD (the squad-train folder), N (held-out questions, default 40), N_SYNTH
# (rag_test questions, default 40), P (default 0.25), OUT (default runs/eval_real), BIN, CACHE
# (1: index with a chunk cache of WEIGHTS_DIR's encoder, the product's path; 0: no cache, chunks
# encoded per question, which costs TTFT but not quality). An index already in OUT is reused.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
W="${1:-weights}"
SQUAD="${SQUAD:-$repo/../shared/data/squad-train}"
N="${N:-40}"; N_SYNTH="${N_SYNTH:-40}"; P="${P:-0.25}"; OUT="${OUT:-runs/eval_real}"
BIN="${BIN:-target/release/refrag}"; CACHE="${CACHE:-1}"
cache_flags=(); [ "$CACHE" = 1 ] && cache_flags=(--k 16 --load_dir "$W")
mkdir -p "$OUT"
python3 scripts/squad_split.py "$SQUAD" runs/squad
# N questions spread evenly over the held-out articles' questions.
python3 - "$N" > "$OUT/dev_questions.jsonl" <<'PY'
import json, sys
n = int(sys.argv[1])
rows = [l for l in open("runs/squad/dev_qa.jsonl", encoding="utf-8") if l.strip()]
step = max(1, len(rows) // n)
sys.stdout.write("".join(rows[::step][:n]))
PY
if [ ! -f "$OUT/index_dev/manifest.json" ]; then
  "$BIN" index --corpus runs/squad/dev_corpus.txt --index_dir "$OUT/index_dev" \
    "${cache_flags[@]}" --force --quiet
fi
"$BIN" eval --rag_json "$OUT/dev_questions.jsonl" --index_dir "$OUT/index_dev" --load_dir "$W" \
  --topk 8 --k 16 --p "$P" --max_new 24 --quiet --out "$OUT/squad_dev.json" | tee "$OUT/squad_dev.md"
if [ "$N_SYNTH" -gt 0 ]; then
  if [ ! -f "$OUT/index_large/manifest.json" ]; then
    "$BIN" index --corpus data/corpus_large.txt --index_dir "$OUT/index_large" \
      "${cache_flags[@]}" --force --quiet
  fi
  head -n "$N_SYNTH" data/rag_test.jsonl > "$OUT/rag_test_slice.jsonl"
  "$BIN" eval --rag_json "$OUT/rag_test_slice.jsonl" --index_dir "$OUT/index_large" \
    --load_dir "$W" --topk 8 --k 16 --p "$P" --max_new 24 --quiet --out "$OUT/rag_test.json" \
    | tee "$OUT/rag_test.md"
fi
