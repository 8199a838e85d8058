//! The OpenAI-compatible `/v1` API with plain HTTP, as third-party clients use it.

use serde_json::{json, Value};

use crate::common::{state_with_model, TestDb, TestServer};

async fn post(server: &TestServer, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_completions_follow_the_openai_shape() {
    let db = TestDb::sqlite();
    let server = TestServer::start(state_with_model(&db));
    let models: Value = reqwest::get(server.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2-135m");

    let (status, body) = post(
        &server,
        json!({
            "model": "smollm2-135m",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 16, "ignore_eos": true, "temperature": 0, "logprobs": false,
            "frequency_penalty": 0, "n": 1, "some_future_field": {"x": 1}
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["usage"]["completion_tokens"], 16,
        "ignore_eos generates exactly max_tokens"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");

    let (status, body) = post(
        &server,
        json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Give JSON"}],
               "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema":
                   {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}},
               "max_tokens": 32}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let content: Value =
        serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(content["ok"].is_boolean());
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_ends_with_usage_and_done() {
    let db = TestDb::sqlite();
    let server = TestServer::start(state_with_model(&db));
    let text = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Count to three."}],
                      "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 12}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"].is_string()));
    assert!(
        chunks.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_json_errors() {
    let db = TestDb::sqlite();
    let server = TestServer::start(state_with_model(&db));
    let (status, body) = post(
        &server,
        json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "model_not_found");
    assert!(body["message"].as_str().unwrap().contains("smollm2-135m"));
    let (status, body) = post(&server, json!({"model": "smollm2-135m", "messages": []})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, body) = post(
        &server,
        json!({"model": "smollm2-135m", "messages": [{"role": "tool", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(&server, json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "top_p": 7})).await;
    assert_eq!(status, 400, "{body}");
    let r = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "bad_request");
}
