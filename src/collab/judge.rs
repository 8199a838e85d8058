//! The LLM judge: the document a conversation ended with, how interactive the assistant was, and
//! optionally the document's quality on the participants' 1–10 scale. Every answer is
//! grammar-constrained JSON with a short `thought` first, so the score follows a reason. The
//! `*_ask` functions build the questions so the rollouts of a turn can be judged as one group.

use minijinja::context;
use serde_json::{Map, Value};

use super::structured::{self, Ask, Field, Shape};
use super::{judged_transcript, transcript, CollabError, Roles, Task};
use crate::engine::ChatMessage;

const MAX_THOUGHT_CHARS: u32 = 300;

/// Interactivity is rated from 1 to this and read as 0–1.
const INTERACTIVITY_SCALE: u8 = 5;

pub(super) const WHO: &str = "judge";

/// A question about `conversation`, asked with the prompt `name`.
fn conversation_ask(
    roles: &Roles,
    name: &str,
    task: &Task,
    conversation: &[ChatMessage],
    shape: Shape,
    seed: u32,
) -> Result<Ask, CollabError> {
    let prompt = roles.prompts.render(
        name,
        context! {
            task_kind => task.kind,
            task_title => task.title,
            conversation => transcript(conversation),
        },
    )?;
    Ok(Ask {
        prompt,
        shape,
        seed,
    })
}

/// The question whose answer is the final document of `conversation`.
pub fn document_ask(
    roles: &Roles,
    task: &Task,
    conversation: &[ChatMessage],
    seed: u32,
) -> Result<Ask, CollabError> {
    let shape = Shape(vec![
        ("thought", Field::Text(MAX_THOUGHT_CHARS)),
        ("final_document", Field::Text(roles.spec.max_document_chars)),
    ]);
    conversation_ask(roles, "judge_document.md", task, conversation, shape, seed)
}

pub fn read_document(object: &Map<String, Value>) -> String {
    structured::text(object, "final_document")
}

/// The question whose answer rates the assistant's interactivity in `conversation` from the
/// message at `from` (the candidate) on; what came before is shown as context only, and no
/// shortening of the transcript drops the candidate.
pub fn interactivity_ask(
    roles: &Roles,
    task: &Task,
    conversation: &[ChatMessage],
    from: usize,
    seed: u32,
) -> Result<Ask, CollabError> {
    let mut fields = vec![("interactivity", Field::Rating(1, INTERACTIVITY_SCALE))];
    if roles.spec.judge_reasons {
        fields.insert(0, ("thought", Field::Text(MAX_THOUGHT_CHARS)));
    }
    let shape = Shape(fields);
    let (history, judged) = judged_transcript(conversation, from);
    let prompt = roles.prompts.render(
        "judge_interactivity.md",
        context! {
            task_kind => task.kind,
            task_title => task.title,
            history => history,
            judged => judged,
            reasons => roles.spec.judge_reasons,
            // For prompt files written before the split: the whole transcript.
            conversation => transcript(conversation),
        },
    )?;
    Ok(Ask {
        prompt,
        shape,
        seed,
    })
}

/// Interactivity (the 1–5 rating, expected under the judge's probabilities, read as 0–1) and
/// the judge's reason.
pub fn read_interactivity(object: &Map<String, Value>) -> (f64, String) {
    let rating = object["interactivity"].as_f64().unwrap_or(1.0);
    (
        (rating - 1.0) / f64::from(INTERACTIVITY_SCALE - 1),
        structured::text(object, "thought"),
    )
}

/// The question whose answer rates `document` from 1 to 10.
pub fn quality_ask(
    roles: &Roles,
    task: &Task,
    document: &str,
    seed: u32,
) -> Result<Ask, CollabError> {
    let prompt = roles.prompts.render(
        "judge_quality.md",
        context! {
            task_kind => task.kind,
            task_title => task.title,
            document => document,
        },
    )?;
    Ok(Ask {
        prompt,
        shape: Shape(vec![
            ("thought", Field::Text(MAX_THOUGHT_CHARS)),
            ("quality", Field::Integer(1, 10)),
        ]),
        seed,
    })
}

pub fn read_quality(object: &Map<String, Value>) -> i64 {
    object["quality"].as_i64().unwrap_or(1)
}

/// Asks the judge every question at once.
pub async fn ask_all(roles: &Roles, asks: &[Ask]) -> Vec<Result<Map<String, Value>, CollabError>> {
    structured::ask_all(&*roles.judge, WHO, &roles.spec.judge_sampling, asks).await
}

async fn ask_one(roles: &Roles, ask: Ask) -> Result<Map<String, Value>, CollabError> {
    structured::ask(&*roles.judge, WHO, &roles.spec.judge_sampling, ask).await
}

/// The final document of `conversation`, as the user would keep it.
pub async fn extract_document(
    roles: &Roles,
    task: &Task,
    conversation: &[ChatMessage],
    seed: u32,
) -> Result<String, CollabError> {
    let object = ask_one(roles, document_ask(roles, task, conversation, seed)?).await?;
    Ok(read_document(&object))
}

/// Interactivity of the assistant in `conversation` from the message at `from` on, 0–1, with
/// the judge's reason.
pub async fn interactivity(
    roles: &Roles,
    task: &Task,
    conversation: &[ChatMessage],
    from: usize,
    seed: u32,
) -> Result<(f64, String), CollabError> {
    let object = ask_one(
        roles,
        interactivity_ask(roles, task, conversation, from, seed)?,
    )
    .await?;
    Ok(read_interactivity(&object))
}

/// Quality of `document`, 1–10.
pub async fn quality(
    roles: &Roles,
    task: &Task,
    document: &str,
    seed: u32,
) -> Result<i64, CollabError> {
    let object = ask_one(roles, quality_ask(roles, task, document, seed)?).await?;
    Ok(read_quality(&object))
}
