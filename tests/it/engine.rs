//! The llama.cpp engine with the real SmolLM2-135M model: streaming, batching, prefix reuse,
//! cancellation, constrained output, determinism, eviction, bad input, and the remote backend.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use collabllm::engine::llama::{self, LlamaEngine, LoadedModel, WorkerConfig};
use collabllm::engine::remote::RemoteEngine;
use collabllm::engine::{
    ChatMessage, ChatRequest, Completion, Constraint, Engine, EngineError, EngineEvent,
    EngineStatus, FinishReason, Generation, Priority, Role, Sampling,
};

use crate::common::{model_path, state_with_model, TestDb, TestServer, TEST_API_KEY};

/// The model, loaded once for all tests of this binary.
fn model() -> Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            llama::load_model(&model_path(), None, &[]).expect("load the default model")
        })
        .clone()
}

/// Tokens of a reply before a participant may pause it, in the tests' engines.
const TIME_SLICE: u32 = 16;

fn engine(slots: u32, context_tokens: u32) -> LlamaEngine {
    engine_with(slots, context_tokens, 1 << 30)
}

/// An engine that keeps up to `saved_cache_bytes` of evicted conversations' caches in RAM.
fn engine_with(slots: u32, context_tokens: u32, saved_cache_bytes: usize) -> LlamaEngine {
    spawn_engine(slots, context_tokens, saved_cache_bytes, TIME_SLICE)
}

/// An engine whose replies are never paused: participants wait for a slot.
fn engine_without_time_slices(slots: u32, context_tokens: u32) -> LlamaEngine {
    spawn_engine(slots, context_tokens, 1 << 30, 0)
}

fn spawn_engine(
    slots: u32,
    context_tokens: u32,
    saved_cache_bytes: usize,
    time_slice_tokens: u32,
) -> LlamaEngine {
    LlamaEngine::spawn(
        model(),
        WorkerConfig {
            name: "test".into(),
            context_tokens,
            slots,
            lora: None,
            reuse_prefix: true,
            saved_cache_bytes,
            time_slice_tokens,
            flash_attention: false,
        },
    )
    .expect("start worker")
}

fn greedy(max_tokens: u32) -> Sampling {
    Sampling {
        temperature: 0.0,
        max_tokens,
        ..Sampling::default()
    }
}

fn chat(user: &str, sampling: Sampling) -> ChatRequest {
    ChatRequest::new(
        vec![
            ChatMessage::new(Role::System, "You are a helpful assistant."),
            ChatMessage::new(Role::User, user),
        ],
        sampling,
    )
}

/// All events of a generation: the streamed pieces and how it ended.
async fn collect(mut generation: Generation) -> (Vec<String>, Result<Completion, EngineError>) {
    let mut pieces = Vec::new();
    while let Some(event) = generation.next().await {
        match event {
            EngineEvent::Token(t) => pieces.push(t),
            EngineEvent::Queued { .. } | EngineEvent::Started => {}
            EngineEvent::Done(c) => return (pieces, Ok(c)),
            EngineEvent::Error(e) => return (pieces, Err(e)),
        }
    }
    (pieces, Err(EngineError::Stopped))
}

async fn run(engine: &dyn Engine, request: ChatRequest) -> Completion {
    let (pieces, done) = collect(engine.start(request).expect("queued")).await;
    let done = done.expect("completion");
    assert_eq!(
        pieces.concat(),
        done.text,
        "streamed pieces add up to the reply"
    );
    done
}

#[tokio::test]
async fn the_default_model_generates_a_few_tokens() {
    let engine = engine(1, 2048);
    let c = run(&engine, chat("Say hello.", greedy(8))).await;
    assert!(!c.text.trim().is_empty());
    assert!(c.generated_tokens >= 1 && c.generated_tokens <= 8, "{c:?}");
    assert!(c.prompt_tokens > 5);
    assert_eq!(engine.fingerprint(), model().sha256);
    assert_eq!(
        model().sha256,
        collabllm::engine::fetch::DEFAULT_MODEL_SHA256,
        "the model in models/ is the pinned one"
    );
}

