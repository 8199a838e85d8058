//! The OpenAI-compatible API over the local engines: `POST /v1/chat/completions` (streaming and
//! not) and `GET /v1/models`, so other nodes, benchmarks and any OpenAI client can use them.
//! Fields this server does not know are ignored; llama-server's `ignore_eos`, `grammar`,
//! `repeat_penalty`, `top_k` and `min_p` extensions are honoured. Every request needs an API key
//! (`Authorization: Bearer KEY`): the engines are the participants', and a request may run for
//! minutes. With no key configured the API is off.

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{get, post, web, HttpRequest, HttpResponse};
use futures_util::stream;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};
use crate::engine::{
    ChatMessage, ChatRequest, Completion, Constraint, EngineEvent, Generation, Priority, Role,
    Sampling, TokenLogprob,
};

#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    messages: Vec<MessageIn>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i32>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    response_format: Option<Value>,
    grammar: Option<String>,
    json_schema: Option<Value>,
    /// Keeps a conversation on one slot (an extension; `user` is used when absent).
    conversation: Option<String>,
    user: Option<String>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct MessageIn {
    role: String,
    content: Content,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl CompletionRequest {
    /// The engine request, or what is wrong with this one.
    fn to_chat_request(&self) -> Result<ChatRequest, ApiError> {
        let messages = self
            .messages
            .iter()
            .map(|m| {
                let role = match m.role.as_str() {
                    "system" | "developer" => Role::System,
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    other => {
                        return Err(ApiError::BadRequest(format!(
                            "message role {other:?} is not supported; use system, user or assistant"
                        )))
                    }
                };
                let content = match &m.content {
                    Content::Text(t) => t.clone(),
                    Content::Parts(parts) => {
                        if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                            return Err(ApiError::BadRequest(format!(
                                "content parts of type {:?} are not supported; send text",
                                p.kind
                            )));
                        }
                        parts.iter().map(|p| p.text.as_str()).collect()
                    }
                };
                Ok(ChatMessage::new(role, content))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let d = Sampling::default();
        let sampling = Sampling {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_p: self.top_p.unwrap_or(d.top_p),
            top_k: self.top_k.unwrap_or(d.top_k),
            min_p: self.min_p.unwrap_or(d.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_last_n: self.repeat_last_n.unwrap_or(d.repeat_last_n),
            max_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(d.max_tokens),
            seed: self.seed.map(|s| s as u32),
            stop: match &self.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
        };
        sampling.check().map_err(ApiError::BadRequest)?;
        Ok(ChatRequest {
            messages,
            sampling,
            constraint: self.constraint()?,
            conversation: self.conversation.clone().or_else(|| self.user.clone()),
            ignore_eos: self.ignore_eos,
            reproducible: false,
            priority: Priority::Api,
            top_logprobs: match (self.logprobs, self.top_logprobs) {
                (true, n) => Some(n.unwrap_or(0)),
                (false, None) => None,
                (false, Some(_)) => {
                    return Err(ApiError::BadRequest(
                        "top_logprobs needs logprobs: true".into(),
                    ))
                }
            },
        })
    }

    fn constraint(&self) -> Result<Option<Constraint>, ApiError> {
        if let Some(g) = &self.grammar {
            return Ok(Some(Constraint::Grammar(g.clone())));
        }
        if let Some(schema) = &self.json_schema {
            return Ok(Some(Constraint::JsonSchema(schema.clone())));
        }
        let Some(format) = &self.response_format else {
            return Ok(None);
        };
        match format["type"].as_str() {
            Some("text") | None => Ok(None),
            Some("json_object") => Ok(Some(Constraint::JsonSchema(json!({"type": "object"})))),
            Some("json_schema") => {
                let schema = format["json_schema"]["schema"].clone();
                if schema.is_null() {
                    return Err(ApiError::BadRequest(
                        "response_format.json_schema.schema is missing".into(),
                    ));
                }
                Ok(Some(Constraint::JsonSchema(schema)))
            }
            Some(other) => Err(ApiError::BadRequest(format!(
                "response_format type {other:?} is not supported; use text, json_object or json_schema"
            ))),
        }
    }
}

/// An error of `/v1` in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, which
/// OpenAI's clients read into their exceptions; the status codes and the `code` are
/// [`ApiError`]'s.
#[derive(Debug)]
pub struct OpenAiError(ApiError);

impl<E: Into<ApiError>> From<E> for OpenAiError {
    fn from(e: E) -> Self {
        OpenAiError(e.into())
    }
}

impl std::fmt::Display for OpenAiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl actix_web::ResponseError for OpenAiError {
    fn status_code(&self) -> actix_web::http::StatusCode {
        self.0.status_code()
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        // OpenAI's types, by status.
        let kind = match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        HttpResponse::build(status).json(json!({
            "error": {
                "message": self.0.to_string(),
                "type": kind,
                "param": null,
                "code": self.0.kind(),
            }
        }))
    }
}

#[get("/v1/models")]
async fn list_models(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, OpenAiError> {
    authorise(&req, &state).await?;
    let data: Vec<Value> = state
        .engines
        .names()
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "owned_by": "collabllm"}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

/// The sha256 of an API key, as stored.
pub fn key_sha256(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Lets the request through when it carries a key given at start or stored in the database
/// (`/v1` and `/metrics`).
pub(super) async fn authorise(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|key| key_sha256(key.trim()));
    if presented
        .as_ref()
        .is_some_and(|hash| state.api_keys.contains(hash))
    {
        return Ok(());
    }
    let (known, any) = state
        .db(move |conn| {
            let known = match &presented {
                Some(hash) => crate::db::api_keys::find(conn, hash)?.is_some(),
                None => false,
            };
            Ok((known, crate::db::api_keys::count(conn)? > 0))
        })
        .await?;
    if known {
        return Ok(());
    }
    if !any && state.api_keys.is_empty() {
        return Err(ApiError::Disabled(
            "the OpenAI-compatible API and /metrics are off because no API key is configured: set \
             COLLABLLM_API_KEYS=KEY[,KEY...] for `serve`, or run `collabllm key add NAME`, then send \
             `Authorization: Bearer KEY`"
                .into(),
        ));
    }
    Err(ApiError::Unauthorized(
        "this API needs a valid key: send `Authorization: Bearer KEY`".into(),
    ))
}

#[post("/v1/chat/completions")]
async fn create_chat_completion(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, OpenAiError> {
    // The key first: a caller without one learns nothing about the body it sent.
    authorise(&req, &state).await?;
    let body: CompletionRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    let request = body.to_chat_request()?;
    // What is wrong with the request itself is said whatever the backend.
    request.check()?;
    let engine = state.engines.get(&body.model)?;
    let generation = engine.start(request)?;
    let meta = Meta {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: chrono::Utc::now().timestamp(),
        model: body.model,
        include_usage: body.stream_options.is_some_and(|o| o.include_usage),
        logprobs: body.logprobs,
    };
    if body.stream {
        Ok(HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header(("Cache-Control", "no-cache"))
            .streaming(sse(generation, meta)))
    } else {
        let completion = generation.finish().await?;
        Ok(HttpResponse::Ok().json(json!({
            "id": meta.id,
            "object": "chat.completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "logprobs": logprobs(&completion, meta.logprobs),
                "finish_reason": completion.finish_reason.as_str(),
            }],
            "usage": usage(&completion),
            "timings": timings(&completion),
        })))
    }
}

struct Meta {
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
    logprobs: bool,
}

impl Meta {
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Bytes {
        event(&self.chunk_value(delta, finish_reason))
    }

    fn chunk_value(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    }
}

fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// The choice's `logprobs`: null unless asked for. Streamed text pieces do not follow token
/// boundaries (a stop string or a split character holds text back), so a stream carries every
/// token's entry in its last chunk.
fn logprobs(c: &Completion, asked: bool) -> Value {
    if !asked {
        return Value::Null;
    }
    json!({"content": c.logprobs.iter().map(TokenLogprob::to_openai).collect::<Vec<_>>()})
}

fn usage(c: &Completion) -> Value {
    json!({
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.generated_tokens,
        "total_tokens": c.prompt_tokens + c.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": c.prompt_tokens - c.prompt_tokens_processed},
    })
}

fn timings(c: &Completion) -> Value {
    json!({
        "prompt_n": c.prompt_tokens_processed,
        "predicted_n": c.generated_tokens,
        "ttft_ms": c.ttft_ms,
        "total_ms": c.total_ms,
        "seed": c.seed,
    })
}

/// Server-sent events of a generation; dropping the stream (client gone) cancels it.
fn sse(
    generation: Generation,
    meta: Meta,
) -> impl futures_util::Stream<Item = Result<Bytes, actix_web::Error>> {
    let first = meta.chunk(json!({"role": "assistant", "content": ""}), None);
    let state = (Some(generation), meta, Some(first));
    stream::unfold(state, |(generation, meta, pending)| async move {
        if let Some(bytes) = pending {
            return Some((Ok(bytes), (generation, meta, None)));
        }
        let mut generation = generation?;
        let out = match generation.next().await? {
            EngineEvent::Token(t) => meta.chunk(json!({"content": t}), None),
            // An SSE comment: clients ignore it, and it keeps a waiting connection open.
            EngineEvent::Queued { .. } | EngineEvent::Started => {
                Bytes::from_static(b": waiting\n\n")
            }
            EngineEvent::Done(c) => {
                let mut finish = meta.chunk_value(json!({}), Some(c.finish_reason.as_str()));
                if meta.logprobs {
                    finish["choices"][0]["logprobs"] = logprobs(&c, true);
                }
                let mut out = event(&finish).to_vec();
                if meta.include_usage {
                    let mut last = json!({
                        "id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                        "model": meta.model, "choices": [], "usage": usage(&c),
                    });
                    last["timings"] = timings(&c);
                    out.extend_from_slice(&event(&last));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                return Some((Ok(Bytes::from(out)), (None, meta, None)));
            }
            EngineEvent::Error(e) => {
                let body = json!({"error": {"message": e.to_string(), "type": "engine_error"}});
                return Some((Ok(event(&body)), (None, meta, None)));
            }
        };
        Some((Ok(out), (Some(generation), meta, None)))
    })
}
