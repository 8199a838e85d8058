//! The remote backend: a streaming client of an OpenAI-compatible `/v1/chat/completions` API
//! (llama.cpp's `llama-server`, vLLM, another `collabllm serve`), for policies on other machines.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{
    ChatRequest, Completion, Constraint, Engine, EngineError, EngineEvent, EngineStatus,
    FinishReason, Generation, TokenLogprob,
};
use crate::protocol::ModelSpec;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest line of a response stream: a server that streams without line breaks (a broken
/// proxy, garbage) is stopped here instead of filling memory.
const MAX_LINE_BYTES: usize = 1 << 20;

pub struct RemoteEngine {
    endpoint: String,
    model: String,
    api_key: Option<String>,
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    counters: Arc<Counters>,
    /// Longest wait for the response or between two streamed chunks.
    timeout: Duration,
}

#[derive(Default)]
struct Counters {
    queued: AtomicUsize,
    active: AtomicUsize,
    generated: AtomicU64,
    prompt_processed: AtomicU64,
    prompt_reused: AtomicU64,
}

impl RemoteEngine {
    /// A client of `endpoint` (the base URL ending in `/v1`). Must be created inside the Tokio
    /// runtime that will drive its requests.
    pub fn new(endpoint: &str, model: &str, api_key: Option<String>) -> Result<Self, EngineError> {
        let fail = |reason: String| EngineError::Remote {
            endpoint: endpoint.to_string(),
            reason,
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| fail("the remote backend needs a Tokio runtime".into()))?;
        // A fresh connection per request: llama-server closes idle keep-alive connections on
        // its own schedule, and a request sent on one it just closed fails ("connection closed
        // before message completed") with no safe way to tell whether it was received.
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            model: model.to_string(),
            api_key,
            client,
            runtime,
            counters: Arc::default(),
            timeout: Duration::from_secs(u64::from(
                crate::protocol::DEFAULT_REMOTE_TIMEOUT_SECONDS,
            )),
        })
    }

    /// Sets how long the server may stay silent (before its response or between two chunks).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn from_spec(spec: &ModelSpec) -> Result<Self, EngineError> {
        let endpoint = spec.endpoint.as_deref().unwrap_or_default();
        let api_key = match &spec.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| EngineError::Remote {
                endpoint: endpoint.to_string(),
                reason: format!("the environment variable {var} (api_key_env) is not set"),
            })?),
            None => None,
        };
        let model = spec.remote_model.as_deref().unwrap_or(&spec.id);
        Ok(Self::new(endpoint, model, api_key)?
            .with_timeout(Duration::from_secs(u64::from(spec.timeout_seconds.max(1)))))
    }

    fn body(&self, request: &ChatRequest, seed: u32) -> Value {
        let s = &request.sampling;
        let mut body = json!({
            "model": self.model,
            "messages": request.messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "min_p": s.min_p,
            "repeat_penalty": s.repeat_penalty,
            "repeat_last_n": s.repeat_last_n,
            "max_tokens": s.max_tokens,
            "seed": seed,
            "cache_prompt": true,
        });
        if !s.stop.is_empty() {
            body["stop"] = json!(s.stop);
        }
        if request.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if let Some(n) = request.top_logprobs {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(n);
        }
        match &request.constraint {
            Some(Constraint::JsonSchema(schema)) => {
                body["response_format"] = json!({
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": schema, "strict": true},
                });
            }
            Some(Constraint::Grammar(g)) => body["grammar"] = json!(g),
            None => {}
        }
        body
    }
}

impl Engine for RemoteEngine {
    fn start(&self, request: ChatRequest) -> Result<Generation, EngineError> {
        request.check()?;
        let (generation, events, flag) = Generation::channel();
        let seed = request.sampling.seed.unwrap_or_else(rand::random);
        let mut http = self
            .client
            .post(format!("{}/chat/completions", self.endpoint))
            .json(&self.body(&request, seed));
        if let Some(key) = &self.api_key {
            http = http.bearer_auth(key);
        }
        let endpoint = self.endpoint.clone();
        let counters = self.counters.clone();
        let timeout = self.timeout;
        counters.queued.fetch_add(1, Ordering::Relaxed);
        self.runtime.spawn(async move {
            counters.queued.fetch_sub(1, Ordering::Relaxed);
            counters.active.fetch_add(1, Ordering::Relaxed);
            let limits = Limits {
                timeout,
                max_tokens: request.sampling.max_tokens,
            };
            let result = stream(http, &events, &flag, &counters, seed, limits).await;
            counters.active.fetch_sub(1, Ordering::Relaxed);
            let event = match result {
                Ok(c) => EngineEvent::Done(c),
                Err(reason) => EngineEvent::Error(EngineError::Remote { endpoint, reason }),
            };
            let _ = events.send(event);
        });
        Ok(generation)
    }

    fn status(&self) -> EngineStatus {
        let c = &self.counters;
        EngineStatus {
            model: self.model.clone(),
            backend: "remote",
            queued: c.queued.load(Ordering::Relaxed),
            active: c.active.load(Ordering::Relaxed),
            slots: 0,
            generated_tokens: c.generated.load(Ordering::Relaxed),
            prompt_tokens_processed: c.prompt_processed.load(Ordering::Relaxed),
            prompt_tokens_reused: c.prompt_reused.load(Ordering::Relaxed),
            running: true,
            ..Default::default()
        }
    }

