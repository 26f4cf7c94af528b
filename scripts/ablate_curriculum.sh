#!/usr/bin/env bash
# The curriculum ablation of issue 10 / the paper's Table 11: two cpt_recon runs from the same
# fresh encoder + projector, the same steps, batch and learning rate, one with the curriculum
# (1 chunk, then 1-2, then 1-2-4) and one drawing from the final stage's mix from step 0; each
# evaluated at 1, 2, 4, 8 chunks on the held-out SQuAD articles (scripts/squad_split.py).
#
# With LORA=1 a third run repeats the curriculum with the decoder's rank-8 LoRA adapter
# training too (the frozen-decoder question of the schedule: does letting the decoder learn to
# read a chunk vector beat aligning the encoder alone, at the same budget?).
#
# Usage: scripts/ablate_curriculum.sh   Environment: STEPS (default 60), EVAL (held-out
# paragraphs, default 32), OUT (default runs/ablation), BIN, LORA (0).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
STEPS="${STEPS:-60}"; EVAL="${EVAL:-32}"; OUT="${OUT:-runs/ablation}"
BIN="${BIN:-target/release/refrag}"; LORA="${LORA:-0}"
W="${W:-$repo/../shared/data/wikitext/paragraphs.txt}"
[ -f runs/squad/dev_corpus.txt ] || python3 scripts/squad_split.py
mkdir -p "$OUT"
run() {
  local t0=$SECONDS
  "$BIN" cpt_recon --train_json "$W" --eval_json runs/squad/dev_corpus.txt --eval_items "$EVAL" \
    --k 16 --steps "$STEPS" --batch_size 16 --micro_batch 16 --lr 3e-4 --curriculum "$2" \
    --out_dir "$OUT/$1" --force --save_every 0 --log_every 10 --quiet "${@:3}" \
    > "$OUT/$1.json" 2> "$OUT/$1.err"
  echo $((SECONDS - t0)) > "$OUT/$1.wall"
}
run curriculum '1:1;1:2,2:1;1:2,2:1,4:1'
run no_curriculum '1:2,2:1,4:1'
runs=(curriculum no_curriculum)
if [ "$LORA" = 1 ]; then
  run curriculum_lora '1:1;1:2,2:1;1:2,2:1,4:1' --lora_rank 8 --dec_lr 3e-4
  runs+=(curriculum_lora)
fi
python3 - "$OUT" "${runs[@]}" <<'PY'
import json, sys
out = sys.argv[1]
rows = ["| run | " + " | ".join(f"{n} chunk{'s' * (n > 1)}: ppl (no chunk)" for n in (1, 2, 4, 8))
        + " | 1 chunk: token acc (no chunk) | wall s |", "|---|---|---|---|---|---|---|"]
for run in sys.argv[2:]:
    e = json.load(open(f"{out}/{run}/eval.json"))["end"]
    cells = [f"{e[f'recon_{n}_chunks']['ppl']:.1f} ({e[f'no_chunks_{n}']['ppl']:.1f})" for n in (1, 2, 4, 8)]
    acc = f"{e['recon_1_chunks']['token_acc']:.3f} ({e['no_chunks_1']['token_acc']:.3f})"
    wall = float(open(f"{out}/{run}.wall").read())
    rows.append(f"| {run} | " + " | ".join(cells) + f" | {acc} | {wall:.0f} |")
open(f"{out}/ablation.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
