//! Answers the simulator and the judge give as JSON objects. A GBNF grammar fixes the keys, their
//! order, and a length bound on every string, so the output always closes within the token budget
//! and always parses, even from a 135M-parameter model.

use serde_json::{Map, Value};

use super::CollabError;
use crate::engine::{
    ChatMessage, Completion, Constraint, Engine, Role, Sampling, MAX_TOP_LOGPROBS,
};

/// What one key of the object holds.
#[derive(Debug, Clone)]
pub enum Field {
    /// A string of at most this many characters.
    Text(u32),
    /// A rating, a whole number from `min` to `max` (single digits, so that each is one token
    /// of any tokenizer). Where the engine reports token probabilities, the value read is the
    /// rating expected under the model's probabilities for each number at that position (a
    /// model torn between 2 and 4 reads as 3, not as whichever it sampled), which also breaks
    /// the ties a coarse scale leaves between two answers.
    Rating(u8, u8),
    /// A whole number in a range.
    Integer(i32, i32),
    /// One of these strings.
    Choice(Vec<String>),
}

impl Field {
    /// The whole numbers a rating or an integer field allows.
    fn range(&self) -> Option<(i64, i64)> {
        match *self {
            Field::Rating(min, max) => Some((i64::from(min), i64::from(max))),
            Field::Integer(min, max) => Some((i64::from(min), i64::from(max))),
            Field::Text(_) | Field::Choice(_) => None,
        }
    }
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
                Field::Rating(..) | Field::Integer(..) => {
                    let (min, max) = field.range().expect("numbers have a range");
                    format!(
                        "f{i} ::= {}",
                        (min..=max)
                            .map(|n| format!("\"{n}\""))
                            .collect::<Vec<_>>()
                            .join(" | ")
                    )
                }
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
                        Field::Rating(..) | Field::Integer(..) => 8,
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
                Field::Rating(..) | Field::Integer(..) => {
                    let (min, max) = field.range().expect("numbers have a range");
                    value.as_i64().is_some_and(|x| (min..=max).contains(&x))
                }
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

    fn has_ratings(&self) -> bool {
        self.0.iter().any(|(_, f)| matches!(f, Field::Rating(..)))
    }

    /// Replaces each rating of `object` (parsed from `completion`) by its expected value under
    /// the token probabilities the completion carries; a rating whose position they do not
    /// cover keeps the sampled number.
    fn expect_ratings(&self, completion: &Completion, object: &mut Map<String, Value>) {
        for (key, field) in &self.0 {
            let Field::Rating(min, max) = *field else {
                continue;
            };
            if let Some(x) = expected_rating(completion, key, min, max) {
                object.insert((*key).to_string(), Value::from(x));
            }
        }
    }
}

