//! Results per arm, as the CollabLLM paper reports them: for completed sessions, the mean and 95%
//! bootstrap interval of the final ratings and of the periodic ratings, the periodic rating by
//! turn, time to completion (median and quartiles), turns, document words, assistant tokens and
//! time to first token. The bootstrap is seeded, so the same data give the same intervals.
//! [`charts`] lays them out for the console.

pub mod charts;

use std::collections::BTreeMap;

use crate::db::vocab::{MessageRole, Outcome, RevisionAuthor};

use crate::db::{self, DbConn, DbResult};
use crate::protocol::{Protocol, RatingWhen};
use crate::stats::{estimate, mean, spread, Estimate, Spread};

#[derive(Debug, Clone, PartialEq)]
pub struct ArmResults {
    pub arm: String,
    /// Completed sessions.
    pub n: usize,
    /// Final ratings by key.
    pub finals: BTreeMap<String, Option<Estimate>>,
    /// Each session's mean periodic rating, per key.
    pub periodic: BTreeMap<String, Option<Estimate>>,
    /// Mean periodic rating by turn, per key.
    pub by_turn: BTreeMap<String, Vec<(i32, f64)>>,
    pub minutes: Option<Spread>,
    pub turns: Option<Estimate>,
    pub words: Option<Estimate>,
    pub assistant_tokens: Option<Estimate>,
    pub ttft_ms: Option<Estimate>,
}

/// Results per arm of one study version, from its completed sessions: of people only
/// (`simulated` `Some(false)`), of simulated participants only (`Some(true)`), or of both.
pub fn per_arm(
    conn: &mut DbConn,
    version_id: i64,
    protocol: &Protocol,
    simulated: Option<bool>,
) -> DbResult<Vec<ArmResults>> {
    let arms = db::studies::arms_of(conn, version_id)?;
    let mut sessions = Vec::new();
    for s in db::sessions::list_for_version(conn, version_id)? {
        let participant = db::participants::get(conn, s.participant_id)?;
        if simulated.is_none_or(|wanted| wanted == participant.simulated) {
            sessions.push(s);
        }
    }
    let mut results = Vec::new();
    for arm in &arms {
        let mut finals: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut periodic: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut by_turn: BTreeMap<String, BTreeMap<i32, Vec<f64>>> = BTreeMap::new();
        let (mut minutes, mut turns, mut words, mut tokens, mut ttft) =
            (vec![], vec![], vec![], vec![], vec![]);
        let completed = sessions
            .iter()
            .filter(|s| s.arm_id == Some(arm.id) && s.outcome == Some(Outcome::Completed));
        let mut n = 0;
        for s in completed {
            n += 1;
            let mut own: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for r in db::ratings::list_for_session(conn, s.id)? {
                let when = protocol
                    .ratings
                    .iter()
                    .find(|spec| spec.id == r.rating_key)
                    .map(|spec| spec.when);
                let value = f64::from(r.value);
                if when == Some(RatingWhen::Final) {
                    finals.entry(r.rating_key).or_default().push(value);
                } else {
                    own.entry(r.rating_key.clone()).or_default().push(value);
                    by_turn
                        .entry(r.rating_key)
                        .or_default()
                        .entry(r.after_turn)
                        .or_default()
                        .push(value);
                }
            }
            for (key, values) in own {
                periodic.entry(key).or_default().extend(mean(&values));
            }
            let messages = db::messages::list_for_session(conn, s.id)?;
            let replies: Vec<_> = messages
                .iter()
                .filter(|m| m.role == MessageRole::Assistant)
                .collect();
            turns.push(messages.iter().filter(|m| m.is_turn()).count() as f64);
            tokens.push(
                replies
                    .iter()
                    .filter_map(|m| m.gen_tokens)
                    .map(f64::from)
                    .sum(),
            );
            ttft.extend(mean(
                &replies
                    .iter()
                    .filter_map(|m| m.ttft_ms)
                    .map(f64::from)
                    .collect::<Vec<_>>(),
            ));
            let document = db::revisions::latest(conn, s.id)?;
            words.push(document.map_or(0, |d| d.content.split_whitespace().count()) as f64);
            if let Some(end) = s.finished_at {
                minutes.push((end - s.started_at).num_milliseconds() as f64 / 60_000.0);
            }
        }
        results.push(ArmResults {
            arm: arm.name.clone(),
            n,
            finals: finals
                .iter()
                .map(|(k, v)| (k.clone(), estimate(v)))
                .collect(),
            periodic: periodic
                .iter()
                .map(|(k, v)| (k.clone(), estimate(v)))
                .collect(),
            by_turn: by_turn
                .into_iter()
                .map(|(k, turns)| {
                    (
                        k,
                        turns
                            .into_iter()
                            .filter_map(|(t, v)| mean(&v).map(|m| (t, m)))
                            .collect(),
                    )
                })
                .collect(),
            minutes: spread(&minutes),
            turns: estimate(&turns),
            words: estimate(&words),
            assistant_tokens: estimate(&tokens),
            ttft_ms: estimate(&ttft),
        });
    }
    Ok(results)
}

