//! `collabllm eval simulator`: whether the simulated user plays a person the way MR assumes. A
//! simulator that pastes its hidden goal into its first message makes every question
//! unnecessary, one that answers a question without the facts it was asked for makes asking
//! useless, and one that never ends (or ends at once) skews the turn counts; rewards built on
//! such a user reward the wrong thing. Measured on a contrast set: the ambiguous requests'
//! intents and asking replies, and the clear requests' delivered replies.

use serde::Serialize;

use super::contrast::Case;
use super::simulator::{self, Draft, SimulatedMessage};
use super::{derive_seed, CollabError, Roles};
use crate::engine::{ChatMessage, Role};
use crate::stats::{estimate, Estimate, Rate};

/// A first message leaks the intent when it holds at least this share of its content words.
const LEAK_SHARE: f64 = 0.5;
/// An answer carries the intent when it adds at least this many of its content words.
const FACTS_CARRIED: usize = 2;

/// What the simulator did on one case, one sample.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub case: String,
    pub kind: String,
    pub sample: u32,
    /// Ambiguous cases: the first message, the answer to the asking reply, and the share of the
    /// intent's content words the first message holds.
    pub first_message: Option<String>,
    pub leak_share: Option<f64>,
    pub answer: Option<String>,
    /// Content words of the intent the answer adds to the conversation.
    pub facts_added: Option<usize>,
    pub ended_after_question: Option<bool>,
    /// Clear cases: whether the user ended the chat once the text was delivered.
    pub ended_when_met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FidelityReport {
    pub simulator_model: String,
    pub samples: u32,
    /// The first message holds half or more of the hidden intent (should be rare).
    pub first_message_leaks: Rate,
    /// The answer to a clarifying question adds facts of the intent (should be most).
    pub answer_carries_intent: Rate,
    /// The user ends the chat right after being asked a question (should be rare).
    pub ends_after_question: Rate,
    /// The user ends the chat once what they asked for is delivered (should be most).
    pub ends_when_met: Rate,
    /// Words of the simulated messages (first messages and answers).
    pub message_words: Option<Estimate>,
    pub trials: Vec<Trial>,
}

/// The words that carry content: lower-cased, letters and digits, three characters or more
/// (names like Sam), or any number, less the commonest function words.
fn content_words(text: &str) -> Vec<String> {
    const COMMON: &[&str] = &[
        "the", "and", "for", "you", "are", "but", "not", "can", "his", "her", "she", "him", "our",
        "was", "has", "had", "any", "all", "one", "who", "how", "why", "its", "let", "may", "get",
        "got", "that", "this", "with", "from", "have", "what", "your", "they", "them", "their",
        "will", "would", "about", "some", "just", "like", "want", "need", "make", "write",
        "please", "could", "should", "there", "here", "also", "into", "than", "then", "when",
        "which", "were", "been", "very", "more", "much", "only", "over", "sure", "help", "thanks",
    ];
    let mut words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .filter(|w| {
            (w.chars().count() >= 3 || w.chars().all(|c| c.is_ascii_digit()) && !w.is_empty())
                && !COMMON.contains(&w.as_str())
        })
        .collect();
    words.sort();
    words.dedup();
    words
}

/// The share of `intent`'s content words that `message` holds.
fn leak_share(intent: &str, message: &str) -> f64 {
    let goal = content_words(intent);
    if goal.is_empty() {
        return 0.0;
    }
    let said = content_words(message);
    goal.iter().filter(|w| said.contains(w)).count() as f64 / goal.len() as f64
}

/// Content words of `intent` that `answer` holds and `before` did not.
fn facts_added(intent: &str, before: &[ChatMessage], answer: &str) -> usize {
    let known: Vec<String> = before
        .iter()
        .flat_map(|m| content_words(&m.content))
        .collect();
    let said = content_words(answer);
    content_words(intent)
        .into_iter()
        .filter(|w| said.contains(w) && !known.contains(w))
        .count()
}

/// The case's conversation with its expected reply appended: on an ambiguous request the
/// question that matters, on a clear one the delivered text.
fn with_expected_reply(case: &Case) -> Vec<ChatMessage> {
    let mut conversation = case.conversation.clone();
    conversation.push(ChatMessage::new(Role::Assistant, case.reply(case.expected)));
    conversation
}

