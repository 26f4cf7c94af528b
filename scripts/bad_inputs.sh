#!/usr/bin/env bash
# Bad inputs, tried as a user would type them: each row is one command line, the first line of
# the error it gets, its exit status and the wall time to fail. Prints a Markdown table.
# Needs a release build and scripts/fetch_models.sh; writes only under a temporary directory.
#
# Usage: scripts/bad_inputs.sh [BIN]   (default target/release/refrag)
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
BIN="${1:-target/release/refrag}"
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT
head -n 40 data/corpus_small.txt > "$T/corpus.txt"
"$BIN" index --corpus "$T/corpus.txt" --index_dir "$T/idx" --quiet > /dev/null 2>&1 \
  || { echo "bad_inputs.sh: could not build the small index" >&2; exit 1; }
printf '' > "$T/empty.txt"
printf '{"id": "a", "question": "Where?", "answers": ["x"]}\n{"id": "b", "question": \n' > "$T/broken.jsonl"
head -c 100000 models/SmolLM2-135M-Instruct.Q4_1.gguf > "$T/truncated.gguf"
mkdir -p "$T/badweights" && printf '{"stage": ' > "$T/badweights/config.json"
long="$(python3 -c 'print("why " * 9000)')"
G=(generate --index_dir "$T/idx" --quiet)
run() { # description, then the arguments
  local what="$1"; shift
  local t0 t1 out rc
  t0=$(date +%s.%N)
  out="$("$BIN" "$@" 2>&1 > /dev/null)"; rc=$?
  t1=$(date +%s.%N)
  local line
  line="$(printf '%s\n' "$out" | grep -v '^refrag: \(device\|using\|note\)\|has no chunk cache' | grep -m1 . | sed 's/|/\\|/g')"
  printf '| %s | `%s` | %d | %.2f |\n' "$what" "$line" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')"
}
echo "| bad input | first line of the error | exit | seconds |"
echo "|---|---|---|---|"
run "empty question" "${G[@]}" --question "  "
run "--max_new 0" "${G[@]}" --question "Where?" --max_new 0
run "--p 1.5" "${G[@]}" --question "Where?" --p 1.5
run "--topk 0" "${G[@]}" --question "Where?" --topk 0
run "--k 0" "${G[@]}" --question "Where?" --k 0
run "context past the decoder's window" "${G[@]}" --question "Where?" --ctx_max 100000
run "question past the decoder's window" "${G[@]}" --question "$long"
run "missing index" generate --index_dir "$T/nope" --question "Where?" --quiet
run "damaged --load_dir config" "${G[@]}" --question "Where?" --load_dir "$T/badweights"
run "truncated GGUF decoder" "${G[@]}" --question "Where?" --dec "$T/truncated.gguf"
run "missing corpus" index --corpus "$T/nope.txt" --index_dir "$T/i2" --quiet
run "empty corpus" index --corpus "$T/empty.txt" --index_dir "$T/i3" --quiet
run "--passage_tokens 0" index --corpus "$T/corpus.txt" --index_dir "$T/i4" --passage_tokens 0 --quiet
run "index over an existing one" index --corpus "$T/corpus.txt" --index_dir "$T/idx" --quiet
run "search --topk 0" search --index_dir "$T/idx" --question "river" --topk 0
run "broken QA line (eval)" eval --rag_json "$T/broken.jsonl" --index_dir "$T/idx" --quiet --out "$T/e.json"
run "cpt_recon --steps 0" cpt_recon --train_json "$T/corpus.txt" --steps 0 --out_dir "$T/r" --quiet
run "cpt_recon missing data" cpt_recon --train_json "$T/nope.txt" --out_dir "$T/r" --quiet
run "cpt_recon --lr=-1" cpt_recon --train_json "$T/corpus.txt" --lr=-1 --out_dir "$T/r" --quiet
run "train_policy --select (not its flag)" train_policy --rag_json "$T/broken.jsonl" --index_dir "$T/idx" --select policy
run "bench --repeats 0" bench --repeats 0 --quiet
run "unknown flag" generate --index_dir "$T/idx" --question "Where?" --topk_typo 3