/// The expected value of the rating that follows `"key":` in the completion's text, from the
/// probabilities of the alternatives at the token that holds its first character.
fn expected_rating(completion: &Completion, key: &str, min: u8, max: u8) -> Option<f64> {
    let pattern = format!("\"{key}\":");
    let value_at = completion.text.find(&pattern)? + pattern.len();
    let mut start = 0;
    for token in &completion.logprobs {
        let end = start + token.bytes.len();
        // The token that holds the value: it may begin with the colon or a space before it.
        let holds_value = end > value_at
            && completion.text.as_bytes()[value_at..end.min(completion.text.len())]
                .iter()
                .any(u8::is_ascii_digit);
        if !holds_value {
            start = end;
            continue;
        }
        let before = completion.text.as_bytes().get(start..value_at.max(start))?;
        let mut mass = [0.0f64; 10];
        for (bytes, logprob) in &token.top {
            let Some(rest) = bytes.strip_prefix(before) else {
                continue;
            };
            let Ok(rest) = std::str::from_utf8(rest) else {
                continue;
            };
            let rest = rest.trim_start();
            if let Ok(n @ 0..=9) = rest.parse::<u8>() {
                if (min..=max).contains(&n) && rest.len() == 1 {
                    mass[usize::from(n)] += f64::from(*logprob).exp();
                }
            }
        }
        let total: f64 = mass.iter().sum();
        if total <= 0.0 {
            return None;
        }
        let mean = mass
            .iter()
            .enumerate()
            .map(|(n, p)| n as f64 * p)
            .sum::<f64>()
            / total;
        return Some(mean);
    }
    None
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
        if ask.shape.has_ratings() {
            request.top_logprobs = Some(MAX_TOP_LOGPROBS);
        }
        request
    };
    let parse = |ask: &Ask, answer: Result<Completion, CollabError>| {
        answer.and_then(|c| {
            let mut object = ask.shape.parse(&c.text).map_err(|problem| {
                tracing::debug!(who, %problem, text = %c.text, "unparseable answer");
                CollabError::Unparseable {
                    who: who.to_string(),
                    problem: format!("{problem}; the answer began {:?}", preview(&c.text)),
                }
            })?;
            ask.shape.expect_ratings(&c, &mut object);
            Ok(object)
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
            ("interactivity", Field::Rating(1, 5)),
        ]);
        let object = shape
            .parse(r#"{"thought": "asks well", "interactivity": 4}"#)
            .unwrap();
        assert_eq!(text(&object, "thought"), "asks well");
        assert!(shape
            .parse(r#"{"thought": "x", "interactivity": 6}"#)
            .is_err());
        assert!(shape
            .parse(r#"{"thought": "x", "interactivity": 0.5}"#)
            .is_err());
        assert!(shape.parse(r#"{"thought": "x"}"#).is_err());
        assert!(shape.parse("not json").is_err());
        let grammar = shape.grammar();
        assert!(grammar.starts_with("root ::= \"{\" \"\\\"thought\\\":\" ws f0 \",\" ws"));
        assert!(grammar.contains("f0 ::= \"\\\"\" char{0,50} \"\\\"\""));
    }

    fn completion(pieces: &[(&str, Vec<(&str, f64)>)]) -> Completion {
        Completion {
            text: pieces.iter().map(|(p, _)| *p).collect(),
            finish_reason: crate::engine::FinishReason::Stop,
            prompt_tokens: 0,
            prompt_tokens_processed: 0,
            generated_tokens: pieces.len() as u32,
            ttft_ms: 0,
            total_ms: 0,
            seed: 0,
            logprobs: pieces
                .iter()
                .map(|(p, top)| crate::engine::TokenLogprob {
                    bytes: p.as_bytes().to_vec(),
                    logprob: 0.0,
                    top: top
                        .iter()
                        .map(|(t, p)| (t.as_bytes().to_vec(), p.ln() as f32))
                        .collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_rating_reads_as_its_expected_value_over_the_numbers_in_range() {
        let shape = Shape(vec![
            ("thought", Field::Text(50)),
            ("interactivity", Field::Rating(1, 5)),
        ]);
        // A space token before the digit, and alternatives out of range or not numbers.
        let c = completion(&[
            ("{\"thought\":\"asks\",\"interactivity\":", vec![]),
            (" ", vec![]),
            (
                "4",
                vec![
                    ("4", 0.5),
                    ("2", 0.3),
                    ("9", 0.1),
                    ("x", 0.05),
                    ("45", 0.05),
                ],
            ),
            ("}", vec![]),
        ]);
        let mut object = shape.parse(&c.text).unwrap();
        shape.expect_ratings(&c, &mut object);
        let x = object["interactivity"].as_f64().unwrap();
        assert!((x - 3.25).abs() < 1e-6, "{x}");

        // The digit merged into the token with the colon before it.
        let c = completion(&[
            ("{\"thought\":\"asks\",\"interactivity", vec![]),
            ("\":2", vec![("\":2", 0.25), ("\":1", 0.25), (":3", 0.5)]),
            ("}", vec![]),
        ]);
        let mut object = shape.parse(&c.text).unwrap();
        shape.expect_ratings(&c, &mut object);
        let x = object["interactivity"].as_f64().unwrap();
        assert!((x - 1.5).abs() < 1e-6, "{x}");

        // Without probabilities the sampled number stays.
        let mut c = completion(&[("{\"thought\":\"a\",\"interactivity\":3}", vec![])]);
        c.logprobs.clear();
        let mut object = shape.parse(&c.text).unwrap();
        shape.expect_ratings(&c, &mut object);
        assert_eq!(object["interactivity"].as_u64(), Some(3));
    }
}
