//! `bench engine --workload v1`: what an OpenAI client gets from a `/v1` server — chats of a
//! fixed length at once, whole and streamed — measured the same way, over HTTP, on this
//! server and on llama.cpp's `llama-server` in one run, batch by batch in turn.

use std::time::Instant;

use futures_util::future::join_all;
use futures_util::StreamExt;
use indicatif::ProgressBar;
use serde::Serialize;
use serde_json::{json, Value};

use crate::engine::remote::with_causes;
use crate::engine::EngineError;

/// Chats sent at once, and the length of every reply (end-of-generation ignored, so both
/// servers do the same work).
#[derive(Debug, Clone)]
pub struct ApiWorkload {
    pub concurrency: Vec<usize>,
    pub tokens: u32,
    /// Times each figure is measured (new chats each time); the median is kept.
    pub repeats: usize,
}

/// Generated tokens per second over all the chats at once, for each of the workload's
/// concurrencies: answered whole (`"stream": false`) and streamed.
#[derive(Debug, Clone, Serialize)]
pub struct ApiFigures {
    pub whole: Vec<f64>,
    pub streamed: Vec<f64>,
}

/// A client of one server's `/v1/chat/completions`.
pub struct ApiClient {
    url: String,
    model: String,
    key: Option<String>,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client of `url` (the base URL ending in `/v1`) asking for `model`.
    pub fn new(url: &str, model: &str, key: Option<String>) -> Self {
        Self {
            url: format!("{}/chat/completions", url.trim_end_matches('/')),
            model: model.into(),
            key,
            http: reqwest::Client::new(),
        }
    }

    /// One chat of its own (a system prompt no other chat shares, so neither server reuses a
    /// cached prefix) with the engine's default sampling, spelled out for both servers.
    fn body(&self, chat: usize, tokens: u32, stream: bool) -> Value {
        json!({
            "model": self.model,
            "messages": [
                {"role": "system", "content": format!("You are writing assistant {chat}. Write in full sentences.")},
                {"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."},
            ],
            "max_tokens": tokens,
            "ignore_eos": true,
            "stream": stream,
            "stream_options": {"include_usage": true},
            "temperature": 0.7,
            "top_k": 40,
            "top_p": 0.95,
            "min_p": 0.05,
            "repeat_penalty": 1.1,
            "repeat_last_n": 64,
            "seed": chat,
        })
    }

    /// Sends one chat; returns the tokens generated.
    async fn chat(&self, chat: usize, tokens: u32, stream: bool) -> Result<u64, EngineError> {
        let fail = |reason: String| EngineError::Remote {
            endpoint: self.url.clone(),
            reason,
        };
        let mut request = self
            .http
            .post(&self.url)
            .json(&self.body(chat, tokens, stream));
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| fail(with_causes(&e)))?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            return Err(fail(format!("HTTP {status}: {text:.300}")));
        }
        if !stream {
            let body: Value = response.json().await.map_err(|e| fail(with_causes(&e)))?;
            return body["usage"]["completion_tokens"]
                .as_u64()
                .ok_or_else(|| fail(format!("no usage in the answer: {body:.300}")));
        }
        let mut events = response.bytes_stream();
        let mut buffer = Vec::new();
        let (mut pieces, mut usage) = (0u64, None);
        while let Some(chunk) = events.next().await {
            buffer.extend_from_slice(&chunk.map_err(|e| fail(with_causes(&e)))?);
            while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.trim().strip_prefix("data:") else {
                    continue;
                };
                let Ok(value) = serde_json::from_str::<Value>(data.trim()) else {
                    continue; // [DONE]
                };
                if value["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
                {
                    pieces += 1;
                }
                if let Some(n) = value["usage"]["completion_tokens"].as_u64() {
                    usage = Some(n);
                }
            }
        }
        Ok(usage.unwrap_or(pieces))
    }
}

/// Runs the workload against each of `clients` in turn, batch by batch (so a machine whose speed
/// drifts over minutes slows all of them alike): a short warm-up chat each, then at each
/// concurrency the chats answered whole, then streamed, each `repeats` times (the median kept).
/// `progress` ticks once per batch of chats; the figures are in the order of `clients`.
pub async fn api_bench(
    clients: &[&ApiClient],
    workload: &ApiWorkload,
    progress: &ProgressBar,
) -> Result<Vec<ApiFigures>, EngineError> {
    for client in clients {
        client.chat(0, 8, false).await?;
    }
    let mut figures = vec![
        ApiFigures {
            whole: Vec::new(),
            streamed: Vec::new(),
        };
        clients.len()
    ];
    let mut next_chat = 1;
    for &n in &workload.concurrency {
        for stream in [false, true] {
            let mut rates = vec![Vec::new(); clients.len()];
            for _ in 0..workload.repeats.max(1) {
                // The same chats for every client.
                let chats = next_chat..next_chat + n;
                next_chat += n;
                for (client, rates) in clients.iter().zip(&mut rates) {
                    let started = Instant::now();
                    let done = join_all(
                        chats
                            .clone()
                            .map(|c| client.chat(c, workload.tokens, stream)),
                    )
                    .await;
                    let elapsed = started.elapsed().as_secs_f64();
                    let tokens = done.into_iter().sum::<Result<u64, _>>()?;
                    rates.push(tokens as f64 / elapsed.max(1e-9));
                    progress.inc(1);
                }
            }
            for (figures, rates) in figures.iter_mut().zip(rates) {
                let rate = super::percentile(rates, 0.5);
                if stream {
                    figures.streamed.push(rate);
                } else {
                    figures.whole.push(rate);
                }
            }
        }
    }
    Ok(figures)
}

/// Both servers' figures side by side (this server first), one row per way of answering and
/// concurrency.
pub fn api_figures(
    ours: &ApiFigures,
    theirs: &ApiFigures,
    workload: &ApiWorkload,
) -> Vec<super::Figure> {
    let mut figures = Vec::new();
    for (how, a, b) in [
        ("whole", &ours.whole, &theirs.whole),
        ("streamed", &ours.streamed, &theirs.streamed),
    ] {
        for (i, n) in workload.concurrency.iter().enumerate() {
            figures.push(super::Figure {
                name: format!("/v1 {how}, {n} chats at once"),
                engine: a[i],
                baseline: b[i],
                unit: "tok/s",
            });
        }
    }
    figures
}
