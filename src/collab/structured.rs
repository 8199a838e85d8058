//! Answers the simulator and the judge give as JSON objects. A GBNF grammar fixes the keys, their
//! order, and a length bound on every string, so the output always closes within the token budget
//! and always parses, even from a 135M-parameter model.

use serde_json::{Map, Value};

use super::CollabError;
use crate::engine::{ChatMessage, Completion, Constraint, Engine, Role, Sampling};

/// What one key of the object holds.
#[derive(Debug, Clone)]
pub enum Field {
    /// A string of at most this many characters.
    Text(u32),
    /// A number from 0 to 1 with up to two decimals.
    Unit,
    /// A whole number in a range.
    Integer(i32, i32),
    /// One of these strings.
    Choice(Vec<String>),
}

/// An object with fixed keys, in order.
#[derive(Debug, Clone)]
pub struct Shape(pub Vec<(&'static str, Field)>);

impl Shape {
    pub fn grammar(&self) -> String {
        let mut root = String::from("root ::= \"{\" ");
        let mut rules = Vec::new();
        for (i, (key, field)) in self.0.iter().enumerate() {
            if i > 0 {
                root.push_str("\",\" ws ");
            }
            root.push_str(&format!("\"\\\"{key}\\\":\" ws f{i} "));
            let rule = match field {
                Field::Text(max) => format!("f{i} ::= \"\\\"\" char{{0,{max}}} \"\\\"\""),
                Field::Unit => format!("f{i} ::= \"0\" (\".\" [0-9] [0-9]?)? | \"1\" (\".0\")?"),
                Field::Integer(min, max) => format!(
                    "f{i} ::= {}",
                    (*min..=*max)
                        .map(|n| format!("\"{n}\""))
                        .collect::<Vec<_>>()
                        .join(" | ")
                ),
                Field::Choice(options) => format!(
                    "f{i} ::= {}",
                    options
                        .iter()
                        .map(|o| format!("\"\\\"{}\\\"\"", o.replace('"', "")))
                        .collect::<Vec<_>>()
                        .join(" | ")
                ),
            };
            rules.push(rule);
        }
        root.push_str("\"}\"");
        rules.push(r#"ws ::= " "?"#.into());
        rules.push(
            r#"char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])"#
                .into(),
        );
        format!("{root}\n{}\n", rules.join("\n"))
    }

    /// Tokens enough for a complete object: a token holds at least one character. (Only a
    /// model that spells characters as `\u` escapes can run out; its answer is asked for again.)
    pub fn max_tokens(&self) -> u32 {
        let chars: u32 = self
            .0
            .iter()
            .map(|(key, field)| {
                key.len() as u32
                    + 8
                    + match field {
                        Field::Text(max) => *max,
                        Field::Unit | Field::Integer(..) => 8,
                        Field::Choice(options) => {
                            options.iter().map(|o| o.len() as u32).max().unwrap_or(0)
                        }
                    }
            })
            .sum();
        chars + 16
    }

    /// The object in `text`, with every key present and in range.
    pub fn parse(&self, text: &str) -> Result<Map<String, Value>, String> {
        let value: Value =
            serde_json::from_str(text.trim()).map_err(|e| format!("not JSON ({e})"))?;
        let Value::Object(object) = value else {
            return Err("not a JSON object".into());
        };
        for (key, field) in &self.0 {
            let value = object.get(*key).ok_or_else(|| format!("no {key:?} key"))?;
            let ok = match field {
                Field::Text(_) => value.is_string(),
                Field::Unit => value.as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)),
                Field::Integer(min, max) => value
                    .as_i64()
                    .is_some_and(|x| (i64::from(*min)..=i64::from(*max)).contains(&x)),
                Field::Choice(options) => value
                    .as_str()
                    .is_some_and(|s| options.iter().any(|o| o == s)),
            };
            if !ok {
                return Err(format!("{key:?} is {value}, which is out of range"));
            }
        }
        Ok(object)
    }
}

/// One question for a model: the prompt (sent as the user's message), the shape of the answer
/// and the seed.
#[derive(Debug, Clone)]
pub struct Ask {
    pub prompt: String,
    pub shape: Shape,
    pub seed: u32,
}

/// Asks every question at once — one group, so a local engine batches them the same way on
/// every run — and parses the answers. An answer that does not parse (a remote backend that
/// ignores grammars) is asked once more with the next seed.
pub async fn ask_all(
    engine: &dyn Engine,
    who: &str,
    sampling: &Sampling,
    asks: &[Ask],
) -> Vec<Result<Map<String, Value>, CollabError>> {
    let request = |ask: &Ask, attempt: u32| {
        let mut sampling = sampling.clone();
        sampling.seed = Some(ask.seed.wrapping_add(attempt));
        sampling.max_tokens = ask.shape.max_tokens();
        let mut request = super::request(
            vec![ChatMessage::new(Role::User, ask.prompt.clone())],
            sampling,
        );
        request.constraint = Some(Constraint::Grammar(ask.shape.grammar()));
        request
    };
    let parse = |ask: &Ask, answer: Result<Completion, CollabError>| {
        answer.and_then(|c| {
            ask.shape.parse(&c.text).map_err(|problem| {
                tracing::debug!(who, %problem, text = %c.text, "unparseable answer");
                CollabError::Unparseable {
                    who: who.to_string(),
                    problem: format!("{problem}; the answer began {:?}", preview(&c.text)),
                }
            })
        })
    };
    let first =
        super::generate_all(engine, who, asks.iter().map(|a| request(a, 0)).collect()).await;
    let mut results: Vec<_> = asks.iter().zip(first).map(|(a, c)| parse(a, c)).collect();
    let again: Vec<usize> = (0..asks.len())
        .filter(|&i| matches!(results[i], Err(CollabError::Unparseable { .. })))
        .collect();
    if !again.is_empty() {
        let retried = super::generate_all(
            engine,
            who,
            again.iter().map(|&i| request(&asks[i], 1)).collect(),
        )
        .await;
        for (&i, c) in again.iter().zip(retried) {
            results[i] = parse(&asks[i], c);
        }
    }
    results
}

/// [`ask_all`] with one question.
pub async fn ask(
    engine: &dyn Engine,
    who: &str,
    sampling: &Sampling,
    ask: Ask,
) -> Result<Map<String, Value>, CollabError> {
    ask_all(engine, who, sampling, &[ask])
        .await
        .pop()
        .expect("one answer per question")
}

fn preview(text: &str) -> String {
    text.chars().take(80).collect()
}

/// A string field of a parsed object.
pub fn text(object: &Map<String, Value>, key: &str) -> String {
    object
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks_ranges() {
        let shape = Shape(vec![
            ("thought", Field::Text(50)),
            ("interactivity", Field::Unit),
        ]);
        let object = shape
            .parse(r#"{"thought": "asks well", "interactivity": 0.75}"#)
            .unwrap();
        assert_eq!(text(&object, "thought"), "asks well");
        assert!(shape
            .parse(r#"{"thought": "x", "interactivity": 3}"#)
            .is_err());
        assert!(shape.parse(r#"{"thought": "x"}"#).is_err());
        assert!(shape.parse("not json").is_err());
        let grammar = shape.grammar();
        assert!(grammar.starts_with("root ::= \"{\" \"\\\"thought\\\":\" ws f0 \",\" ws"));
        assert!(grammar.contains("f0 ::= \"\\\"\" char{0,50} \"\\\"\""));
    }
}
