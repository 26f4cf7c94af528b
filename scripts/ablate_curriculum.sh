#!/usr/bin/env bash
# The curriculum ablation of issue 10 / the paper's Table 11: two cpt_recon runs from the same
# fresh encoder + projector, the same steps, batch and learning rate, one with the curriculum
# (1 chunk, then 1-2, then 1-2-4) and one drawing from the final stage's mix from step 0; each
# evaluated at 1, 2, 4, 8 chunks on the held-out SQuAD articles (scripts/squad_split.py).
#
# Usage: scripts/ablate_curriculum.sh   Environment: STEPS (default 60), EVAL (held-out
# paragraphs, default 32), OUT (default runs/ablation), BIN.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
STEPS="${STEPS:-60}"; EVAL="${EVAL:-32}"; OUT="${OUT:-runs/ablation}"
BIN="${BIN:-target/release/refrag}"
W="${W:-$repo/../shared/data/wikitext/paragraphs.txt}"
[ -f runs/squad/dev_corpus.txt ] || python3 scripts/squad_split.py
mkdir -p "$OUT"
run() {
  "$BIN" cpt_recon --train_json "$W" --eval_json runs/squad/dev_corpus.txt --eval_items "$EVAL" \
    --k 16 --steps "$STEPS" --batch_size 16 --micro_batch 16 --lr 3e-4 --curriculum "$2" \
    --out_dir "$OUT/$1" --force --save_every 0 --log_every 10 --quiet > "$OUT/$1.json" 2> "$OUT/$1.err"
}
run curriculum '1:1;1:2,2:1;1:2,2:1,4:1'
run no_curriculum '1:2,2:1,4:1'
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = ["| run | " + " | ".join(f"{n} chunk{'s' * (n > 1)}: ppl (no chunk)" for n in (1, 2, 4, 8)) + " |",
        "|---|---|---|---|---|"]
for run in ("curriculum", "no_curriculum"):
    e = json.load(open(f"{out}/{run}/eval.json"))["end"]
    cells = [f"{e[f'recon_{n}_chunks']['ppl']:.1f} ({e[f'no_chunks_{n}']['ppl']:.1f})" for n in (1, 2, 4, 8)]
    rows.append(f"| {run} | " + " | ".join(cells) + " |")
open(f"{out}/ablation.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
