//! Preference pairs read from TRL conversational JSONL and turned into the tokens serving sees.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::engine::chat_template::ChatTemplate;
use crate::engine::llama::LoadedModel;
use crate::engine::{ChatMessage, Role};

use super::TrainError;

/// One preference: a conversation and the reply preferred over another.
#[derive(Debug, Clone)]
pub struct Pair {
    pub prompt: Vec<ChatMessage>,
    pub chosen: String,
    pub rejected: String,
    /// The model the replies came from, as the export recorded it.
    pub model_sha256: Option<String>,
    /// `file:line`, for messages.
    pub origin: String,
}

/// The pairs of some JSONL files, with what was left out.
#[derive(Debug, Default)]
pub struct PairFiles {
    pub pairs: Vec<Pair>,
    /// (file, sha256) of every file read.
    pub files: Vec<(PathBuf, String)>,
    /// Rows that are KTO labels (`completion`/`label`), not pairs.
    pub kto_rows: usize,
}

/// Reads pairs from `paths`: every non-blank line must be a JSON object with `prompt` (messages),
/// `chosen` and `rejected` (an assistant message each); other keys are ignored.
pub fn read_pairs(paths: &[PathBuf]) -> Result<PairFiles, TrainError> {
    let mut out = PairFiles::default();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| TrainError::Input {
            at: path.display().to_string(),
            reason: e.to_string(),
        })?;
        out.files
            .push((path.clone(), crate::protocol::sha256_hex(&bytes)));
        for (i, line) in bytes.lines().enumerate() {
            let at = format!("{}:{}", path.display(), i + 1);
            let line = line.map_err(|e| TrainError::Input {
                at: at.clone(),
                reason: e.to_string(),
            })?;
            if line.trim().is_empty() {
                continue;
            }
            match parse_row(&line).map_err(|reason| TrainError::Input {
                at: at.clone(),
                reason,
            })? {
                Row::Pair(mut pair) => {
                    pair.origin = at;
                    out.pairs.push(pair);
                }
                Row::Kto => out.kto_rows += 1,
            }
        }
    }
    Ok(out)
}

enum Row {
    Pair(Pair),
    Kto,
}