/// One piece of a revision's change against the previous revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Same(String),
    Added(String),
    Removed(String),
}

/// Who wrote the final document: characters typed by the participant and characters that came
/// from inserted assistant replies, following every revision's change. Returns, per revision,
/// the change against the previous one, and the (typed, inserted) character counts of the last.
pub fn authorship(revisions: &[(RevisionAuthor, String)]) -> (Vec<Vec<Change>>, usize, usize) {
    let mut owners: Vec<bool> = Vec::new(); // true: inserted from the assistant
    let mut previous = String::new();
    let mut changes = Vec::new();
    for (author, content) in revisions {
        let inserted = *author == RevisionAuthor::AssistantInsert;
        let diff = similar::TextDiff::from_chars(previous.as_str(), content.as_str());
        let mut next_owners = Vec::with_capacity(content.chars().count());
        let mut old_at = 0;
        let mut pieces: Vec<Change> = Vec::new();
        for change in diff.iter_all_changes() {
            let text = change.value();
            let n = text.chars().count();
            let piece = match change.tag() {
                similar::ChangeTag::Equal => {
                    next_owners.extend_from_slice(&owners[old_at..old_at + n]);
                    old_at += n;
                    Change::Same(text.to_string())
                }
                similar::ChangeTag::Delete => {
                    old_at += n;
                    Change::Removed(text.to_string())
                }
                similar::ChangeTag::Insert => {
                    next_owners.extend(std::iter::repeat_n(inserted, n));
                    Change::Added(text.to_string())
                }
            };
            match (pieces.last_mut(), piece) {
                (Some(Change::Same(a)), Change::Same(b))
                | (Some(Change::Added(a)), Change::Added(b))
                | (Some(Change::Removed(a)), Change::Removed(b)) => a.push_str(&b),
                (_, piece) => pieces.push(piece),
            }
        }
        owners = next_owners;
        previous = content.clone();
        changes.push(pieces);
    }
    let from_assistant = owners.iter().filter(|&&o| o).count();
    (changes, owners.len() - from_assistant, from_assistant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorship_follows_inserts_and_edits() {
        let revisions = [
            (RevisionAuthor::AssistantInsert, "Hello world".to_string()),
            (RevisionAuthor::User, "Hello brave world!".to_string()),
        ];
        let (changes, typed, inserted) = authorship(&revisions);
        assert_eq!(changes[0], vec![Change::Added("Hello world".into())]);
        assert!(
            changes[1].contains(&Change::Added("brave ".into())),
            "{:?}",
            changes[1]
        );
        assert_eq!((typed, inserted), (7, 11));
        assert_eq!(authorship(&[]), (vec![], 0, 0));
    }
}
