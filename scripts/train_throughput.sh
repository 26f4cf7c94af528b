#!/usr/bin/env bash
# Training throughput of cpt_recon on this machine: v5's recipe (16 items a step, the curriculum
# 1:2,2:1,4:1, ~2 chunks of 16 target tokens an item), 15 steps from the shipped weights, the last
# 10 timed from train_log.jsonl. Variants, alternated for ROUNDS rounds:
#   one_core   OPENBLAS_NUM_THREADS=1: the step's micro-batches one by one, as v3-v5 were trained
#              (--micro_batch 16 was one micro-batch a step)
#   cores      the loop's default: a step split into one micro-batch per core, side by side
#   cores_avx512  the same with OPENBLAS_CORETYPE=SkylakeX (only where the CPU has AVX-512)
# Run it on an idle machine: two cores are easily disturbed.
#
# Usage: scripts/train_throughput.sh   (BIN, TEXT, ROUNDS, OUT from the environment)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
BIN="${BIN:-target/release/refrag}"
TEXT="${TEXT:-../shared/data/wikitext/paragraphs.txt}"
ROUNDS="${ROUNDS:-2}"
OUT="${OUT:-runs/train_throughput}"
mkdir -p "$OUT"
variants=(one_core cores)
grep -qw avx512f /proc/cpuinfo 2>/dev/null && variants+=(cores_avx512)
one() {
  local name=$1 dir="$OUT/$1"
  local -a env_=()
  case $name in
    one_core) env_=(OPENBLAS_NUM_THREADS=1) ;;
    cores_avx512) env_=(OPENBLAS_CORETYPE=SkylakeX) ;;
  esac
  env "${env_[@]}" "$BIN" cpt_recon --train_json "$TEXT" --eval_items 0 --k 16 --steps 15 \
    --batch_size 16 --micro_batch 16 --lr 2e-4 --warmup 5 --curriculum '1:2,2:1,4:1' --seed 22 \
    --log_every 5 --load_dir weights --out_dir "$dir" --save_every 0 --force --quiet \
    > "$dir.log" 2>&1
  python3 - "$name" "$dir/train_log.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[2])]
last = [r for r in rows if r["step"] > 5]
sec = sum(r["sec_per_step"] for r in last) / len(last)
tokens = sum(r["chunks"] for r in last) / len(last) * 16 * 16
print(f"{sys.argv[1]:14s} {sec:6.2f} s/step {tokens / sec:6.0f} target tokens/s")
PY
}
for _ in $(seq "$ROUNDS"); do
  for v in "${variants[@]}"; do one "$v"; done
done