#[tokio::test]
async fn streamed_text_is_in_order_and_never_splits_a_character() {
    let engine = engine(1, 2048);
    let request = chat(
        "Repeat this line five times: café, naïve, 日本語, emoji 🙂🎉",
        greedy(120),
    );
    let c = run(&engine, request).await;
    assert!(
        !c.text.contains('\u{FFFD}'),
        "no broken characters: {:?}",
        c.text
    );
    assert!(
        !c.text.is_ascii(),
        "the reply has multi-byte text: {:?}",
        c.text
    );
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_reply() {
    four_at_once_on_two_engines(|| engine(4, 2048)).await;
}

/// The same with ggml's flash-attention kernel (a model's `flash_attention = true`).
#[tokio::test]
async fn concurrent_requests_each_get_their_own_reply_with_flash_attention() {
    four_at_once_on_two_engines(|| {
        LlamaEngine::spawn(
            model(),
            WorkerConfig {
                name: "flash".into(),
                context_tokens: 2048,
                slots: 4,
                lora: None,
                reuse_prefix: true,
                saved_cache_bytes: 1 << 30,
                time_slice_tokens: TIME_SLICE,
                flash_attention: true,
            },
        )
        .expect("start worker")
    })
    .await;
}

/// The same four requests at once on two fresh engines: each stream is its own reply, whole and
/// in order, and the same batches give the same replies. (A reply computed alone can differ from
/// one batched with others in the last bits of the logits: the plain attention path is not
/// batch-invariant.) Queued as a group, they are admitted in one step on both runs; one by one,
/// the first could start alone.
async fn four_at_once_on_two_engines(new_engine: impl Fn() -> LlamaEngine) {
    let prompts = [
        "What is the capital of France?",
        "Name three colours.",
        "Write one sentence about the sea.",
        "What is 2 + 2?",
    ];
    let mut runs = Vec::new();
    for _ in 0..2 {
        let engine = new_engine();
        let generations: Vec<_> = engine
            .start_group(prompts.iter().map(|p| chat(p, greedy(24))).collect())
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let mut together = Vec::new();
        for g in generations {
            let (pieces, done) = collect(g).await;
            let done = done.unwrap();
            assert_eq!(pieces.concat(), done.text);
            assert!(done.generated_tokens > 0);
            together.push(done.text);
        }
        assert!(engine.status().generated_tokens >= 4 * 10);
        runs.push(together);
    }
    let distinct: std::collections::HashSet<&String> = runs[0].iter().collect();
    assert_eq!(
        distinct.len(),
        4,
        "four prompts, four replies: {:?}",
        runs[0]
    );
    assert_eq!(runs[0], runs[1], "the same batches give the same replies");
}

#[tokio::test]
async fn cancelling_frees_the_slot_for_the_next_request() {
    let engine = engine(1, 2048);
    let mut long = chat("Tell me a long story.", greedy(1500));
    long.ignore_eos = true;
    let mut first = engine.start(long).unwrap();
    // The second request waits: the only slot is busy.
    let second = engine.start(chat("Say yes.", greedy(4))).unwrap();
    match first.next().await {
        Some(EngineEvent::Token(_)) => {}
        other => panic!("expected a token, got {other:?}"),
    }
    first.cancel();
    let (_, done) = collect(first).await;
    let done = done.unwrap();
    assert_eq!(done.finish_reason, FinishReason::Cancelled);
    assert!(done.generated_tokens < 1500);
    let (_, second) = tokio::time::timeout(Duration::from_secs(60), collect(second))
        .await
        .expect("the queued request starts after the cancellation");
    assert!(second.is_ok());
}

#[tokio::test]
async fn dropping_the_stream_cancels_the_generation() {
    let engine = engine(1, 2048);
    let mut long = chat("Count to one thousand.", greedy(1500));
    long.ignore_eos = true;
    let mut g = engine.start(long).unwrap();
    assert!(matches!(g.next().await, Some(EngineEvent::Token(_))));
    drop(g);
    let c = tokio::time::timeout(Duration::from_secs(60), run(&engine, chat("Hi", greedy(4))))
        .await
        .expect("the slot was freed");
    assert!(c.generated_tokens > 0);
}

fn two_turns(first_reply: &str) -> Vec<ChatMessage> {
    vec![
        ChatMessage::new(Role::System, "You are a writing assistant. ".repeat(20)),
        ChatMessage::new(Role::User, "Help me write a note to my neighbour."),
        ChatMessage::new(Role::Assistant, first_reply),
        ChatMessage::new(Role::User, "Make it shorter."),
    ]
}

#[tokio::test]
async fn the_second_turn_only_processes_what_is_new() {
    let engine = engine(2, 4096);
    let mut turn1 = ChatRequest::new(two_turns("")[..2].to_vec(), greedy(40));
    turn1.conversation = Some("conv-a".into());
    let reply = run(&engine, turn1).await;
    assert_eq!(reply.prompt_tokens_processed, reply.prompt_tokens);
    let mut turn2 = ChatRequest::new(two_turns(&reply.text), greedy(20));
    turn2.conversation = Some("conv-a".into());
    let c = run(&engine, turn2).await;
    assert!(
        c.prompt_tokens_processed * 5 < c.prompt_tokens,
        "turn 2 computed {} of {} prompt tokens",
        c.prompt_tokens_processed,
        c.prompt_tokens
    );
    assert!(engine.status().prompt_tokens_reused > 0);
}

#[tokio::test]
async fn a_request_without_conversation_id_reuses_the_slot_with_the_longest_prefix() {
    let engine = engine(3, 4096);
    // Fill the other slots with unrelated conversations.
    run(&engine, chat("Unrelated one.", greedy(4))).await;
    let reply = run(
        &engine,
        ChatRequest::new(two_turns("")[..2].to_vec(), greedy(30)),
    )
    .await;
    run(&engine, chat("Unrelated two.", greedy(4))).await;
    let c = run(
        &engine,
        ChatRequest::new(two_turns(&reply.text), greedy(10)),
    )
    .await;
    assert!(
        c.prompt_tokens_processed * 5 < c.prompt_tokens,
        "computed {} of {}",
        c.prompt_tokens_processed,
        c.prompt_tokens
    );
}

/// Turn 1 of a conversation named `name`, and its reply.
async fn first_turn(engine: &dyn Engine, name: &str) -> (ChatRequest, Completion) {
    let mut r = ChatRequest::new(two_turns("")[..2].to_vec(), greedy(12));
    r.messages[1].content = format!("Conversation {name}: help me write a note.");
    r.conversation = Some(name.into());
    let reply = run(engine, r.clone()).await;
    (r, reply)
}

fn next_turn(mut r: ChatRequest, reply: &Completion) -> ChatRequest {
    r.messages
        .push(ChatMessage::new(Role::Assistant, reply.text.clone()));
    r.messages.push(ChatMessage::new(Role::User, "Thanks."));
    r.sampling.max_tokens = 8;
    r
}

/// More conversations than slots: the least recently used loses its slot. Its cache is kept in
/// RAM and put back when it returns (the same state, so the same reply as if it had never left);
/// with no RAM for caches, it is computed again.
#[tokio::test]
async fn a_conversation_that_lost_its_slot_is_restored_from_ram_or_recomputed() {
    // Reference: turn 2 of "a" while its turn 1 is still cached.
    let fresh = engine(2, 4096);
    let (a, reply) = first_turn(&fresh, "a").await;
    let cached = run(&fresh, next_turn(a, &reply)).await;

    for saved_cache_bytes in [1 << 30, 0] {
        let engine = engine_with(2, 4096, saved_cache_bytes);
        let (a, reply_a) = first_turn(&engine, "a").await;
        first_turn(&engine, "b").await;
        first_turn(&engine, "c").await; // takes the slot of "a", the least recently used
        let returned = run(&engine, next_turn(a, &reply_a)).await;
        assert!(!returned.text.is_empty());
        if saved_cache_bytes > 0 {
            assert_eq!(
                returned.text, cached.text,
                "the restored cache is the same state"
            );
            assert_eq!(
                returned.prompt_tokens_processed, cached.prompt_tokens_processed,
                "restored from RAM, not computed again"
            );
            assert_eq!(engine.status().caches_restored, 1);
        } else {
            assert!(
                returned.prompt_tokens_processed > cached.prompt_tokens_processed + 5,
                "recomputed: {} tokens computed, cached: {}",
                returned.prompt_tokens_processed,
                cached.prompt_tokens_processed
            );
            assert_eq!(engine.status().caches_restored, 0);
        }
    }
}

/// A request that keeps its slot busy for a while.
fn long_request(priority: Priority) -> ChatRequest {
    let mut r = chat("Tell me a long story.", greedy(400));
    r.ignore_eos = true;
    r.priority = priority;
    r
}

/// Waits (bounded) until the engine's status satisfies `done`.
async fn wait_for(engine: &dyn Engine, what: &str, done: impl Fn(&EngineStatus) -> bool) {
    for _ in 0..600 {
        if done(&engine.status()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting until {what}: {:?}", engine.status());
}

/// A participant waiting for a first token pauses running background work, and is served before
/// API requests and background work queued earlier; the paused reply then goes on to its end.
#[tokio::test]
async fn a_participant_goes_before_work_queued_earlier() {
    let engine = engine(1, 4096);
    let running = engine.start(long_request(Priority::Background)).unwrap();
    wait_for(&engine, "the first request has run for a time slice", |s| {
        s.active == 1 && s.generated_tokens > u64::from(TIME_SLICE)
    })
    .await;
    let mut background = chat("Say one word.", greedy(4));
    background.priority = Priority::Background;
    let mut api = chat("Say one word.", greedy(60));
    api.ignore_eos = true;
    api.priority = Priority::Api;
    let background = engine.start(background).unwrap();
    let api = engine.start(api).unwrap();
    wait_for(&engine, "two requests wait", |s| s.queued == 2).await;
    assert_eq!(engine.status().queued_by_priority, [0, 1, 1]);
    let done = engine
        .start(chat("Say one word.", greedy(4)))
        .unwrap()
        .finish()
        .await;
    assert!(done.unwrap().generated_tokens > 0);
    assert_eq!(
        engine.status().replies_paused,
        1,
        "the background reply was paused"
    );
    // The API request goes next (it runs for a while); the background ones wait.
    wait_for(&engine, "only background work waits", |s| {
        s.queued_by_priority == [0, 0, 1] && s.active == 1 && s.paused == 1
    })
    .await;
    api.finish().await.unwrap();
    let resumed = collect(running).await;
    let resumed_done = resumed.1.expect("the paused reply completes");
    assert_eq!(resumed_done.generated_tokens, 400);
    assert_eq!(resumed.0.concat(), resumed_done.text);
    background.finish().await.unwrap();
}

/// A participant waiting for a first token pauses a long reply once it has streamed its time
/// slice; the paused reply goes on where it stopped, to the same text as without the pause.
#[tokio::test]
async fn a_paused_reply_goes_on_to_the_same_text() {
    let mut long = chat("Tell me a long story.", greedy(160));
    long.ignore_eos = true;
    let alone = run(&engine(1, 2048), long.clone()).await;

    let engine = engine(1, 2048);
    let mut paused = engine.start(long).unwrap();
    let mut before = String::new();
    while before.len() < 200 {
        match paused.next().await {
            Some(EngineEvent::Token(t)) => before.push_str(&t),
            other => panic!("expected the reply's tokens, got {other:?}"),
        }
    }
    let other = engine.start(chat("Say one word.", greedy(4))).unwrap();
    let other = other.finish().await.expect("the participant's reply");
    assert!(other.generated_tokens > 0);
    assert_eq!(engine.status().replies_paused, 1);
    let (after, done) = collect(paused).await;
    let done = done.expect("the paused reply completes");
    assert!(
        done.total_ms > other.total_ms,
        "the other reply ended while this one was paused"
    );
    assert_eq!(done.generated_tokens, 160);
    assert_eq!(before + &after.concat(), done.text);
    assert_eq!(done.text, alone.text, "the pause does not change the reply");
    assert_eq!(
        engine.status().caches_restored,
        0,
        "the paused state is its own"
    );
}

/// What a generation told its caller before its first token: its places in line, then whether
/// it said it started.
async fn places_before_first_token(generation: &mut Generation) -> (Vec<usize>, bool) {
    let mut places = Vec::new();
    loop {
        match generation.next().await {
            Some(EngineEvent::Queued { ahead }) => places.push(ahead),
            Some(EngineEvent::Started) => return (places, true),
            Some(EngineEvent::Token(_)) => return (places, false),
            other => panic!("expected a place or a token, got {other:?}"),
        }
    }
}

/// Participants waiting for the only slot are told their place as it moves up and when their
/// reply starts; one that never waited is told nothing.
#[tokio::test]
async fn waiting_participants_are_told_their_place_in_line() {
    let engine = engine_without_time_slices(1, 4096);
    let mut running = engine.start(long_request(Priority::Participant)).unwrap();
    wait_for(&engine, "the first request runs", |s| s.active == 1).await;
    let mut first = engine.start(chat("Say one word.", greedy(4))).unwrap();
    let mut second = engine.start(chat("Say one word.", greedy(4))).unwrap();
    wait_for(&engine, "two participants wait", |s| s.queued == 2).await;
    assert_eq!(
        places_before_first_token(&mut running).await,
        (vec![], false)
    );
    running.cancel();
    assert_eq!(places_before_first_token(&mut first).await, (vec![0], true));
    assert_eq!(
        places_before_first_token(&mut second).await,
        (vec![1, 0], true)
    );
    first.finish().await.unwrap();
    second.finish().await.unwrap();
}

/// A full queue answers "busy" at once instead of making the caller wait without end.
#[tokio::test]
async fn a_full_queue_answers_busy_at_once() {
    let engine = engine(1, 4096);
    let _running = engine.start(long_request(Priority::Participant)).unwrap();
    let limit = Priority::Api.queue_limit();
    let mut waiting = Vec::new();
    for _ in 0..limit {
        let mut r = chat("Say one word.", greedy(2));
        r.priority = Priority::Api;
        waiting.push(engine.start(r).expect("room in the queue"));
    }
    let mut r = chat("Say one word.", greedy(2));
    r.priority = Priority::Api;
    match engine.start(r) {
        Err(EngineError::Busy { class, queued }) => {
            assert_eq!((class, queued), ("api", limit));
        }
        other => panic!("expected busy, got {:?}", other.map(|_| "a generation")),
    }
    // Participants have a queue of their own.
    assert!(engine.start(chat("Say one word.", greedy(2))).is_ok());
}

/// While participants are served, background work leaves a slot free for them.
#[tokio::test]
async fn background_work_leaves_a_slot_for_participants() {
    let engine = engine(4, 2048);
    run(&engine, chat("Say one word.", greedy(2))).await; // a participant was served
    let background: Vec<_> = (0..4)
        .map(|_| engine.start(long_request(Priority::Background)).unwrap())
        .collect();
    wait_for(&engine, "three background requests run", |s| s.active == 3).await;
    assert_eq!(engine.status().queued_by_priority[2], 1, "the fourth waits");
    let participant = engine.start(chat("Say one word.", greedy(4))).unwrap();
    let done = participant.finish().await.unwrap();
    assert!(done.generated_tokens > 0);
    assert_eq!(
        engine.status().queued_by_priority[2],
        1,
        "the participant took the reserved slot, not the waiting background request"
    );
    drop(background);
}

/// A prompt too long for any conversation is refused before it is queued or tokenised.
#[tokio::test]
async fn an_oversized_prompt_is_refused_before_the_worker_sees_it() {
    let engine = engine(1, 2048);
    let _running = engine.start(long_request(Priority::Participant)).unwrap();
    wait_for(&engine, "the first request runs", |s| s.active == 1).await;
    let huge = "word ".repeat(800_000); // 4 MB
    match engine.start(chat(&huge, greedy(4))) {
        Err(EngineError::PromptTooLong { tokens, limit }) => {
            assert_eq!(limit, 2047);
            assert!(tokens > limit, "{tokens}");
        }
        other => panic!(
            "expected prompt too long, got {:?}",
            other.map(|_| "a generation")
        ),
    }
    assert_eq!(engine.status().queued, 0, "nothing was queued");
}

#[tokio::test]
async fn a_json_schema_constrains_the_output_to_parseable_json() {
    let engine = engine(2, 2048);
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "thought": {"type": "string", "maxLength": 80},
            "interactivity": {"type": "number", "minimum": 0, "maximum": 1}
        },
        "required": ["thought", "interactivity"],
        "additionalProperties": false
    });
    for seed in [1, 2, 3] {
        let mut r = chat(
            "Rate how interactive this assistant was, as JSON.",
            Sampling {
                temperature: 0.8,
                seed: Some(seed),
                max_tokens: 200,
                ..Sampling::default()
            },
        );
        r.constraint = Some(Constraint::JsonSchema(schema.clone()));
        let c = run(&engine, r).await;
        let v: serde_json::Value =
            serde_json::from_str(&c.text).unwrap_or_else(|e| panic!("{e}: {:?}", c.text));
        assert!(v["thought"].is_string(), "{v}");
        assert!(v["interactivity"].is_number(), "{v}");
    }
}