    fn fingerprint(&self) -> String {
        format!("remote:{}#{}", self.endpoint, self.model)
    }
}

/// What a response may take: `timeout` of silence, and `max_tokens` (a server that streams
/// more is cut there, as a local engine would stop).
struct Limits {
    timeout: Duration,
    max_tokens: u32,
}

/// Reads the server-sent events of one request into engine events.
async fn stream(
    http: reqwest::RequestBuilder,
    events: &mpsc::UnboundedSender<EngineEvent>,
    cancel: &AtomicBool,
    counters: &Counters,
    seed: u32,
    Limits {
        timeout,
        max_tokens,
    }: Limits,
) -> Result<Completion, String> {
    let started = Instant::now();
    let response = tokio::time::timeout(timeout, http.send())
        .await
        .map_err(|_| format!("no response within {} s", timeout.as_secs()))?
        .map_err(|e| format!("request failed: {}", with_causes(&e)))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(format!(
            "HTTP {status}: {}",
            body.chars().take(500).collect::<String>()
        ));
    }
    let mut body = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut text = String::new();
    let mut finish = None;
    let mut first_token_at = None;
    let mut generated = 0u32;
    let mut usage = Usage::default();
    let mut logprobs = Vec::new();
    loop {
        if cancel.load(Ordering::Relaxed) || events.is_closed() {
            finish = Some(FinishReason::Cancelled);
            break;
        }
        // More pieces than tokens asked for: the server does not stop by itself.
        if generated > max_tokens {
            finish.get_or_insert(FinishReason::Length);
            break;
        }
        let chunk = match tokio::time::timeout(timeout, body.next()).await {
            Err(_) => return Err(format!("no data for {} s", timeout.as_secs())),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(format!("stream broke: {e}")),
            Ok(Some(Ok(bytes))) => bytes,
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                continue;
            }
            let value: Value = serde_json::from_str(data).map_err(|e| {
                format!("the server sent something that is not JSON ({e}): {data:.200}")
            })?;
            if let Some(err) = value.get("error") {
                return Err(format!("the server reported an error: {err}"));
            }
            usage.read(&value);
            let Some(choice) = value["choices"].get(0) else {
                continue;
            };
            if let Some(delta) = choice["delta"]["content"].as_str() {
                if !delta.is_empty() {
                    first_token_at.get_or_insert_with(Instant::now);
                    generated += 1;
                    text.push_str(delta);
                    let _ = events.send(EngineEvent::Token(delta.to_string()));
                }
            }
            if let Some(content) = choice["logprobs"]["content"].as_array() {
                logprobs.extend(content.iter().filter_map(TokenLogprob::from_openai));
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = Some(if reason == "length" {
                    FinishReason::Length
                } else {
                    FinishReason::Stop
                });
            }
        }
        if buffer.len() > MAX_LINE_BYTES {
            return Err(format!(
                "the server sent a line longer than {} KiB",
                MAX_LINE_BYTES >> 10
            ));
        }
    }
    let generated = usage.completion.unwrap_or(generated);
    let prompt = usage.prompt.unwrap_or(0);
    let processed = usage.prompt_processed.unwrap_or(prompt);
    counters
        .generated
        .fetch_add(generated as u64, Ordering::Relaxed);
    counters
        .prompt_processed
        .fetch_add(processed as u64, Ordering::Relaxed);
    counters
        .prompt_reused
        .fetch_add(prompt.saturating_sub(processed) as u64, Ordering::Relaxed);
    Ok(Completion {
        text,
        finish_reason: finish.ok_or("the stream ended without a finish reason")?,
        prompt_tokens: prompt,
        prompt_tokens_processed: processed,
        generated_tokens: generated,
        ttft_ms: first_token_at
            .map_or(0, |t: Instant| t.duration_since(started).as_millis() as u64),
        total_ms: started.elapsed().as_millis() as u64,
        seed,
        logprobs,
    })
}

/// Token counts as servers report them: `usage`, and llama-server's `timings`.
#[derive(Default)]
struct Usage {
    prompt: Option<u32>,
    completion: Option<u32>,
    prompt_processed: Option<u32>,
}

impl Usage {
    fn read(&mut self, chunk: &Value) {
        let count = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        if let Some(n) = count(&chunk["usage"]["prompt_tokens"]) {
            self.prompt = Some(n);
        }
        if let Some(n) = count(&chunk["usage"]["completion_tokens"]) {
            self.completion = Some(n);
        }
        if let Some(n) = count(&chunk["usage"]["prompt_tokens_details"]["cached_tokens"]) {
            self.prompt_processed = self.prompt.map(|p| p.saturating_sub(n));
        }
        if let Some(n) = count(&chunk["timings"]["prompt_n"]) {
            self.prompt_processed = Some(n);
        }
    }
}

/// An error with its causes ("error sending request: connection refused"), since reqwest's own
/// message hides what went wrong.
pub(crate) fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}
