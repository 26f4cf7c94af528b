#!/usr/bin/env bash
# refrag against real peers on this machine, side by side in one run, same model files:
#   decoding: the same SmolLM2 GGUF in llama-cpp-python (llama.cpp built from source by pip)
#             vs `refrag bench` (full context and REFRAG), time to first token and decode tok/s;
#   indexing: all-MiniLM-L6-v2 in sentence-transformers + faiss-cpu vs `refrag index`, on the
#             same corpus file (data/corpus_large.txt, 3,000 passages).
# Measure on an idle machine (no build, no training: two cores are easily disturbed).
# The peers live in a virtual environment OUTSIDE the repository (VENV, default ../peer-venv),
# made on the first run from PyPI (several minutes: llama-cpp-python compiles llama.cpp).
#
# Usage: scripts/bench_peers.sh        Environment: VENV, BIN, OUT (default runs/bench_peers),
#        THREADS (default: nproc), CONTEXTS (default 512,2048), MAX_NEW (default 32)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
VENV="${VENV:-$repo/../peer-venv}"; BIN="${BIN:-target/release/refrag}"
OUT="${OUT:-runs/bench_peers}"; THREADS="${THREADS:-$(nproc)}"
CONTEXTS="${CONTEXTS:-512,2048}"; MAX_NEW="${MAX_NEW:-32}"
GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf; ENC=models/all-MiniLM-L6-v2
CORPUS=data/corpus_large.txt
[ -f "$GGUF" ] && [ -d "$ENC" ] || { echo "bench_peers.sh: run scripts/fetch_models.sh first" >&2; exit 1; }
[ -x "$BIN" ] || { echo "bench_peers.sh: build first (cargo build --release): no $BIN" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # PyPI's torch brings CUDA libraries; PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
  # (where reachable) installs the much smaller CPU build instead.
  # llama-cpp-python 0.3.36 built with -march=native segfaulted on every multi-token prompt on
  # this AVX-512 + AMX CPU; built for AVX2 it runs (LLAMA_CMAKE_ARGS overrides).
  CMAKE_ARGS="${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF}" \
    "$VENV/bin/pip" install -q --no-cache-dir llama-cpp-python
  "$VENV/bin/pip" install -q faiss-cpu sentence-transformers
fi
mkdir -p "$OUT"
"$VENV/bin/python" scripts/bench_peers.py --gguf "$GGUF" --encoder "$ENC" --corpus "$CORPUS" \
  --contexts "$CONTEXTS" --max_new "$MAX_NEW" --threads "$THREADS" > "$OUT/peers.json"
# Ours, in the same run: full context and REFRAG (k 16, chunk vectors precomputed as the index's
# cache holds them), then indexing the same file without a chunk cache (what the peer builds).
RAYON_NUM_THREADS="$THREADS" OPENBLAS_NUM_THREADS="$THREADS" "$BIN" bench --contexts "$CONTEXTS" \
  --ks 16 --p 0,0.25 --cache on --max_new "$MAX_NEW" --no_weights --quiet --out_dir "$OUT/refrag" \
  > "$OUT/refrag_bench.txt"
t0=$(date +%s.%N)
RAYON_NUM_THREADS="$THREADS" OPENBLAS_NUM_THREADS="$THREADS" "$BIN" index --corpus "$CORPUS" \
  --index_dir "$OUT/index" --force --quiet > /dev/null
t1=$(date +%s.%N)
# The same with 8-bit products (index --int8; f32 where the CPU has no AVX-512 VNNI).
RAYON_NUM_THREADS="$THREADS" OPENBLAS_NUM_THREADS="$THREADS" "$BIN" index --corpus "$CORPUS" \
  --index_dir "$OUT/index_int8" --force --quiet --int8 > /dev/null
t2=$(date +%s.%N)
python3 - "$OUT" "$t0" "$t1" "$t2" <<'PY'
import json, sys
out, t0, t1, t2 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
peers = json.load(open(f"{out}/peers.json"))
ours = json.load(open(f"{out}/refrag/bench.json"))
rows = ours["rows"] if isinstance(ours, dict) and "rows" in ours else ours
print("| context | llama.cpp TTFT s | refrag full TTFT s | refrag p=0 TTFT s | refrag p=0.25 TTFT s "
      "| llama.cpp decode tok/s | refrag full decode tok/s | refrag p=0.25 decode tok/s |")
print("|---|---|---|---|---|---|---|---|")
for p in peers["llama_cpp"]:
    n = p["context"]
    mine = [r for r in rows if r["context_tokens"] == n and r["k"] == 16]
    by_p = {round(r["p"], 2): r for r in mine}
    if not mine:
        continue
    full = mine[0]
    print(f"| {n} | {p['ttft_sec']:.3f} | {full['ttft_full_sec']:.3f} | "
          f"{by_p[0.0]['ttft_refrag_sec']:.3f} | {by_p[0.25]['ttft_refrag_sec']:.3f} | "
          f"{p['decode_tokens_per_sec']:.1f} | {full['tokens_per_sec_full']:.1f} | "
          f"{by_p[0.25]['tokens_per_sec']:.1f} |")
s = peers["sentence_transformers_faiss"]
print(f"\nindexing {s['passages']} passages: sentence-transformers + faiss {s['index_sec']:.1f} s "
      f"(+ {s['load_sec']:.1f} s loading), refrag index {t1 - t0:.1f} s (loading included), "
      f"refrag index --int8 {t2 - t1:.1f} s")
print("versions:", json.dumps(peers["versions"]))
PY