#[tokio::test]
async fn a_gbnf_grammar_constrains_the_output() {
    let engine = engine(1, 2048);
    let mut r = chat(
        "Is the sky blue? Answer yes or no.",
        Sampling {
            seed: Some(5),
            ..Sampling::default()
        },
    );
    r.constraint = Some(Constraint::Grammar("root ::= \"yes\" | \"no\"".into()));
    let c = run(&engine, r).await;
    assert!(c.text == "yes" || c.text == "no", "{:?}", c.text);
}

#[tokio::test]
async fn the_same_seed_gives_the_same_text() {
    let engine = engine(1, 2048);
    let sampling = Sampling {
        temperature: 1.0,
        seed: Some(1234),
        max_tokens: 40,
        ..Sampling::default()
    };
    // Computed afresh each time: a prompt read partly from the cache gives logits that differ
    // in the last bits, enough to change what a seed samples (see the README's engine notes).
    let reproducible = |r: ChatRequest| ChatRequest {
        reproducible: true,
        ..r
    };
    let a = run(
        &engine,
        reproducible(chat("Invent a name for a cat.", sampling.clone())),
    )
    .await;
    let b = run(
        &engine,
        reproducible(chat("Invent a name for a cat.", sampling.clone())),
    )
    .await;
    assert_eq!(a.text, b.text);
    assert_eq!(a.seed, 1234);
    let other = run(
        &engine,
        chat(
            "Invent a name for a cat.",
            Sampling {
                seed: Some(99),
                ..sampling
            },
        ),
    )
    .await;
    assert_eq!(other.seed, 99);
}

