//! The user simulator: an LLM that plays the participant. It sees the task, the hidden goal and
//! the conversation, and answers with JSON `{current_answer, thought, response}` (the draft only
//! where it is used) of which only `response` reaches the assistant. It ends the chat by writing
//! [`TERMINATE`].

use minijinja::context;
use serde_json::{Map, Value};

use super::structured::{self, Ask, Field, Shape};
use super::{transcript, CollabError, Goal, Roles, Task};
use crate::engine::ChatMessage;

/// The marker with which the simulated user ends a conversation.
pub const TERMINATE: &str = "[[TERMINATE CHAT]]";

/// Longest `thought` and `response` of a simulated message (characters).
const MAX_THOUGHT_CHARS: u32 = 300;
const MAX_RESPONSE_CHARS: u32 = 600;

const WHO: &str = "user simulator";

/// Whether the simulated user also writes down the document as they would keep it now. Only a
/// simulated participant uses it (it saves it to the study's document); rollouts, synthetic
/// conversations and evaluations do not, and skipping it saves up to a document's tokens a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draft {
    Keep,
    Skip,
}

/// One message of the simulated user.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedMessage {
    /// The document as the user would keep it now (empty when the draft was skipped).
    pub current_answer: String,
    pub thought: String,
    /// What is sent, without the marker.
    pub response: String,
    /// The user ended the conversation.
    pub terminates: bool,
}

/// The question whose answer is the user's next message after `conversation`.
pub fn message_ask(
    roles: &Roles,
    task: &Task,
    goal: &Goal,
    conversation: &[ChatMessage],
    draft: Draft,
    seed: u32,
) -> Result<Ask, CollabError> {
    let prompt = roles.prompts.render(
        "user_simulator.md",
        context! {
            task_kind => task.kind,
            task_title => task.title,
            task_instructions => task.instructions,
            goal => goal.describe(),
            conversation => transcript(conversation),
            with_draft => draft == Draft::Keep,
            reasons => roles.spec.simulator_reasons,
        },
    )?;
    let mut fields = vec![("response", Field::Text(MAX_RESPONSE_CHARS))];
    if roles.spec.simulator_reasons {
        fields.insert(0, ("thought", Field::Text(MAX_THOUGHT_CHARS)));
    }
    if draft == Draft::Keep {
        fields.insert(
            0,
            ("current_answer", Field::Text(roles.spec.max_document_chars)),
        );
    }
    Ok(Ask {
        prompt,
        shape: Shape(fields),
        seed,
    })
}

fn read_message(object: &Map<String, Value>) -> SimulatedMessage {
    let raw = structured::text(object, "response");
    let terminates = raw.contains(TERMINATE);
    let mut response = raw.replace(TERMINATE, "").trim().to_string();
    if response.is_empty() && !terminates {
        // A person who has nothing to add still says something.
        response = "ok".into();
    }
    SimulatedMessage {
        current_answer: structured::text(object, "current_answer"),
        thought: structured::text(object, "thought"),
        response,
        terminates,
    }
}

/// The next messages of several conversations, asked as one group.
pub async fn next_messages(
    roles: &Roles,
    asks: &[Ask],
) -> Vec<Result<SimulatedMessage, CollabError>> {
    structured::ask_all(&*roles.simulator, WHO, &roles.spec.simulator_sampling, asks)
        .await
        .into_iter()
        .map(|r| r.map(|object| read_message(&object)))
        .collect()
}

/// The user's next message after `conversation`.
pub async fn next_message(
    roles: &Roles,
    task: &Task,
    goal: &Goal,
    conversation: &[ChatMessage],
    draft: Draft,
    seed: u32,
) -> Result<SimulatedMessage, CollabError> {
    let ask = message_ask(roles, task, goal, conversation, draft, seed)?;
    next_messages(roles, &[ask])
        .await
        .pop()
        .expect("one answer per question")
}

/// A question the study asks the simulated participant: a rating scale, a pick between replies,
/// or a free-text answer.
#[derive(Debug, Clone)]
pub enum Question {
    Scale {
        question: String,
        min: i32,
        max: i32,
        min_label: String,
        max_label: String,
    },
    Choice {
        question: String,
        choices: Vec<String>,
    },
    Text {
        question: String,
        max_chars: u32,
    },
}

/// The simulated participant's answer: a number, a choice or a text.
pub async fn answer(
    roles: &Roles,
    task: &Task,
    goal: &Goal,
    conversation: &[ChatMessage],
    document: &str,
    question: &Question,
    seed: u32,
) -> Result<Value, CollabError> {
    let (text, field, choices, range) = match question {
        Question::Scale {
            question,
            min,
            max,
            min_label,
            max_label,
        } => (
            question,
            Field::Integer(*min, *max),
            String::new(),
            (*min, *max, min_label.as_str(), max_label.as_str()),
        ),
        Question::Choice { question, choices } => (
            question,
            Field::Choice(choices.clone()),
            choices.join(", "),
            (0, 0, "", ""),
        ),
        Question::Text {
            question,
            max_chars,
        } => (
            question,
            Field::Text((*max_chars).min(MAX_RESPONSE_CHARS)),
            String::new(),
            (0, 0, "", ""),
        ),
    };
    let prompt = roles.prompts.render(
        "user_rating.md",
        context! {
            task_kind => task.kind,
            task_title => task.title,
            task_instructions => task.instructions,
            goal => goal.describe(),
            conversation => transcript(conversation),
            document => document,
            question => text,
            choices => choices,
            free_text => matches!(question, Question::Text { .. }),
            min => range.0,
            max => range.1,
            min_label => range.2,
            max_label => range.3,
        },
    )?;
    let ask = Ask {
        prompt,
        shape: Shape(vec![
            ("thought", Field::Text(MAX_THOUGHT_CHARS)),
            ("answer", field),
        ]),
        seed,
    };
    let mut object =
        structured::ask(&*roles.simulator, WHO, &roles.spec.simulator_sampling, ask).await?;
    Ok(object.remove("answer").unwrap_or_default())
}
