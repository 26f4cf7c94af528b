//! `refrag make_corpus`: write the synthetic data set (corpora, QA pairs, CPT items and their
//! README) into `--out_dir`, refusing to overwrite any existing file unless `--force` is given.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Result};

use crate::cli::MakeCorpusArgs;
use crate::io::jsonio::{to_jsonl, write_atomic};
use crate::io::schema::QaPair;
use crate::synthetic::{self, DataSet};

/// The file `--mega N` adds.
pub const MEGA_FILE: &str = "corpus_mega.txt";

/// One output file: its name in `--out_dir`, its bytes, and what it holds (for the log).
struct OutFile {
    name: &'static str,
    bytes: Vec<u8>,
    what: String,
}

pub fn run(args: &MakeCorpusArgs) -> Result<()> {
    if let Some(n) = args.mega {
        if n < synthetic::LARGE_PASSAGES {
            bail!(
                "--mega {n}: the mega corpus extends corpus_large, so it needs at least {} passages",
                synthetic::LARGE_PASSAGES
            );
        }
    }
    let ds = synthetic::generate(args.seed);
    let mut files = data_files(&ds)?;
    if let Some(n) = args.mega {
        let mega = synthetic::mega_corpus(args.seed, n);
        files.push(corpus_file(MEGA_FILE, &mega));
    }
    if !args.force {
        refuse_existing(&args.out_dir, &files)?;
    }
    for f in &files {
        let path = args.out_dir.join(f.name);
        write_atomic(&path, &f.bytes)?;
        eprintln!(
            "wrote {} ({}, {} bytes)",
            path.display(),
            f.what,
            f.bytes.len()
        );
    }
    Ok(())
}

/// Fail, naming the first file of the set that already exists, before anything is written.
fn refuse_existing(dir: &Path, files: &[OutFile]) -> Result<()> {
    for f in files {
        let path = dir.join(f.name);
        // symlink_metadata: a dangling link counts as existing too.
        if std::fs::symlink_metadata(&path).is_ok() {
            bail!(
                "{} already exists; pass --force to overwrite the data set (nothing was written)",
                path.display()
            );
        }
    }
    Ok(())
}

fn corpus_file(name: &'static str, passages: &[String]) -> OutFile {
    OutFile {
        name,
        bytes: synthetic::corpus_text(passages).into_bytes(),
        what: format!("{} passages", passages.len()),
    }
}

/// The seven files of the data set, formatted, in the order they are written.
fn data_files(ds: &DataSet) -> Result<Vec<OutFile>> {
    let qa_file = |name, rows: &[QaPair]| -> Result<OutFile> {
        Ok(OutFile {
            name,
            bytes: to_jsonl(rows)?.into_bytes(),
            what: format!("{} QA pairs", rows.len()),
        })
    };
    Ok(vec![
        corpus_file("corpus_small.txt", ds.corpus_small()),
        corpus_file("corpus_medium.txt", ds.corpus_medium()),
        corpus_file("corpus_large.txt", &ds.corpus_large),
        qa_file("rag_train.jsonl", &ds.rag_train)?,
        qa_file("rag_test.jsonl", &ds.rag_test)?,
        OutFile {
            name: "cpt_train.jsonl",
            bytes: to_jsonl(&ds.cpt)?.into_bytes(),
            what: format!("{} CPT items", ds.cpt.len()),
        },
        OutFile {
            name: "README_DATA.md",
            bytes: readme(ds).into_bytes(),
            what: "the data set's description".into(),
        },
    ])
}

/// How many of `qa`'s questions ask about an entity within the first `n` passages.
fn within(qa: &[QaPair], n: usize) -> usize {
    qa.iter()
        .filter(|q| {
            synthetic::question_entity(&q.question)
                .and_then(synthetic::entity_passage_index)
                .is_some_and(|i| i < n)
        })
        .count()
}

/// The first city question, as its JSONL line.
fn example(qa: &[QaPair]) -> String {
    let q = qa
        .iter()
        .find(|q| q.id.starts_with("city-"))
        .unwrap_or(&qa[0]);
    serde_json::to_string(q).unwrap_or_default()
}

/// `README_DATA.md`. Nothing in it may vary between runs (no dates): it is compared byte for byte.
fn readme(ds: &DataSet) -> String {
    let mut s = String::new();
    readme_files(&mut s, ds);
    readme_passages(&mut s);
    readme_qa(&mut s, ds);
    readme_cpt(&mut s, ds);
    s
}

fn readme_files(s: &mut String, ds: &DataSet) {
    let seed = ds.seed;
    let _ = write!(
        s,
        "# REFRAG synthetic data set\n\n\
         Synthetic, templated data for testing the REFRAG pipeline, written by\n\
         `refrag make_corpus --out_dir data --seed {seed}`. The generator is deterministic: the same\n\
         seed gives byte-identical files on every machine (a test regenerates these files and\n\
         compares them byte for byte). To regenerate (`--force` is needed because make_corpus\n\
         never overwrites existing files without it):\n\n\
         ```bash\nrefrag make_corpus --out_dir data --force\n```\n\n\
         ## Files\n\n\
         | file | contents |\n|---|---|\n\
         | `corpus_small.txt` | {} passages, one per line: the first lines of `corpus_large.txt` (for CI) |\n\
         | `corpus_medium.txt` | {} passages: the first lines of `corpus_large.txt` |\n\
         | `corpus_large.txt` | {} passages |\n\
         | `rag_train.jsonl` | {} QA pairs `{{\"id\", \"question\", \"answers\"}}` |\n\
         | `rag_test.jsonl` | {} QA pairs about entities that `rag_train.jsonl` never asks about |\n\
         | `cpt_train.jsonl` | {} long texts `{{\"id\", \"tokens\", \"split\": {{\"s\", \"o\"}}}}` for continual pretraining |\n\n\
         `refrag make_corpus --mega N` also writes `corpus_mega.txt` with N passages (N ≥ {}; 10,000+\n\
         is typical), generated the same way: its first {} lines are `corpus_large.txt`. It is not\n\
         committed.\n\n",
        synthetic::SMALL_PASSAGES,
        synthetic::MEDIUM_PASSAGES,
        synthetic::LARGE_PASSAGES,
        ds.rag_train.len(),
        ds.rag_test.len(),
        ds.cpt.len(),
        synthetic::LARGE_PASSAGES,
        synthetic::LARGE_PASSAGES,
    );
}

