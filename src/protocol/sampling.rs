//! Sampling settings: what a protocol's arm sets and what a request to an engine carries (the
//! engine re-exports them; `/v1` clients send the same fields).

use serde::{Deserialize, Serialize};

/// How the next token is drawn. Equal settings with an equal `seed` give equal text on one build.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Sampling {
    /// 0 picks the most likely token every time.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: i32,
    pub min_p: f32,
    /// 1.0 turns the repetition penalty off.
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: i32,
    pub max_tokens: u32,
    /// Fixed seed for reproducible replies; without one a seed is drawn and recorded.
    pub seed: Option<u32>,
    /// Generation ends before any of these strings; they are not part of the reply.
    pub stop: Vec<String>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.05,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            max_tokens: 512,
            seed: None,
            stop: Vec::new(),
        }
    }
}

impl Sampling {
    /// Why these settings cannot be used, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=5.0).contains(&self.temperature) {
            return Err(format!("temperature {} is outside 0–5", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} is outside (0, 1]", self.top_p));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return Err(format!("min_p {} is outside [0, 1)", self.min_p));
        }
        if self.top_k < 0 {
            return Err(format!("top_k {} is negative", self.top_k));
        }
        if self.repeat_penalty.is_nan() || self.repeat_penalty <= 0.0 {
            return Err(format!(
                "repeat_penalty {} is not positive",
                self.repeat_penalty
            ));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens is 0".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return Err("a stop string is empty".into());
        }
        Ok(())
    }
}
