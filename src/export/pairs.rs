//! Preference pairs from human signals, as JSONL in the conversational format TRL's `DPOTrainer`
//! reads: `prompt` (the messages before the compared reply, system prompt first), `chosen` and
//! `rejected` (one assistant message each), plus `metadata`.
//!
//! Sources: **comparisons** — at the protocol's comparison turns the participant picked one of
//! two candidate replies, and **regenerations** — the participant asked for another reply and
//! kept one of the two (a tie or "both bad" gives KTO rows, `prompt`/`completion`/`label`, in
//! separate files); **edits** — an assistant reply inserted into the document and then rewritten
//! by the participant beyond a threshold gives chosen = the participant's version of that passage,
//! rejected = the reply as generated. The passage is followed through every later revision by
//! mapping its start and end through each change.
//!
//! Pairs are split into train and eval by participant (never by row): a participant's pairs all
//! land in the same file, chosen by a hash of the pseudonym.

use crate::db::vocab::{MessageRole, RevisionAuthor};
use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{for_each_session, study_versions, ExportError};
use crate::db::provenance::Provenance;
use crate::db::{self, DbConn};

/// Default: a passage counts as rewritten when at least this share of it changed.
pub const DEFAULT_EDIT_THRESHOLD: f64 = 0.2;

#[derive(Debug, Clone, PartialEq)]
pub struct PairOptions {
    /// Share of the inserted reply that must have changed (0–1).
    pub edit_threshold: f64,
    /// Share of participants whose pairs go to the eval file (0–1).
    pub eval_share: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairCounts {
    pub train: u64,
    pub eval: u64,
    pub kto_train: u64,
    pub kto_eval: u64,
}

/// Maps a position of the old text to the new text through a character diff. `end` positions
/// stay after text inserted exactly there; start positions stay before it.
fn map_position(ops: &[similar::DiffOp], pos: usize, end: bool) -> usize {
    for op in ops {
        let (_, old, new) = op.as_tag_tuple();
        let inside = if end { pos <= old.end } else { pos < old.end };
        if old.start <= pos && (inside || old.is_empty() && pos == old.start) {
            return match op.tag() {
                similar::DiffTag::Equal => new.start + (pos - old.start),
                _ if end => new.end,
                _ => new.start,
            };
        }
    }
    ops.last().map_or(pos, |op| op.as_tag_tuple().2.end)
}

/// The final text of a passage inserted at revision `from` (as character positions `start..end`),
/// following `later` revisions.
fn follow(mut text: String, mut start: usize, mut end: usize, later: &[String]) -> String {
    for next in later {
        let diff = similar::TextDiff::from_chars(text.as_str(), next.as_str());
        let ops = diff.ops().to_vec();
        start = map_position(&ops, start, false);
        end = map_position(&ops, end, true).max(start);
        text = next.clone();
    }
    text.chars().skip(start).take(end - start).collect()
}

/// Share of `a` that differs from `b` (0 = same, 1 = nothing in common), by characters.
fn changed_share(a: &str, b: &str) -> f64 {
    1.0 - f64::from(similar::TextDiff::from_chars(a, b).ratio())
}

/// Whether a participant's pairs go to the eval file.
fn in_eval(pseudonym: &str, eval_share: f64) -> bool {
    let digest = Sha256::digest(pseudonym.as_bytes());
    let bucket = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    f64::from(bucket) / f64::from(u32::MAX) < eval_share
}

/// The four output files: DPO pairs and KTO rows, each split into train and eval.
struct Out {
    files: Vec<(std::path::PathBuf, std::io::BufWriter<std::fs::File>)>,
    counts: PairCounts,
}

impl Out {
    const NAMES: [&str; 4] = [
        "train.jsonl",
        "eval.jsonl",
        "kto_train.jsonl",
        "kto_eval.jsonl",
    ];

    fn create(dir: &Path) -> Result<Self, ExportError> {
        std::fs::create_dir_all(dir).map_err(|e| write_error(dir, e))?;
        let files = Self::NAMES
            .iter()
            .map(|name| {
                let path = dir.join(name);
                let file = std::fs::File::create(&path).map_err(|e| write_error(&path, e))?;
                Ok((path, std::io::BufWriter::new(file)))
            })
            .collect::<Result<_, ExportError>>()?;
        Ok(Self {
            files,
            counts: PairCounts::default(),
        })
    }

