#!/usr/bin/env python3
"""The policy's mixed training set (session 13): the SQuAD-train training articles' questions
(runs/squad/train_qa_small.jsonl, from scripts/squad_split.py) and the synthetic data/rag_train.jsonl,
shuffled together, over one corpus of both (the SQuAD training paragraphs, then
data/corpus_large.txt). A policy fitted on real questions alone learns Wikipedia's answer
positions and misses the synthetic records' (the quickstart's question); on both it fits both.

Usage: python3 scripts/mix_qa.py [OUT_DIR]   (default runs/mix): writes OUT_DIR/corpus.txt and
OUT_DIR/qa.jsonl; then `refrag index --corpus OUT_DIR/corpus.txt --index_dir OUT_DIR/index`.
"""
import os
import random
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "runs/mix"
os.makedirs(out, exist_ok=True)


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [l if l.endswith("\n") else l + "\n" for l in f if l.strip()]


corpus = lines("runs/squad/train_corpus.txt") + lines("data/corpus_large.txt")
rows = lines("runs/squad/train_qa_small.jsonl") + lines("data/rag_train.jsonl")
random.Random(13).shuffle(rows)
for name, data in (("corpus.txt", corpus), ("qa.jsonl", rows)):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(data)
    os.replace(tmp, os.path.join(out, name))
print(f"{out}: {len(corpus)} passages, {len(rows)} questions", file=sys.stderr)