#[tokio::test]
async fn stop_strings_end_the_reply_and_are_not_shown() {
    let engine = engine(1, 2048);
    let c = run(
        &engine,
        chat(
            "List five fruits, one per line.",
            Sampling {
                stop: vec!["\n".into()],
                ..greedy(60)
            },
        ),
    )
    .await;
    assert!(!c.text.contains('\n'), "{:?}", c.text);
    assert_eq!(c.finish_reason, FinishReason::Stop);
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_the_worker_keeps_serving() {
    let engine = engine(2, 512);
    let err = engine
        .start(ChatRequest::new(vec![], greedy(4)))
        .err()
        .unwrap();
    assert_eq!(err, EngineError::EmptyMessages);

    let bad_sampling = engine.start(chat(
        "hi",
        Sampling {
            top_p: 2.0,
            ..greedy(4)
        },
    ));
    assert!(matches!(bad_sampling, Err(EngineError::InvalidRequest(_))));

    let huge = chat(&"word ".repeat(2000), greedy(4));
    let (_, result) = collect(engine.start(huge).unwrap()).await;
    match result {
        Err(EngineError::PromptTooLong { tokens, limit }) => assert!(tokens > limit),
        other => panic!("expected PromptTooLong, got {other:?}"),
    }

    let mut bad_grammar = chat("hi", greedy(4));
    bad_grammar.constraint = Some(Constraint::Grammar("root ::= (".into()));
    let (_, result) = collect(engine.start(bad_grammar).unwrap()).await;
    assert!(matches!(result, Err(EngineError::Grammar(_))), "{result:?}");

    let c = run(&engine, chat("Say ok.", greedy(4))).await;
    assert!(c.generated_tokens > 0, "the worker still serves");
}

#[tokio::test]
async fn ignore_eos_generates_exactly_max_tokens() {
    let engine = engine(1, 2048);
    let mut r = chat("Hi", greedy(50));
    r.ignore_eos = true;
    let c = run(&engine, r).await;
    assert_eq!(c.generated_tokens, 50);
    assert_eq!(c.finish_reason, FinishReason::Length);
}

#[test]
fn a_corrupt_model_file_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF but not really a model").unwrap();
    let err = llama::load_model(
        &path,
        Some(collabllm::engine::fetch::DEFAULT_MODEL_SHA256),
        &[],
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("corrupt"), "{err}");
    let err = llama::load_model(&path, None, &[]).err().unwrap();
    assert!(err.to_string().contains("valid GGUF"), "{err}");
    let err = llama::load_model(&dir.path().join("none.gguf"), None, &[])
        .err()
        .unwrap();
    assert!(err.to_string().contains("models fetch"), "{err}");
}

