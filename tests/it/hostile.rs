//! Generated hostile input (proptest): websocket frames of any bytes, any JSON and any field
//! values, replayed and out of order; mutated protocol files; `/v1` request bodies; spreadsheet
//! cells; lines of a pairs file. The invariant everywhere: no panic, no 5xx for bad input, an
//! error that says what was wrong. `COLLABLLM_PROPTEST_CASES` multiplies the number of cases (a
//! longer run: `COLLABLLM_PROPTEST_CASES=20 cargo test --test it hostile`).

use std::path::Path;

use collabllm::export::neutralise;
use collabllm::protocol::LoadedProtocol;
use collabllm::study::frames::ServerFrame;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

use crate::common::{models_dir, repo_root, write_temp, TestApp, TestDb};
use crate::openai::post_text;
use crate::participant::{Browser, Socket};

/// Cases of each property in one run of the suite, times `COLLABLLM_PROPTEST_CASES`.
fn cases(base: u32) -> u32 {
    let factor = std::env::var("COLLABLLM_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1);
    base * factor.max(1)
}

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value for a field that wants an integer: sometimes one, sometimes anything.
fn number_or_not() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (-3i64..40).prop_map(Value::from),
        1 => Just(Value::from(i64::MAX)),
        1 => Just(Value::from(i64::MIN)),
        1 => Just(Value::from(u64::MAX)),
        1 => Just(json!(1e300)),
        1 => any_json(),
    ]
}

/// Text of any length up to a little over the protocol's limits, of any characters.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,60}",
        1 => ".{0,20}".prop_map(|s| s.repeat(500)),
        1 => Just("x".repeat(8 * 1024 + 1)),
        1 => Just("=HYPERLINK(\"http://evil\")".to_string()),
    ]
}

