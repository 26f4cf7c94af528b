#!/usr/bin/env python3
"""The peers' side of scripts/bench_peers.sh: the same decoder GGUF in llama-cpp-python
(time to first token over a prompt of N tokens, then decode tokens/s), and the same encoder in
sentence-transformers + faiss-cpu (indexing a corpus file: encode every line, build a flat
inner-product index). Prints one JSON object. Run inside the venv bench_peers.sh makes.

Usage: bench_peers.py --gguf FILE --encoder DIR --corpus FILE [--contexts 512,2048]
       [--max_new 32] [--repeats 3] [--threads 2]
"""
import argparse
import json
import statistics
import time


def llama_rows(args):
    from llama_cpp import Llama

    llm = Llama(model_path=args.gguf, n_ctx=max(args.contexts) + args.max_new + 64,
                n_threads=args.threads, n_threads_batch=args.threads, n_batch=512,
                verbose=False, logits_all=False)
    text = " ".join(l.strip() for l in open(args.corpus, encoding="utf-8") if l.strip())
    corpus_ids = llm.tokenize(text.encode("utf-8"), add_bos=False)
    rows = []
    for n in args.contexts:
        prompt = [llm.token_bos()] + corpus_ids[: n - 1]
        ttft, tps = [], []
        for rep in range(args.repeats + 1):  # the first run warms up and is not counted
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            tok = llm.sample(temp=0.0)
            t1 = time.perf_counter()
            for _ in range(args.max_new):
                llm.eval([tok])
                tok = llm.sample(temp=0.0)
            t2 = time.perf_counter()
            if rep > 0:
                ttft.append(t1 - t0)
                tps.append(args.max_new / (t2 - t1))
        rows.append({"context": n, "ttft_sec": statistics.median(ttft),
                     "decode_tokens_per_sec": statistics.median(tps)})
    return rows


def index_row(args):
    import faiss
    import numpy as np
    from sentence_transformers import SentenceTransformer

    lines = [l.strip() for l in open(args.corpus, encoding="utf-8") if l.strip()]
    t0 = time.perf_counter()
    model = SentenceTransformer(args.encoder, device="cpu")
    t1 = time.perf_counter()
    vecs = model.encode(lines, batch_size=64, normalize_embeddings=True,
                        convert_to_numpy=True, show_progress_bar=False)
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    t2 = time.perf_counter()
    return {"passages": len(lines), "load_sec": t1 - t0, "index_sec": t2 - t1,
            "passages_per_sec": len(lines) / (t2 - t1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--max_new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.contexts = [int(x) for x in args.contexts.split(",")]
    import torch

    torch.set_num_threads(args.threads)
    out = {"llama_cpp": llama_rows(args), "sentence_transformers_faiss": index_row(args)}
    import llama_cpp
    import sentence_transformers

    out["versions"] = {"llama_cpp_python": llama_cpp.__version__,
                       "sentence_transformers": sentence_transformers.__version__,
                       "torch": torch.__version__}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