fn parse_row(line: &str) -> Result<Row, String> {
    let row: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let Some(row) = row.as_object() else {
        return Err("a row must be a JSON object".into());
    };
    if !row.contains_key("chosen") && row.contains_key("completion") && row.contains_key("label") {
        return Ok(Row::Kto);
    }
    let prompt = match row.get("prompt") {
        Some(Value::Array(messages)) => messages
            .iter()
            .enumerate()
            .map(|(i, m)| message(m).map_err(|e| format!("prompt[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err("`prompt` must be a list of messages (TRL's conversational format)".into())
        }
        None => return Err("no `prompt`".into()),
    };
    if prompt.is_empty() {
        return Err("`prompt` has no messages".into());
    }
    let reply = |key: &str| -> Result<String, String> {
        let messages = match row.get(key) {
            Some(Value::Array(m)) => m,
            Some(_) => return Err(format!("`{key}` must be a list of one assistant message")),
            None => return Err(format!("no `{key}`")),
        };
        let [m] = messages.as_slice() else {
            return Err(format!(
                "`{key}` must hold exactly one assistant message, it has {}",
                messages.len()
            ));
        };
        let m = message(m).map_err(|e| format!("{key}: {e}"))?;
        if m.role != Role::Assistant {
            return Err(format!("`{key}` must be an assistant message"));
        }
        if m.content.trim().is_empty() {
            return Err(format!("`{key}` is empty"));
        }
        Ok(m.content)
    };
    let chosen = reply("chosen")?;
    let rejected = reply("rejected")?;
    let metadata = row.get("metadata");
    let model_sha256 = ["model_sha256", "policy_model_sha256"]
        .iter()
        .find_map(|k| metadata.and_then(|m| m.get(*k)).and_then(Value::as_str))
        .map(str::to_owned);
    Ok(Row::Pair(Pair {
        prompt,
        chosen,
        rejected,
        model_sha256,
        origin: String::new(),
    }))
}

fn message(m: &Value) -> Result<ChatMessage, String> {
    let role = match m.get("role").and_then(Value::as_str) {
        Some("system") => Role::System,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some(other) => return Err(format!("unknown role `{other}`")),
        None => return Err("a message needs a `role`".into()),
    };
    let Some(content) = m.get("content").and_then(Value::as_str) else {
        return Err("a message needs a text `content`".into());
    };
    Ok(ChatMessage::new(role, content))
}

/// A conversation and reply as token ids; the loss covers `tokens[response_start..]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    pub response_start: usize,
}

/// A preference pair as token ids: the prompt once, then each reply ending with the end-of-turn
/// token. Training computes the prompt once for both replies.
#[derive(Debug, Clone, PartialEq)]
pub struct PairTokens {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

impl PairTokens {
    /// The prompt and the chosen reply as one sequence.
    pub fn chosen_sequence(&self) -> Sequence {
        Sequence {
            tokens: [&self.prompt, &self.chosen]
                .into_iter()
                .flatten()
                .copied()
                .collect(),
            response_start: self.prompt.len(),
        }
    }

    /// Prompt, chosen reply and rejected reply as one sequence, as training computes the pair.
    pub fn packed(&self) -> Vec<u32> {
        [&self.prompt, &self.chosen, &self.rejected]
            .into_iter()
            .flatten()
            .copied()
            .collect()
    }

    /// Tokens the pair's two sequences hold (the prompt counted for each).
    pub fn sequence_tokens(&self) -> usize {
        2 * self.prompt.len() + self.chosen.len() + self.rejected.len()
    }
}

/// Tokenises as serving does: the prompt rendered by the model's chat template, the reply's
/// tokens after it, then the end-of-turn token that ends a served reply.
pub struct Tokenizer<'m> {
    model: &'m LoadedModel,
    template: ChatTemplate,
}

impl<'m> Tokenizer<'m> {
    pub fn new(model: &'m LoadedModel) -> Result<Self, TrainError> {
        let template =
            ChatTemplate::of_model(&model.model).map_err(|e| TrainError::Model(e.to_string()))?;
        Ok(Tokenizer { model, template })
    }

    /// The sequence of `prompt` then `reply`, cut from the left of the prompt to `max_tokens`
    /// (true when cut); `None` when the reply alone does not fit.
    /// A pair's tokens with the prompt cut from the left so that prompt and either reply fit in
    /// `max_tokens`, and whether it was cut; `None` when a reply alone does not fit.
    pub fn encode_pair(
        &self,
        prompt: &[ChatMessage],
        chosen: &str,
        rejected: &str,
        max_tokens: usize,
    ) -> Result<Option<(PairTokens, bool)>, TrainError> {
        let text = self
            .template
            .render(&self.model.model, prompt)
            .map_err(|e| TrainError::Model(e.to_string()))?;
        let vocab = self.model.model.vocab();
        let prompt_tokens = vocab.tokenize(text.as_bytes(), true, true);
        let reply = |text: &str| -> Vec<u32> {
            let mut tokens = vocab.tokenize(text.as_bytes(), false, false);
            tokens.push(end_of_turn(&self.model.model));
            tokens.iter().map(|t| t.0 as u32).collect()
        };
        let (chosen, rejected) = (reply(chosen), reply(rejected));
        let longest = chosen.len().max(rejected.len());
        if longest >= max_tokens || prompt_tokens.is_empty() {
            return Ok(None);
        }
        let keep = prompt_tokens.len().min(max_tokens - longest);
        let cut = keep < prompt_tokens.len();
        let prompt = prompt_tokens[prompt_tokens.len() - keep..]
            .iter()
            .map(|t| t.0 as u32)
            .collect();
        Ok(Some((
            PairTokens {
                prompt,
                chosen,
                rejected,
            },
            cut,
        )))
    }
}

/// The token a served reply ends with: the template's end-of-turn token where the model has one,
/// else end-of-sequence.
fn end_of_turn(model: &llama_cpp_2::model::LlamaModel) -> llama_cpp_2::token::LlamaToken {
    let vocab = model.vocab();
    let eot = vocab.eot();
    if eot.0 >= 0 && vocab.is_eog(eot) {
        eot
    } else {
        vocab.eos()
    }
}

/// The base model's sha256 a pair's recorded fingerprint names (`sha` or `sha+lora:…`).
pub fn base_of_fingerprint(fingerprint: &str) -> &str {
    fingerprint.split('+').next().unwrap_or(fingerprint)
}

/// Whether `path` ends in `.gguf` (a model file rather than a protocol's model id).
pub fn is_gguf_path(s: &str) -> bool {
    Path::new(s)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}
