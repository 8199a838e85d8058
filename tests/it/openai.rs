//! The OpenAI-compatible `/v1` API with plain HTTP, as third-party clients use it.

use serde_json::{json, Value};

use crate::common::{state_with_model, TestApp, TestDb, TestServer, TEST_API_KEY};

async fn post(server: &TestServer, body: Value) -> (u16, Value) {
    let (status, text) = post_text(server, &body).await;
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, body)
}

/// `POST /v1/chat/completions` with the test key: the status and the body as text.
pub async fn post_text(server: &TestServer, body: &Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(TEST_API_KEY)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_completions_follow_the_openai_shape() {
    let db = TestDb::sqlite();
    let server = TestServer::start(state_with_model(&db));
    let models: Value = reqwest::Client::new()
        .get(server.url("/v1/models"))
        .bearer_auth(TEST_API_KEY)
        .send()
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
               // Greedy and seeded: a random walk may spend every token on the white space the
               // grammar allows, and a JSON value cut by max_tokens does not parse.
               "temperature": 0, "seed": 7, "max_tokens": 64}),
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
        .bearer_auth(TEST_API_KEY)
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

/// `logprobs` as OpenAI's clients read them: one entry per generated token whose tokens spell the
/// text, log-probabilities of at most 0, the alternatives most likely first, the greedy pick the
/// likeliest (no repeat penalty); a stream carries the same entries in its last chunk.
#[tokio::test(flavor = "multi_thread")]
async fn logprobs_give_each_token_and_its_likeliest_alternatives() {
    let db = TestDb::sqlite();
    let server = TestServer::start(state_with_model(&db));
    let request = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Name a colour."}],
                         "max_tokens": 8, "temperature": 0, "repeat_penalty": 1.0, "logprobs": true, "top_logprobs": 4});
    let (status, body) = post(&server, request.clone()).await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    let tokens = body["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(content.len(), tokens, "{body}");
    let mut spelled = Vec::new();
    for entry in content {
        let bytes: Vec<u8> = entry["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        spelled.extend_from_slice(&bytes);
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 4);
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(
            lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0,
            "{lps:?}"
        );
        assert_eq!(
            top[0]["token"], entry["token"],
            "greedy picks the likeliest"
        );
        assert!(
            (top[0]["logprob"].as_f64().unwrap() - entry["logprob"].as_f64().unwrap()).abs() < 1e-6
        );
    }
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(String::from_utf8(spelled).unwrap(), text);

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (status, events) = post_text(&server, &streamed).await;
    assert_eq!(status, 200);
    let last: Value = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|c| c["choices"][0]["finish_reason"].is_string())
        .unwrap();
    assert_eq!(
        last["choices"][0]["logprobs"]["content"],
        body["choices"][0]["logprobs"]["content"]
    );

    let (status, body) = post(
        &server,
        json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}],
                                               "logprobs": true, "top_logprobs": 21}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("top_logprobs"),
        "{body}"
    );
    let (status, body) = post(
        &server,
        json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}],
                                               "top_logprobs": 2}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_json_errors() {
    let db = TestDb::sqlite();
    let server = TestApp::new(&db).start();
    let (status, body) = post(
        &server,
        json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("smollm2-135m"));
    let (status, body) = post(&server, json!({"model": "smollm2-135m", "messages": []})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
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
        .bearer_auth(TEST_API_KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_grammar_can_end_the_process() {
    let db = TestDb::sqlite();
    let server = TestServer::start(state_with_model(&db));
    let chain = |n: usize| {
        (0..n)
            .map(|i| format!("r{i} ::= r{}\n", i + 1))
            .collect::<String>()
            + &format!("r{n} ::= \"x\"\n")
    };
    let nested = format!("root ::= {}\"x\"{}", "(".repeat(200), ")".repeat(200));
    let mut deep_schema = json!({"type": "string"});
    // Deep enough for the converter's recursion, shallow enough for the JSON parser's limit.
    for _ in 0..20 {
        deep_schema = json!({"type": "object", "properties": {"a": deep_schema}});
    }
    let hostile: Vec<(Value, &str)> = vec![
        // Nothing is allowed: every token is ruled out.
        (
            json!({"grammar": "root ::= [^\\x00-\\U0010FFFF]"}),
            "allows no continuation",
        ),
        // Only a NUL byte, which no token's text holds.
        (
            json!({"grammar": "root ::= \"\\x00\""}),
            "allows no continuation",
        ),
        (
            json!({"grammar": format!("root ::= r0\n{}", chain(50_000))}),
            "bytes",
        ),
        (
            json!({"grammar": format!("root ::= r0\n{}", chain(300))}),
            "rules",
        ),
        (json!({"grammar": nested}), "nests"),
        (json!({"grammar": "root ::= (("}), "invalid grammar"),
        (
            json!({"grammar": "root ::= \"a\"{1000000}"}),
            "invalid grammar",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": deep_schema}}}),
            "nests",
        ),
    ];
    for (extra, why) in hostile {
        let mut body = json!({
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 8,
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, reply) = post(&server, body).await;
        assert_eq!(status, 400, "{reply}");
        assert_eq!(reply["error"]["code"], "invalid_request", "{reply}");
        assert!(
            reply["error"]["message"].as_str().unwrap().contains(why),
            "{why}: {reply}"
        );
    }
    // The server is still there, and grammars that make sense still work.
    let (status, reply) = post(
        &server,
        json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Yes or no?"}],
               "grammar": "root ::= \"yes\" | \"no\"", "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let text = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text == "yes" || text == "no", "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_needs_a_key_and_is_off_without_one() {
    let db = TestDb::sqlite();
    let mut state = TestApp::new(&db).state();
    let pool = state.pool.clone();
    let body = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let ask = |server: &TestServer, key: Option<&str>| {
        let mut r = reqwest::Client::new()
            .post(server.url("/v1/chat/completions"))
            .json(&body);
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    // No key anywhere: the API is off and says how to turn it on.
    state.api_keys = Default::default();
    let server = TestServer::start(state.clone());
    let (status, reply) = ask(&server, Some("anything")).await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (403, Some("disabled")),
        "{reply}"
    );
    assert!(reply["error"]["message"]
        .as_str()
        .unwrap()
        .contains("COLLABLLM_API_KEYS"));
    let models = reqwest::get(server.url("/v1/models")).await.unwrap();
    assert_eq!(models.status(), 403);
    // A key made with `collabllm key add` (stored as its sha256) opens it; others do not.
    let key = "clm-made-by-key-add";
    collabllm::db::api_keys::set(
        &mut pool.get().unwrap(),
        "node-2",
        &collabllm::web::openai::key_sha256(key),
    )
    .unwrap();
    for wrong in [None, Some("clm-guess"), Some(TEST_API_KEY)] {
        let (status, reply) = ask(&server, wrong).await;
        assert_eq!(
            (status, reply["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{reply}"
        );
    }
    // A body that does not parse is not looked at without a key.
    let garbage = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 401);
    let garbage = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    let reply: Value = garbage.json().await.unwrap();
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON body"),
        "{reply}"
    );
    let (status, reply) = ask(&server, Some(key)).await;
    assert_eq!(status, 200, "{reply}");
}

/// `/healthz` lists every engine with whether it runs and how often it was restarted.
#[tokio::test(flavor = "multi_thread")]
async fn healthz_reports_every_engine() {
    let db = TestDb::sqlite();
    let server = TestServer::start(state_with_model(&db));
    let r = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    let engine = &body["engines"][0];
    assert_eq!(engine["model"], "smollm2-135m");
    assert_eq!(engine["backend"], "llama.cpp");
    assert_eq!(engine["running"], true);
    assert_eq!(engine["restarts"], 0);
}

/// A prompt of megabytes is refused as too long before it is tokenised.
#[tokio::test(flavor = "multi_thread")]
async fn a_prompt_of_megabytes_is_refused_as_too_long() {
    let db = TestDb::sqlite();
    let server = TestServer::start(state_with_model(&db));
    let huge = "word ".repeat(700_000);
    let (status, body) = post(
        &server,
        json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": huge}]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens"),
        "{body}"
    );
}