/// llama.cpp computes with one thread per core, not the crate's default of 4 (two orders of
/// magnitude slower on a 2-core machine): after a reply, the worker's compute team — the worker
/// thread and the OpenMP threads its decodes started, which carry the worker's name — has one
/// thread per core.
#[tokio::test]
async fn an_engine_computes_with_one_thread_per_core() {
    let engine = LlamaEngine::spawn(
        model(),
        WorkerConfig {
            name: "cores".into(),
            context_tokens: 1024,
            slots: 1,
            lora: None,
            reuse_prefix: false,
            saved_cache_bytes: 0,
            time_slice_tokens: 0,
            flash_attention: false,
        },
    )
    .expect("start worker");
    run(&engine, chat("Say hello.", greedy(8))).await;
    let team = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "llama-cores")
        .count();
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(team, cores, "threads computing for the engine");
}

#[test]
fn the_remote_backend_streams_from_another_serve_instance() {
    let db = TestDb::sqlite();
    let server = TestServer::start(state_with_model(&db));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let endpoint = server.url("/v1");
        let remote =
            RemoteEngine::new(&endpoint, "smollm2-135m", Some(TEST_API_KEY.into())).unwrap();
        // The server's first request, so that it computes the whole prompt as the local engine
        // does: a later one would reuse the cached prefix of an earlier one (computed in other
        // batches, so its probabilities would differ in the last digits).
        let mut asked = chat("Say hello.", greedy(12));
        asked.top_logprobs = Some(3);
        let c = run(&remote, asked.clone()).await;
        assert!(c.generated_tokens > 0 && c.generated_tokens <= 12, "{c:?}");
        assert!(c.prompt_tokens > 5, "usage is read: {c:?}");

        // The same greedy request gives the same text locally and through /v1, and the token
        // probabilities cross /v1 as they left the engine.
        let local = run(&engine(1, 2048), asked).await;
        assert_eq!(c.text, local.text);
        assert_eq!(c.logprobs.len(), local.logprobs.len());
        for (r, l) in c.logprobs.iter().zip(&local.logprobs) {
            assert_eq!(r.bytes, l.bytes);
            assert_eq!(r.top.len(), 3);
            assert!((r.logprob - l.logprob).abs() < 1e-3, "{r:?} {l:?}");
        }

        let mut constrained = chat("Is water wet?", greedy(8));
        constrained.constraint = Some(Constraint::Grammar("root ::= \"yes\" | \"no\"".into()));
        let c = run(&remote, constrained).await;
        assert!(c.text == "yes" || c.text == "no", "{:?}", c.text);

        let unknown =
            RemoteEngine::new(&endpoint, "no-such-model", Some(TEST_API_KEY.into())).unwrap();
        let (_, err) = collect(unknown.start(chat("hi", greedy(4))).unwrap()).await;
        let err = err.unwrap_err().to_string();
        assert!(
            err.contains("404") && err.contains("no-such-model"),
            "{err}"
        );

        let dead = RemoteEngine::new("http://127.0.0.1:1/v1", "x", None).unwrap();
        let (_, err) = collect(dead.start(chat("hi", greedy(4))).unwrap()).await;
        assert!(err.unwrap_err().to_string().contains("request failed"));
    });
}