/// Asks the simulator one message for each (case, conversation), as one group.
async fn messages(
    roles: &Roles,
    asks: &[(&Case, Vec<ChatMessage>, u32)],
) -> Result<Vec<SimulatedMessage>, CollabError> {
    let built = asks
        .iter()
        .map(|(case, conversation, seed)| {
            simulator::message_ask(
                roles,
                &case.task(),
                &case.goal(),
                conversation,
                Draft::Skip,
                *seed,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    simulator::next_messages(roles, &built)
        .await
        .into_iter()
        .collect()
}

/// Runs every measure over `cases`, `samples` times each; `progress` hears (steps done, all).
pub async fn run(
    roles: &Roles,
    cases: &[Case],
    samples: u32,
    seed: u64,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<FidelityReport, CollabError> {
    let ambiguous: Vec<&Case> = cases.iter().filter(|c| c.kind == "ambiguous").collect();
    let clear: Vec<&Case> = cases.iter().filter(|c| c.kind == "clear").collect();
    if ambiguous.is_empty() || clear.is_empty() {
        return Err(CollabError::Invalid(
            "the simulator check needs ambiguous and clear cases in the contrast set".into(),
        ));
    }
    let seed_of = |case: &Case, what: &str, sample: u32| {
        derive_seed(seed, &[&case.id, what, &sample.to_string()])
    };
    let steps = 3 * u64::from(samples);
    let mut trials = Vec::new();
    for sample in 0..samples {
        let step = 3 * u64::from(sample);
        // The opening message, from nothing but the hidden intent.
        let first = messages(
            roles,
            &ambiguous
                .iter()
                .map(|&c| (c, Vec::new(), seed_of(c, "first", sample)))
                .collect::<Vec<_>>(),
        )
        .await?;
        progress(step + 1, steps);
        // The answer to the question that matters.
        let asked: Vec<_> = ambiguous
            .iter()
            .map(|&c| (c, with_expected_reply(c), seed_of(c, "answer", sample)))
            .collect();
        let answers = messages(roles, &asked).await?;
        progress(step + 2, steps);
        // The reply once the text is delivered.
        let delivered: Vec<_> = clear
            .iter()
            .map(|&c| (c, with_expected_reply(c), seed_of(c, "delivered", sample)))
            .collect();
        let after = messages(roles, &delivered).await?;
        progress(step + 3, steps);
        for ((case, first), ((_, before, _), answer)) in
            ambiguous.iter().zip(first).zip(asked.iter().zip(answers))
        {
            trials.push(Trial {
                case: case.id.clone(),
                kind: case.kind.clone(),
                sample,
                leak_share: Some(leak_share(&case.intent, &first.response)),
                first_message: Some(first.response),
                facts_added: Some(facts_added(&case.intent, before, &answer.response)),
                ended_after_question: Some(answer.terminates),
                answer: Some(answer.response),
                ended_when_met: None,
            });
        }
        for (case, message) in clear.iter().zip(after) {
            trials.push(Trial {
                case: case.id.clone(),
                kind: case.kind.clone(),
                sample,
                first_message: None,
                leak_share: None,
                answer: None,
                facts_added: None,
                ended_after_question: None,
                ended_when_met: Some(message.terminates),
            });
        }
    }
    let flags = |pick: &dyn Fn(&Trial) -> Option<bool>| -> Vec<bool> {
        trials.iter().filter_map(pick).collect()
    };
    let words: Vec<f64> = trials
        .iter()
        .flat_map(|t| [&t.first_message, &t.answer])
        .flatten()
        .map(|m| m.split_whitespace().count() as f64)
        .collect();
    Ok(FidelityReport {
        simulator_model: roles.simulator.fingerprint(),
        samples,
        first_message_leaks: Rate::of(&flags(&|t| t.leak_share.map(|s| s >= LEAK_SHARE))),
        answer_carries_intent: Rate::of(&flags(&|t| t.facts_added.map(|n| n >= FACTS_CARRIED))),
        ends_after_question: Rate::of(&flags(&|t| t.ended_after_question)),
        ends_when_met: Rate::of(&flags(&|t| t.ended_when_met)),
        message_words: estimate(&words),
        trials,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_words_leave_out_short_and_common_words_but_keep_numbers() {
        assert_eq!(
            content_words("Write a 2-minute toast for my brother Sam, warm and funny!"),
            ["2", "brother", "funny", "minute", "sam", "toast", "warm"]
        );
    }

    #[test]
    fn a_pasted_intent_leaks_and_a_vague_opening_does_not() {
        let intent = "A toast for my brother Sam and his wife Lena; warm, funny, they met hiking.";
        assert!(
            leak_share(
                intent,
                "toast for my brother Sam and Lena, warm and funny, met hiking"
            ) >= LEAK_SHARE
        );
        assert!(leak_share(intent, "can you help me write a wedding toast?") < LEAK_SHARE);
    }

    #[test]
    fn only_facts_new_to_the_conversation_count_as_added() {
        let intent = "A toast for my brother Sam and his wife Lena; they met hiking.";
        let before = [ChatMessage::new(
            Role::User,
            "A toast for my brother please",
        )];
        assert_eq!(
            facts_added(intent, &before, "his name is Sam, hers Lena"),
            2
        );
        assert_eq!(facts_added(intent, &before, "it is for my brother"), 0);
    }
}