fn readme_passages(s: &mut String) {
    s.push_str(
        "## Passages\n\n\
         Four templates take turns: line 4k+1 (1-based) is a city (`TITLE: Atlas Entry — City_…`),\n\
         4k+2 an alloy (`Encyclopedia of Materials`), 4k+3 a biography, 4k+4 a historical event.\n\
         City passages end in a Spanish and a Chinese sentence; the others end in one a third of\n\
         the time each, to stress tokenization.\n\n\
         Each passage is about the entity named in its title, numbered per kind from 10000:\n\
         `City_10000`, `Alloy_10000`, `Person_10000`, `Event_10000`, then `City_10001`, …  The\n\
         passage about `<Kind>_<n>` is line 4·(n − 10000) + o + 1 with o = 0, 1, 2, 3 for city,\n\
         alloy, person, event (`synthetic::entity_passage_index` computes it). Five-digit names are\n\
         used for passage subjects only; every other name (`River_033`, a city's notable\n\
         `Person_0092`, an event's `City_042`) has at most four digits and no passage of its own.\n\
         So an entity's name occurs in exactly one passage, the one about it, and no entity name\n\
         is a prefix of another (for corpora up to 360,000 passages).\n\n",
    );
}

fn readme_qa(s: &mut String, ds: &DataSet) {
    let (train, test) = (&ds.rag_train, &ds.rag_test);
    let _ = write!(
        s,
        "## QA pairs\n\n\
         The seed's seven question types: about a city, \"Which river flows through City_n?\"\n\
         (`River_NNN`), \"Which country contains City_n?\" (`Country_NNN`), \"What is the primary\n\
         research institution in City_n?\" (`University_NNN`); about an alloy, \"What is the melting\n\
         point of Alloy_n?\" (e.g. `933 °C`); about a person, \"In which field does Person_n\n\
         work?\" (`Field_NN`), \"Where is Person_n affiliated?\" (`Institution_NNN`); about an\n\
         event, \"In what year did Event_n occur?\" (a year). Every question about an entity is\n\
         asked (3 per city, 2 per person, 1 per alloy or event); the types are evenly spread.\n\
         Ids follow the seed: `city-<n>-<first 16 characters of the question>` for kinds with\n\
         several questions, `alloy-<n>` / `event-<n>` otherwise. Lines are in corpus order.\n\n\
         Guarantees (checked by the tests):\n\n\
         - every question names one entity whose passage is in `corpus_large.txt`, and each answer\n  \
           string occurs literally, exactly once, in that passage;\n\
         - no entity is asked about in both `rag_train.jsonl` and `rag_test.jsonl`;\n\
         - {} train and {} test questions are about entities in `corpus_small.txt`, {} and {} in\n  \
           `corpus_medium.txt`; the rest need `corpus_large.txt` (or the mega corpus).\n\n\
         Example: `{}`\n\n",
        within(train, synthetic::SMALL_PASSAGES),
        within(test, synthetic::SMALL_PASSAGES),
        within(train, synthetic::MEDIUM_PASSAGES),
        within(test, synthetic::MEDIUM_PASSAGES),
        example(train),
    );
}

fn readme_cpt(s: &mut String, ds: &DataSet) {
    let chars: Vec<usize> = ds.cpt.iter().map(|c| c.tokens.chars().count()).collect();
    let (lo, hi) = (chars.iter().min(), chars.iter().max());
    let _ = write!(
        s,
        "## CPT items\n\n\
         Despite its name (kept from the seed's format), `tokens` is plain text: consecutive\n\
         passages of `corpus_large.txt` joined by single spaces, no filler, {} to {} characters.\n\
         Starts are spread evenly over the corpus, so neighbouring items overlap. Passages about\n\
         `rag_test.jsonl` entities are skipped: no training text holds a test answer.\n\n\
         `split` is `{{\"s\": {}, \"o\": {}}}` for every item. Both count decoder tokens (after\n\
         tokenization, not characters or words): the first `s` tokens are the context (for\n\
         reconstruction), the next `o` the continuation to predict. A trainer clips both to what\n\
         a text holds. Texts of {} or more characters hold more than s + o = {} tokens at\n\
         4 characters per token or fewer (a BERT WordPiece tokenizer gives about 3.8 here;\n\
         tokenizers that split digits give more tokens).\n",
        lo.unwrap_or(&0),
        hi.unwrap_or(&0),
        synthetic::CPT_S,
        synthetic::CPT_O,
        synthetic::CPT_MIN_CHARS,
        synthetic::CPT_S + synthetic::CPT_O,
    );
}