/// A client frame: garbage text, any JSON, or a frame of a real type whose fields are anything.
fn hostile_frame() -> impl Strategy<Value = String> {
    let kinds = prop::sample::select(vec![
        "hello",
        "user_message",
        "stop",
        "doc_update",
        "rating",
        "finish",
        "final_answers",
        "regenerate",
        "choose",
        "event",
        "launch_missiles",
    ]);
    let typed = (
        kinds,
        number_or_not(),
        any_text(),
        number_or_not(),
        prop::sample::select(vec!["interaction", "overall", "", "x"]),
        prop::sample::select(vec!["a", "b", "tie", "both_bad", "c", ""]),
        any_json(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(kind, seq, text, number, key, choice, extra, drop_seq, unknown)| {
                let mut frame = json!({
                    "type": kind,
                    "client_seq": seq,
                    "text": text,
                    "content": text,
                    "base_rev": number,
                    "value": number,
                    "key": key,
                    "choice": choice,
                    "kind": key,
                    "data": extra,
                    "ratings": {key: number},
                    "answers": {key: text},
                });
                // Only the fields the type has (unknown fields are refused too, which is tested
                // by the frames that keep them).
                let keep: &[&str] = match kind {
                    "user_message" => &["text"],
                    "doc_update" => &["base_rev", "content"],
                    "rating" => &["key", "value"],
                    "final_answers" => &["ratings", "answers"],
                    "choose" => &["choice"],
                    "event" => &["kind", "data"],
                    _ => &[],
                };
                let object = frame.as_object_mut().expect("an object");
                if !unknown {
                    object.retain(|k, _| {
                        k == "type" || k == "client_seq" || keep.contains(&k.as_str())
                    });
                }
                if drop_seq {
                    object.remove("client_seq");
                }
                frame.to_string()
            },
        );
    prop_oneof![
        1 => "\\PC{0,80}",
        1 => any_json().prop_map(|v| v.to_string()),
        6 => typed,
    ]
}

/// A participant of the quick pilot with an open socket that said hello.
async fn participant(base: &str, host: &str, pid: &str) -> Socket {
    let mut browser = Browser::new(base);
    browser.enter("quick-pilot", Some(pid)).await;
    browser.consent("quick-pilot", "agree").await;
    let mut socket = Socket::connect(host, "quick-pilot", browser.token.as_deref()).await;
    assert!(matches!(socket.hello().await, ServerFrame::State(_)));
    socket
}

/// Thousands of generated frames, some replayed, over real sockets: every frame gets an answer
/// (an acknowledgement, an error that says why, or the state), the connection stays open, and
/// the server goes on serving new participants.
#[tokio::test(flavor = "multi_thread")]
async fn generated_frames_are_answered_and_never_break_the_server() {
    let db = TestDb::sqlite();
    let server = TestApp::new(&db).start();
    let (base, host) = (server.url(""), server.addr.to_string());
    let mut runner = TestRunner::new(Config {
        rng_seed: proptest::test_runner::RngSeed::Fixed(7),
        ..Config::default()
    });
    let strategy = hostile_frame();
    let frames = cases(1500) as usize;
    let mut sent: Vec<String> = Vec::new();
    let mut socket = participant(&base, &host, "pid-hostile-0").await;
    for i in 0..frames {
        if i % 300 == 299 {
            socket = participant(&base, &host, &format!("pid-hostile-{i}")).await;
        }
        let replay = !sent.is_empty() && i % 7 == 3;
        let frame = if replay {
            sent[(i * 31) % sent.len()].clone()
        } else {
            strategy.new_tree(&mut runner).expect("a frame").current()
        };
        socket.raw(&frame).await;
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match socket.next().await {
                    f @ (ServerFrame::Ack { .. } | ServerFrame::State(_)) => return f,
                    ServerFrame::Error {
                        ref code,
                        ref message,
                        ..
                    } if code.is_empty() || message.is_empty() => {
                        panic!("an error frame without a code or a reason, for {frame}")
                    }
                    f @ ServerFrame::Error { .. } => return f,
                    _ => {} // a reply streaming, a rating request, the end of the session
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("frame {i} got no answer: {frame}"));
        drop(answer);
        sent.push(frame);
    }
    // The server still serves a new participant and its health.
    let mut fresh = participant(&base, &host, "pid-after-the-storm").await;
    fresh.raw(r#"{"type":"stop","client_seq":1}"#).await;
    let health = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
}

/// Generated `/v1` request bodies: any JSON, and requests of the right shape with any values
/// (grammars, schemas, stops, huge numbers). Never a 5xx, always a JSON error that says why.
#[tokio::test(flavor = "multi_thread")]
async fn generated_api_requests_never_get_a_server_error() {
    let db = TestDb::sqlite();
    let server = TestApp::new(&db).start();
    // Each field is valid most of the time, so that some requests reach the model.
    let mostly = |valid: BoxedStrategy<Value>| prop_oneof![4 => valid, 1 => any_json()];
    let shaped = (
        prop::sample::select(vec![
            "smollm2-135m",
            "smollm2-135m",
            "smollm2-135m",
            "nope",
            "",
        ]),
        prop::collection::vec(
            (
                prop::sample::select(vec!["user", "user", "system", "assistant", "tool", "x"]),
                mostly(".{0,40}".prop_map(Value::from).boxed()),
            ),
            0..4,
        ),
        mostly((1i64..16).prop_map(Value::from).boxed()),
        mostly((0.0f64..2.0).prop_map(Value::from).boxed()),
        prop::sample::select(vec![
            json!(null),
            json!(null),
            json!({"type": "json_object"}),
            json!({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}),
            json!({"type": "json_schema", "json_schema": {"schema": {"$ref": "#"}}}),
            json!({"type": "grammar"}),
        ]),
        prop::sample::select(vec![
            json!(null),
            json!(null),
            json!(null),
            json!("root ::= \"a\""),
            json!("root ::= root"),
            json!("root ::= ("),
            json!(""),
            json!(7),
        ]),
        mostly(prop_oneof![Just(json!(null)), ".{0,8}".prop_map(|s| json!([s]))].boxed()),
    )
        .prop_map(
            |(model, messages, max_tokens, temperature, format, grammar, stop)| {
                let messages: Vec<Value> = messages
                    .into_iter()
                    .map(|(role, content)| json!({"role": role, "content": content}))
                    .collect();
                json!({
                    "model": model, "messages": messages, "max_tokens": max_tokens,
                    "temperature": temperature, "response_format": format, "grammar": grammar,
                    "stop": stop, "stream": false,
                })
            },
        );
    let strategy = prop_oneof![1 => any_json(), 4 => shaped];
    let mut runner = TestRunner::new(Config {
        rng_seed: proptest::test_runner::RngSeed::Fixed(11),
        ..Config::default()
    });
    let mut served = 0;
    for i in 0..cases(600) {
        let body = strategy.new_tree(&mut runner).expect("a body").current();
        let (status, text) = post_text(&server, &body).await;
        assert!(status < 500, "request {i} got {status}: {body} -> {text}");
        served += usize::from(status == 200);
        if status >= 400 {
            let error: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("request {i}: the error is not JSON ({e}): {text}"));
            let (kind, message) = (
                error["error"]["code"].as_str(),
                error["error"]["message"].as_str(),
            );
            assert!(
                kind.is_some_and(|k| !k.is_empty()) && message.is_some_and(|m| !m.is_empty()),
                "request {i}: no kind or reason given: {text}"
            );
        }
    }
    // The generator reaches the model too, not only the request's validation.
    assert!(served > 0, "no generated request was served");
}

/// The quick pilot with one random edit: a line deleted, duplicated or cut, or junk written into
/// it. Checking it never panics, and every problem points at a line of the file.
#[test]
fn mutated_protocol_files_get_diagnostics_with_their_line() {
    let path = repo_root().join("study-protocols/quick-pilot.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<String> = original.lines().map(str::to_string).collect();
    let edit = (
        0..lines.len(),
        0..4u8,
        prop_oneof!["\\PC{0,12}", Just("=".to_string()), Just("[[".to_string())],
        0..200usize,
    );
    let mut runner = TestRunner::new(Config {
        cases: cases(2000),
        rng_seed: proptest::test_runner::RngSeed::Fixed(3),
        ..Config::default()
    });
    runner
        .run(&edit, |(at, how, junk, cut)| {
            let mut edited = lines.clone();
            match how {
                0 => {
                    edited.remove(at);
                }
                1 => edited.insert(at, lines[at].clone()),
                2 => {
                    let line = &lines[at];
                    let end = line.char_indices().nth(cut).map_or(line.len(), |(i, _)| i);
                    edited[at] = line[..end].to_string();
                }
                _ => {
                    let line = &lines[at];
                    let mid = line.char_indices().nth(cut).map_or(line.len(), |(i, _)| i);
                    edited[at] = format!("{}{junk}{}", &line[..mid], &line[mid..]);
                }
            }
            let text = edited.join("\n");
            let line_count = edited.len().max(1);
            match LoadedProtocol::from_text(&path, text.clone(), &models_dir()) {
                Ok(_) => {}
                Err(e) => {
                    let diagnostics = e.diagnostics();
                    prop_assert!(!diagnostics.is_empty(), "no diagnostic: {e}");
                    for d in diagnostics {
                        prop_assert_eq!(&d.path, &path);
                        prop_assert!(
                            d.line >= 1 && d.line <= line_count + 1,
                            "line {} of {}: {}",
                            d.line,
                            line_count,
                            d
                        );
                        prop_assert!(!d.message.trim().is_empty(), "an empty message: {d}");
                    }
                }
            }
            Ok(())
        })
        .unwrap();
}

/// What a spreadsheet reads as the start of a formula (with the full-width forms).
const FORMULA_STARTS: [char; 8] = [
    '=', '+', '-', '@', '\u{ff1d}', '\u{ff0b}', '\u{ff0d}', '\u{ff20}',
];

proptest! {
    #![proptest_config(Config { cases: cases(5000), ..Config::default() })]

    /// Whatever the text, the cell a spreadsheet reads does not start a formula, and only an
    /// apostrophe was added.
    #[test]
    fn no_cell_starts_a_formula(text in prop_oneof![
        "\\PC{0,20}",
        "[ \\t\\r\\n\u{3000}]{0,3}[=+\\-@\u{ff1d}\u{ff0b}\u{ff0d}\u{ff20}]\\PC{0,10}",
    ]) {
        let cell = neutralise(&text);
        prop_assert!(cell == text || cell == format!("'{text}"), "{cell:?}");
        if cell == text {
            prop_assert!(!cell.starts_with(['\t', '\r', '\n']));
            prop_assert!(!cell.trim_start().starts_with(FORMULA_STARTS));
        }
    }
}

/// A pairs file of generated lines (any JSON, near-misses of TRL's format, garbage): reading it
/// never panics; it is refused at the line that is wrong, or every line is counted.
#[test]
fn generated_pairs_files_are_read_or_refused_at_their_line() {
    let message = (
        prop::sample::select(vec!["user", "assistant", "system", "bot"]),
        prop_oneof![".{0,20}".prop_map(Value::from), any_json()],
    )
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    let row = (
        prop::collection::vec(message.clone(), 0..3),
        prop::collection::vec(message.clone(), 0..2),
        prop::collection::vec(message, 0..2),
        any::<u8>(),
    )
        .prop_map(|(prompt, chosen, rejected, drop)| {
            let mut row = json!({"prompt": prompt, "chosen": chosen, "rejected": rejected});
            match drop % 5 {
                0 => {
                    row.as_object_mut().unwrap().remove("prompt");
                }
                1 => row = json!({"prompt": "a string", "completion": chosen, "label": true}),
                _ => {}
            }
            row.to_string()
        });
    let line =
        prop_oneof![4 => row, 1 => any_json().prop_map(|v| v.to_string()), 1 => "\\PC{0,30}"];
    let dir = tempfile::tempdir().unwrap();
    let mut runner = TestRunner::new(Config {
        cases: cases(1000),
        rng_seed: proptest::test_runner::RngSeed::Fixed(5),
        ..Config::default()
    });
    runner
        .run(&prop::collection::vec(line, 1..6), |lines| {
            let path = write_temp(dir.path(), "pairs.jsonl", &lines.join("\n"));
            match collabllm::train::data::read_pairs(std::slice::from_ref(&path)) {
                Ok(read) => {
                    let rows = lines.iter().filter(|l| !l.trim().is_empty()).count();
                    prop_assert_eq!(read.pairs.len() + read.kto_rows, rows);
                }
                Err(e) => {
                    let said = e.to_string();
                    let at = Path::new(&path).display().to_string();
                    prop_assert!(said.contains(&format!("{at}:")), "{said}");
                }
            }
            Ok(())
        })
        .unwrap();
}
