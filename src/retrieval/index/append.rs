//! `index --append`: which passages of the new index come from the old one and which must be
//! embedded.
//!
//! Documents are matched by name ([`super::DocumentEntry::source`]). The old index's documents
//! that `--corpus` does not hold come first, in their old order; then every document of
//! `--corpus` in corpus order: one the index holds with the same content hash keeps its passages
//! (and their stored vectors and cached chunks), a changed or new one gets its new passages,
//! embedded now. Appending the corpus an index was built from after changing or adding files
//! thus gives the index a full rebuild would, passage ids included; with `prune` (`--prune`)
//! the old documents that `--corpus` does not hold are dropped instead of kept in front, so
//! after deleting files too the result equals a rebuild.

use anyhow::{bail, Result};

use super::documents::Document;
use super::{DocumentEntry, PassageRecord, SourcedPassage};

/// Where a passage of the new index comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Passage `id` of the old index.
    Old(usize),
    /// The `j`-th passage to embed.
    New(usize),
}

/// The new index's passages and documents.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub passages: Vec<SourcedPassage>,
    pub from: Vec<Origin>,
    pub documents: Vec<DocumentEntry>,
    /// Texts to embed, in [`Origin::New`] order.
    pub to_embed: Vec<String>,
    pub added: usize,
    pub replaced: usize,
    pub unchanged: usize,
    /// Old documents dropped because `--corpus` no longer holds them (`prune`).
    pub removed: usize,
}

impl Plan {
    fn push_new(&mut self, d: &Document) {
        for p in &d.passages {
            self.from.push(Origin::New(self.to_embed.len()));
            self.to_embed.push(p.text.clone());
            self.passages.push(p.clone());
        }
        self.documents.push(entry(d));
    }
}

fn entry(d: &Document) -> DocumentEntry {
    DocumentEntry {
        source: d.source.clone(),
        sha256: d.sha256.clone(),
        passages: d.passages.len(),
    }
}

/// Plan the new index from the old one's documents and passages and the documents read now.
/// With `prune`, the old documents that `new` does not hold are dropped (counted in
/// [`Plan::removed`]) instead of kept in front.
pub fn plan(
    old_docs: &[DocumentEntry],
    old: &[PassageRecord],
    new: &[Document],
    prune: bool,
) -> Result<Plan> {
    if old_docs.iter().map(|d| d.passages).sum::<usize>() != old.len() {
        bail!("the manifest's documents do not add up to its passages; rebuild the index");
    }
    let mut plan = Plan {
        passages: Vec::new(),
        from: Vec::new(),
        documents: Vec::new(),
        to_embed: Vec::new(),
        added: 0,
        replaced: 0,
        unchanged: 0,
        removed: 0,
    };
    let names: std::collections::HashSet<&str> = new.iter().map(|d| d.source.as_str()).collect();
    let mut kept = std::collections::HashMap::new();
    let mut first = 0;
    for od in old_docs {
        let ids = first..first + od.passages;
        first = ids.end;
        if names.contains(od.source.as_str()) {
            kept.insert(od.source.as_str(), (od, ids));
        } else if prune {
            plan.removed += 1;
        } else {
            plan.push_old(od, ids, old)?;
        }
    }
    for d in new {
        match kept.get(d.source.as_str()) {
            Some((od, ids)) if od.sha256 == d.sha256 => {
                plan.unchanged += 1;
                plan.push_old(od, ids.clone(), old)?;
            }
            Some(_) => {
                plan.replaced += 1;
                plan.push_new(d);
            }
            None => {
                plan.added += 1;
                plan.push_new(d);
            }
        }
    }
    Ok(plan)
}

impl Plan {
    /// Keep the old passages `ids` of document `od`.
    fn push_old(
        &mut self,
        od: &DocumentEntry,
        ids: std::ops::Range<usize>,
        old: &[PassageRecord],
    ) -> Result<()> {
        for id in ids {
            let Some(source) = old[id].origin() else {
                bail!("passage {id} has no source (built by an older refrag); rebuild the index");
            };
            self.passages.push(SourcedPassage {
                text: old[id].text.clone(),
                source,
            });
            self.from.push(Origin::Old(id));
        }
        self.documents.push(od.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retrieval::index::PassageSource;

    fn doc(name: &str, sha: &str, texts: &[&str]) -> Document {
        Document {
            source: name.into(),
            sha256: sha.into(),
            passages: texts
                .iter()
                .map(|t| SourcedPassage {
                    text: t.to_string(),
                    source: PassageSource {
                        source: name.into(),
                        title: None,
                        span: [0, t.len()],
                    },
                })
                .collect(),
        }
    }

    #[test]
    fn changed_replaced_in_place_new_appended_unchanged_kept() {
        let old_docs = [
            doc("a", "1", &["a0", "a1"]),
            doc("b", "2", &["b0"]),
            doc("z", "4", &["z0"]),
        ];
        let entries: Vec<DocumentEntry> = old_docs.iter().map(entry).collect();
        let records: Vec<PassageRecord> = old_docs
            .iter()
            .flat_map(|d| &d.passages)
            .enumerate()
            .map(|(id, p)| PassageRecord {
                id,
                text: p.text.clone(),
                source: Some(p.source.source.clone()),
                title: None,
                span: Some(p.source.span),
            })
            .collect();
        let new = [
            doc("c", "3", &["c0"]),
            doc("a", "9", &["A0"]),
            doc("b", "2", &["b0"]),
        ];
        let p = plan(&entries, &records, &new, false).unwrap();
        let texts: Vec<&str> = p.passages.iter().map(|x| x.text.as_str()).collect();
        assert_eq!(texts, ["z0", "c0", "A0", "b0"]);
        let from = [
            Origin::Old(3),
            Origin::New(0),
            Origin::New(1),
            Origin::Old(2),
        ];
        assert_eq!(p.from, from);
        assert_eq!(p.to_embed, ["c0", "A0"]);
        assert_eq!((p.added, p.replaced, p.unchanged), (1, 1, 1));
        let names: Vec<&str> = p.documents.iter().map(|d| d.source.as_str()).collect();
        assert_eq!(names, ["z", "c", "a", "b"]);
        assert_eq!(p.removed, 0);
        assert!(plan(&entries, &records[..2], &new, false).is_err());
        // Pruned: "z", which the new corpus does not hold, goes; the rest is the same.
        let q = plan(&entries, &records, &new, true).unwrap();
        let texts: Vec<&str> = q.passages.iter().map(|x| x.text.as_str()).collect();
        assert_eq!(texts, ["c0", "A0", "b0"]);
        assert_eq!(q.from, from[1..]);
        assert_eq!((q.added, q.replaced, q.unchanged, q.removed), (1, 1, 1, 1));
    }
}
