#!/usr/bin/env python3
"""Split the SQuAD-train subset (../shared/data/squad-train, CC BY-SA: read in place, never
copied into this repository) into training and held-out articles, for refrag's own training and
development evaluation. Whole articles are held out: every 4th article in the file's order
(11 of 44), so no paragraph or question of a held-out article is ever trained on.

Writes into OUT (default runs/squad):
  train_corpus.txt  train_qa.jsonl   paragraphs and questions of the 33 training articles
  dev_corpus.txt    dev_qa.jsonl     the same for the 11 held-out articles
  split.json        which articles went where

Usage: scripts/squad_split.py [SQUAD_DIR] [OUT]   (stdlib only)
"""
import json
import os
import sys

src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "squad-train")
out = sys.argv[2] if len(sys.argv) > 2 else "runs/squad"
os.makedirs(out, exist_ok=True)
corpus = open(os.path.join(src, "corpus.txt"), encoding="utf-8").read().split("\n")
if corpus and corpus[-1] == "":
    corpus.pop()
qas = [json.loads(l) for l in open(os.path.join(src, "qa.jsonl"), encoding="utf-8") if l.strip()]
titles = []
for q in qas:
    if q["title"] not in titles:
        titles.append(q["title"])
dev_titles = set(titles[3::4])
article_of = {}
for q in qas:
    article_of.setdefault(q["passage"], q["title"])
parts = {"train": ([], []), "dev": ([], [])}
line_of = {"train": {}, "dev": {}}
for i, text in enumerate(corpus):
    t = article_of.get(i)
    if t is None:
        continue  # a paragraph no question refers to: no article known, left out of both
    side = "dev" if t in dev_titles else "train"
    line_of[side][i] = len(parts[side][0])
    parts[side][0].append(text)
for n, q in enumerate(qas):
    side = "dev" if q["title"] in dev_titles else "train"
    parts[side][1].append({"id": f"squad-{n + 1}", "question": q["question"],
                           "answers": q["answers"], "title": q["title"],
                           "passage": line_of[side][q["passage"]]})
for side, (paras, rows) in parts.items():
    with open(os.path.join(out, f"{side}_corpus.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(paras) + "\n")
    with open(os.path.join(out, f"{side}_qa.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{side}: {len(paras)} paragraphs, {len(rows)} questions", file=sys.stderr)
json.dump({"dev_articles": sorted(dev_titles),
           "train_articles": sorted(set(titles) - dev_titles)},
          open(os.path.join(out, "split.json"), "w"), indent=1)