    fn write(&mut self, kto: bool, eval: bool, row: &Value) -> Result<(), ExportError> {
        let index = usize::from(kto) * 2 + usize::from(eval);
        let (path, file) = &mut self.files[index];
        serde_json::to_writer(&mut *file, row).map_err(|e| write_error(path, e.into()))?;
        file.write_all(b"\n").map_err(|e| write_error(path, e))?;
        let count = match (kto, eval) {
            (false, false) => &mut self.counts.train,
            (false, true) => &mut self.counts.eval,
            (true, false) => &mut self.counts.kto_train,
            (true, true) => &mut self.counts.kto_eval,
        };
        *count += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<PairCounts, ExportError> {
        for (path, file) in &mut self.files {
            file.flush().map_err(|e| write_error(path, e))?;
        }
        Ok(self.counts)
    }
}

fn write_error(path: &Path, source: std::io::Error) -> ExportError {
    ExportError::Write {
        path: path.display().to_string(),
        source,
    }
}

/// The conversation before message `seq`, system prompt first; `None` unless it ends with the
/// user's message (what TRL's conversational format needs).
fn prompt_before(
    system_prompt: &str,
    messages: &[crate::db::models::Message],
    seq: i32,
) -> Option<Vec<Value>> {
    let mut prompt = vec![json!({"role": "system", "content": system_prompt})];
    prompt.extend(
        messages
            .iter()
            .filter(|m| m.seq < seq)
            .map(|m| json!({"role": m.role, "content": m.content})),
    );
    (prompt.last()?["role"] == MessageRole::User.as_str()).then_some(prompt)
}

fn assistant(content: &str) -> Value {
    json!([{"role": "assistant", "content": content}])
}

/// Writes DPO pairs (`train.jsonl`, `eval.jsonl`) and KTO rows for ties and both-bad picks
/// (`kto_train.jsonl`, `kto_eval.jsonl`) of study `slug` into `dir`.
pub fn export(
    conn: &mut DbConn,
    slug: &str,
    options: &PairOptions,
    dir: &Path,
) -> Result<PairCounts, ExportError> {
    let study = db::studies::find_by_slug(conn, slug)?
        .ok_or_else(|| ExportError::UnknownStudy(slug.into()))?;
    let mut out = Out::create(dir)?;
    let versions = study_versions(conn, study.id)?;
    let ids: Vec<i64> = versions.keys().copied().collect();
    for_each_session(conn, &ids, |conn, s| {
        let version = &versions[&s.study_version_id];
        let Some(arm_name) = s.arm_id.and_then(|a| version.arms.get(&a)) else {
            return Ok(());
        };
        let Some(arm) = version.protocol.arm(arm_name) else {
            return Ok(());
        };
        let participant = db::participants::get(conn, s.participant_id)?;
        let messages = db::messages::list_for_session(conn, s.id)?;
        let eval_side = in_eval(&participant.pseudonym, options.eval_share);
        // The same keys in every row (null where one does not apply), so a reader infers one
        // schema: `seed` and `model_sha256` are those of the reply that is `chosen` (or the
        // `completion` of a KTO row), `seed_rejected` that of the `rejected` reply.
        let metadata = |source: &str,
                        seq: i32,
                        chosen: Option<&str>,
                        rejected: Option<&str>,
                        changed_share: Option<f64>| {
            let (chosen, rejected) = (
                chosen.and_then(Provenance::parse),
                rejected.and_then(Provenance::parse),
            );
            let model = chosen
                .as_ref()
                .or(rejected.as_ref())
                .map(|p| &p.fingerprint);
            let seed = |p: &Option<Provenance>| p.as_ref().and_then(|p| p.sampling.seed);
            json!({
                "source": source,
                "study": slug,
                "study_version": version.row.version,
                "protocol_sha256": version.row.protocol_sha256,
                "arm": arm_name,
                "session": s.public_id,
                "participant": participant.pseudonym,
                "turn": messages.iter().filter(|m| m.role == MessageRole::Assistant && m.seq < seq).count() + 1,
                "model_sha256": model,
                "seed": seed(&chosen),
                "seed_rejected": seed(&rejected),
                "changed_share": changed_share,
            })
        };

        // Picks between two candidates: comparison turns and regenerated replies. Candidates are
        // stored in pairs, in order, per turn.
        let candidates = db::candidates::list_for_session(conn, s.id)?;
        let mut by_turn: std::collections::BTreeMap<
            (&str, i32),
            Vec<&crate::db::models::Candidate>,
        > = Default::default();
        for c in candidates.iter().filter(|c| c.chosen.is_some()) {
            by_turn
                .entry((c.source.as_str(), c.after_seq))
                .or_default()
                .push(c);
        }
        for ((source, after_seq), picked) in by_turn {
            for pair in picked.chunks(2) {
                let [a, b] = pair[..] else { continue };
                let Some(prompt) = prompt_before(&arm.system_prompt, &messages, after_seq + 1)
                else {
                    continue;
                };
                // Two replies of the same text: a pick between them states no preference, and
                // a label of both is one label.
                let same = crate::engine::same_reply(&a.content, &b.content);
                match (a.chosen, b.chosen) {
                    (Some(x), Some(y)) if x != y && same => {}
                    (Some(x), Some(y)) if x != y => {
                        let (chosen, rejected) = if x { (a, b) } else { (b, a) };
                        let row = json!({
                            "prompt": prompt,
                            "chosen": assistant(&chosen.content),
                            "rejected": assistant(&rejected.content),
                            "metadata": metadata(
                                source,
                                after_seq + 1,
                                Some(&chosen.policy_json),
                                Some(&rejected.policy_json),
                                None,
                            ),
                        });
                        out.write(false, eval_side, &row)?;
                    }
                    (Some(label), _) => {
                        // A tie (both good) or both bad: no preference, but each reply is labelled.
                        for c in if same { vec![a] } else { vec![a, b] } {
                            let row = json!({
                                "prompt": prompt,
                                "completion": assistant(&c.content),
                                "label": label,
                                "metadata": metadata(
                                    source,
                                    after_seq + 1,
                                    Some(&c.policy_json),
                                    None,
                                    None,
                                ),
                            });
                            out.write(true, eval_side, &row)?;
                        }
                    }
                    _ => {}
                }
            }
        }

        // Edits: an inserted reply rewritten by the participant.
        let revisions = db::revisions::list_for_session(conn, s.id)?;
        for (i, rev) in revisions.iter().enumerate() {
            let Some(seq) = rev
                .message_seq
                .filter(|_| rev.author == RevisionAuthor::AssistantInsert)
            else {
                continue;
            };
            let Some(reply) = messages
                .iter()
                .find(|m| m.seq == seq && m.role == MessageRole::Assistant)
            else {
                continue;
            };
            // Where the reply went: the part of this revision that the previous one did not have.
            let before = if i == 0 {
                String::new()
            } else {
                revisions[i - 1].content.clone()
            };
            let diff = similar::TextDiff::from_chars(before.as_str(), rev.content.as_str());
            let Some(inserted) = diff
                .ops()
                .iter()
                .find(|op| op.tag() != similar::DiffTag::Equal)
            else {
                continue;
            };
            let span = inserted.as_tag_tuple().2;
            let later: Vec<String> = revisions[i + 1..]
                .iter()
                .map(|r| r.content.clone())
                .collect();
            let edited = follow(rev.content.clone(), span.start, span.end, &later);
            let edited = edited.trim();
            let changed = changed_share(reply.content.trim(), edited);
            if edited.is_empty() || changed < options.edit_threshold {
                continue;
            }
            let Some(prompt) = prompt_before(&arm.system_prompt, &messages, seq) else {
                continue;
            };
            let row = json!({
                "prompt": prompt,
                "chosen": assistant(edited),
                "rejected": assistant(&reply.content),
                "metadata": metadata("edit", seq, None, reply.policy_json.as_deref(), Some(changed)),
            });
            out.write(false, eval_side, &row)?;
        }
        Ok(())
    })?;
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passage_is_followed_through_later_edits() {
        let first = "Intro. Hello world. Outro.".to_string();
        let later = vec![
            "Intro. Hello brave new world. Outro.".to_string(),
            "Intro typed first. Hello brave new world! Outro.".to_string(),
        ];
        // "Hello world." sits at characters 7..19 of the first revision.
        assert_eq!(follow(first, 7, 19, &later), "Hello brave new world!");
    }

    #[test]
    fn changed_share_measures_rewrites() {
        assert_eq!(changed_share("same", "same"), 0.0);
        assert!(
            changed_share(
                "Thanks for the plants",
                "Thank you so much for watering my plants!"
            ) > 0.2
        );
    }

    #[test]
    fn the_split_is_stable_per_participant() {
        assert_eq!(in_eval("p-1", 0.5), in_eval("p-1", 0.5));
        assert!(!in_eval("p-1", 0.0));
        assert!(in_eval("p-1", 1.0));
        let share = (0..1000)
            .filter(|i| in_eval(&format!("p-{i}"), 0.2))
            .count();
        assert!((150..250).contains(&share), "{share}");
    }
}