/// A group of reproducible requests: prompts that begin alike share the prefix's computation
/// (copied from the first request that has it), and the group gives the same texts every time,
/// whatever ran on the engine in between.
#[tokio::test]
async fn a_reproducible_group_shares_its_prefix_and_repeats_itself() {
    let engine = engine(4, 4096);
    let story =
        "The keeper climbed the stairs of the lighthouse and looked at the sea. ".repeat(20);
    let group = || {
        [
            "Write about dogs.",
            "Write about cats.",
            "Write about cats.",
        ]
        .iter()
        .enumerate()
        .map(|(i, ask)| {
            let sampling = Sampling {
                temperature: 0.8,
                seed: Some(7 + i as u32),
                max_tokens: 24,
                ..Sampling::default()
            };
            let mut r = chat(&format!("{story}{ask}"), sampling);
            r.reproducible = true;
            r
        })
        .collect::<Vec<_>>()
    };
    let finish = |generations: Vec<Result<Generation, EngineError>>| async {
        let mut out = Vec::new();
        for g in generations {
            out.push(g.unwrap().finish().await.unwrap());
        }
        out
    };
    let first = finish(engine.start_group(group())).await;
    assert_eq!(first[0].prompt_tokens_processed, first[0].prompt_tokens);
    for follower in &first[1..] {
        assert!(
            follower.prompt_tokens_processed < 20,
            "the shared prefix is copied, not computed: {follower:?}"
        );
        assert!(!follower.text.trim().is_empty());
    }
    // Other work in between, then the same group again.
    run(&engine, chat("Say hello.", greedy(8))).await;
    let again = finish(engine.start_group(group())).await;
    let texts = |c: &[Completion]| c.iter().map(|c| c.text.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&first), texts(&again));
}

#[test]
fn llama_cpp_uses_the_cpus_vector_units_but_never_amx() {
    // Loading the model runs llama.cpp's kernels once (on a CPU that lists AMX this was where
    // ggml's AMX path died with SIGILL).
    model();
    let kernels = llama::cpu_kernels().unwrap();
    assert!(kernels.contains("CPU :"), "{kernels}");
    assert!(
        !kernels.contains("AMX"),
        "AMX kernels are built in: {kernels}"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        assert!(
            kernels.contains("AVX2 = 1"),
            "the build is not for the native CPU: {kernels}"
        );
    }
}
