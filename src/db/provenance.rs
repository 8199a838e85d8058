//! What produced a reply, as stored beside every assistant message and candidate (their
//! `policy_json` column) and read back by the exports and by `pairs`: one shape for replies
//! given in a session, replies replaced or compared, and the fresh candidates MR scores.

use serde::{Deserialize, Serialize};

use crate::protocol::{LoraSpec, Sampling};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The arm whose policy wrote the reply.
    #[serde(default)]
    pub arm: String,
    /// Model id of the protocol, and the engine that served it (model and adapter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// The engine's fingerprint: the model file's sha256 and its adapters'.
    #[serde(default)]
    pub fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt_sha256: Option<String>,
    #[serde(default)]
    pub lora: Vec<LoraSpec>,
    /// The arm's sampling, with the seed this reply was drawn with.
    #[serde(default)]
    pub sampling: Sampling,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// A fresh MR candidate: whether it had the proactive instruction, and the sha256 of the run
    /// configuration it was drawn under (a later run reuses only candidates of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proactive: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
}

/// How a reply's generation went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub ttft_ms: Option<u64>,
    pub gen_ms: Option<u64>,
    pub prompt_tokens: Option<u64>,
    pub gen_tokens: Option<u64>,
    pub finish_reason: Option<String>,
}

impl Provenance {
    /// The provenance stored as text; text that is not one (hand-edited, or empty) reads as none.
    /// MR candidates stored before `usage` existed kept their token count and finish reason at
    /// the top level; they are read into `usage`.
    pub fn parse(json: &str) -> Option<Self> {
        let mut value: serde_json::Value = serde_json::from_str(json).ok()?;
        if let Some(fields) = value.as_object_mut() {
            if !fields.contains_key("usage") && fields.contains_key("generated_tokens") {
                let usage = serde_json::json!({
                    "gen_tokens": fields.remove("generated_tokens"),
                    "finish_reason": fields.remove("finish_reason"),
                });
                fields.insert("usage".into(), usage);
            }
        }
        serde_json::from_value(value).ok()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("provenance serialises")
    }

    /// This policy's provenance of one finished reply: the seed drawn and how it went.
    pub fn of_reply(&self, seed: u32, usage: Usage) -> Self {
        let mut p = self.clone();
        p.sampling.seed = Some(seed);
        p.usage = Some(usage);
        p
    }

    /// Tokens the reply was generated in, when recorded.
    pub fn gen_tokens(&self) -> Option<u64> {
        self.usage.as_ref().and_then(|u| u.gen_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows written before the type existed keep their meaning: a reply given in a session, and
    /// an MR candidate with its token count at the top level.
    #[test]
    fn stored_shapes_read_back() {
        let reply = r#"{"arm":"collabllm","model":"m","engine":"m","fingerprint":"abc",
            "system_prompt_sha256":"s","lora":[],"sampling":{"temperature":0.7,"top_p":0.95,
            "top_k":40,"min_p":0.05,"repeat_penalty":1.1,"repeat_last_n":64,"max_tokens":512,
            "seed":7,"stop":[]},"usage":{"ttft_ms":12,"gen_ms":30,"prompt_tokens":50,
            "gen_tokens":9,"finish_reason":"stop"}}"#;
        let p = Provenance::parse(reply).unwrap();
        assert_eq!((p.sampling.seed, p.gen_tokens()), (Some(7), Some(9)));
        assert_eq!(Provenance::parse(&p.to_json()), Some(p));
        let candidate = r#"{"arm":"base","fingerprint":"abc","sampling":{"seed":3},
            "proactive":true,"generated_tokens":21,"finish_reason":"stop","config_sha256":"c"}"#;
        let c = Provenance::parse(candidate).unwrap();
        assert_eq!(
            (c.gen_tokens(), c.proactive, c.config_sha256.as_deref()),
            (Some(21), Some(true), Some("c"))
        );
        assert_eq!(Provenance::parse("not json"), None);
    }
}
