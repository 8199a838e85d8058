//! The participant's study in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`): consent, 8 turns with periodic ratings, insert into the document, edits, a
//! page refresh in the middle, final ratings and the completion code; then the database.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use collabllm::db;
use collabllm::db::vocab::RevisionAuthor;
use collabllm::protocol::LoadedProtocol;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::common::{models_dir, repo_root, state_with_model, TestApp, TestDb, TestServer};

const WAIT: Duration = Duration::from_secs(180);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chromedriver on a loopback port, stopped when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Self {
        crate::common::needs_full_tier("a browser");
        let binary = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = free_port();
        let child = Command::new(&binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {binary} ({e}): install Debian's chromium and chromium-driver (scripts/setup --tests)")
            });
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn chromium(driver: &Driver, profile: &std::path::Path) -> Client {
    let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let caps = json!({
        "goog:chromeOptions": {
            "binary": binary,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,860",
                format!("--user-data-dir={}", profile.display()),
            ]
        }
    });
    let caps = caps.as_object().unwrap().clone().into_iter().collect();
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a Chromium session")
}

/// Polls a JavaScript condition until it is true.
async fn wait_for(client: &Client, condition: &str) {
    let started = Instant::now();
    loop {
        let value = client
            .execute(&format!("return Boolean({condition});"), vec![])
            .await
            .unwrap();
        if value == json!(true) {
            return;
        }
        if started.elapsed() >= WAIT {
            // What the page showed, to tell why.
            let page = client
                .execute(
                    "const t = (id) => document.getElementById(id)?.textContent;
                     return {connection: t('connection'), notice: t('notice'),
                             messages: [...document.querySelectorAll('.msg')].map(m => m.textContent),
                             input: document.getElementById('input')?.value,
                             outbox: localStorage.length ? Object.fromEntries(Object.entries(localStorage)) : null};",
                    vec![],
                )
                .await
                .ok();
            panic!("timed out waiting for: {condition}; the page: {page:?}");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Opens the study link, agrees to the consent and waits for the workspace to connect.
async fn consent(client: &Client, url: &str) {
    client.goto(url).await.unwrap();
    wait_for(client, "document.getElementById('agree')").await;
    click(client, "#agree").await;
    wait_for(
        client,
        "document.getElementById('connection')?.textContent === 'Connected'",
    )
    .await;
}

async fn click(client: &Client, css: &str) {
    client
        .find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn has_attribute(client: &Client, css: &str, attribute: &str) -> bool {
    client
        .find(Locator::Css(css))
        .await
        .unwrap()
        .attr(attribute)
        .await
        .unwrap()
        .is_some()
}

/// Sends a message from the page's own script: with a scripted engine's instant replies the chat
/// re-renders while WebDriver would still hold an element of the old one.
async fn send_by_script(client: &Client, text: &str) {
    client
        .execute(
            "document.getElementById('input').value = arguments[0];
             document.getElementById('composer').requestSubmit();",
            vec![json!(text)],
        )
        .await
        .unwrap();
}

async fn replies(client: &Client) -> usize {
    client
        .find_all(Locator::Css(".msg.assistant .insert"))
        .await
        .unwrap()
        .len()
}

async fn rate(client: &Client, overlay: &str, key: &str, value: i32) {
    click(
        client,
        &format!("{overlay} [data-key=\"{key}\"] button[data-value=\"{value}\"]"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_participant_completes_the_study_in_chromium() {
    let db = TestDb::sqlite();
    let state = state_with_model(&db);
    // The paper's protocol, with short replies to keep the test quick.
    let path = repo_root().join("study-protocols/doc-cocreation.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("max_tokens = 400", "max_tokens = 24");
    let loaded = LoadedProtocol::from_text(&path, text, &models_dir()).unwrap();
    db::studies::import(&mut state.pool.get().unwrap(), &loaded).unwrap();
    state
        .engines
        .load_protocol(&loaded.protocol, &crate::common::real_models())
        .unwrap();
    let pool = state.pool.clone();
    let server = TestServer::start(state);

    let driver = Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let client = chromium(&driver, profile.path()).await;
    consent(
        &client,
        &server.url("/s/doc-cocreation?PROLIFIC_PID=browser-1&STUDY_ID=s&SESSION_ID=x"),
    )
    .await;
    wait_for(
        &client,
        "document.getElementById('task-instructions').textContent.length > 0",
    )
    .await;

    for turn in 1..=8usize {
        let input = client.find(Locator::Id("input")).await.unwrap();
        input
            .send_keys(&format!("Turn {turn}: help me improve my text."))
            .await
            .unwrap();
        click(&client, "#send").await;
        let started = Instant::now();
        while replies(&client).await < turn {
            assert!(started.elapsed() < WAIT, "no reply for turn {turn}");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        if turn == 1 {
            // Insert the reply, then edit the document by hand.
            click(&client, ".msg.assistant .insert").await;
            wait_for(
                &client,
                "document.getElementById('saved').textContent === 'Saved'",
            )
            .await;
            let doc = client.find(Locator::Id("document")).await.unwrap();
            doc.send_keys(" My own words.").await.unwrap();
            wait_for(
                &client,
                "document.getElementById('document').value.includes('My own words.')",
            )
            .await;
            wait_for(
                &client,
                "document.getElementById('saved').textContent === 'Saved'",
            )
            .await;
        }
        if turn % 3 == 0 {
            wait_for(&client, "!document.getElementById('rating').hidden").await;
            rate(&client, "#rating", "interaction", 6 + (turn as i32 / 3)).await;
            click(&client, "#rating-submit").await;
            wait_for(&client, "document.getElementById('rating').hidden").await;
        }
        if turn == 2 {
            let png = client.screenshot().await.unwrap();
            let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("workspace.png");
            std::fs::write(&shot, png).unwrap();
        }
        if turn == 4 {
            // A refresh in the middle: everything is still there.
            client.refresh().await.unwrap();
            wait_for(
                &client,
                "document.querySelectorAll('.msg.user').length === 4",
            )
            .await;
            wait_for(
                &client,
                "document.querySelectorAll('.msg.assistant .insert').length === 4",
            )
            .await;
            wait_for(
                &client,
                "document.getElementById('document').value.includes('My own words.')",
            )
            .await;
        }
    }
    wait_for(&client, "!document.getElementById('finish').disabled").await;
    click(&client, "#finish").await;
    wait_for(&client, "!document.getElementById('final').hidden").await;
    rate(&client, "#final", "document_quality", 8).await;
    rate(&client, "#final", "overall_interaction", 9).await;
    let boxes = client
        .find_all(Locator::Css("#final textarea"))
        .await
        .unwrap();
    boxes[0]
        .send_keys("It asked good questions.")
        .await
        .unwrap();
    boxes[1]
        .send_keys("Replies were short, \"too\" short.")
        .await
        .unwrap();
    click(&client, "#final-submit").await;
    wait_for(&client, "!document.getElementById('completed').hidden").await;
    let code = client
        .find(Locator::Css("#completed #completion-code"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(code, "CLLM-DONE-7Q2X");
    let link = client
        .find(Locator::Id("completion-link"))
        .await
        .unwrap()
        .attr("href")
        .await
        .unwrap();
    assert_eq!(
        link.as_deref(),
        Some("https://app.prolific.com/submissions/complete?cc=CLLM-DONE-7Q2X")
    );
    client.close().await.unwrap();

    let mut conn = pool.get().unwrap();
    let study = db::studies::find_by_slug(&mut conn, "doc-cocreation")
        .unwrap()
        .unwrap();
    let version = db::studies::current_version(&mut conn, study.id).unwrap();
    let session = db::sessions::list_for_version(&mut conn, version.id)
        .unwrap()
        .remove(0);
    assert_eq!(session.state, collabllm::db::vocab::SessionState::Finished);
    let messages = db::messages::list_for_session(&mut conn, session.id).unwrap();
    assert_eq!(messages.len(), 16);
    let ratings: Vec<(i32, String, i32)> = db::ratings::list_for_session(&mut conn, session.id)
        .unwrap()
        .into_iter()
        .map(|r| (r.after_turn, r.rating_key, r.value))
        .collect();
    assert_eq!(
        ratings,
        [
            (3, "interaction".to_string(), 7),
            (6, "interaction".to_string(), 8),
            (8, "document_quality".to_string(), 8),
            (8, "overall_interaction".to_string(), 9),
        ]
    );
    let revisions = db::revisions::list_for_session(&mut conn, session.id).unwrap();
    assert_eq!(revisions[0].author, RevisionAuthor::AssistantInsert);
    assert_eq!(revisions[0].message_seq, Some(2));
    assert!(revisions.last().unwrap().content.ends_with("My own words."));
    assert!(revisions.iter().any(|r| r.author == RevisionAuthor::User));
    let answers = db::answers::list_for_session(&mut conn, session.id).unwrap();
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[1].answer, "Replies were short, \"too\" short.");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_participant_picks_between_two_replies_in_chromium() {
    let db = TestDb::sqlite();
    let state = state_with_model(&db);
    let path = repo_root().join("study-protocols/quick-pilot.toml");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "assignment = \"least_filled\"",
        "assignment = \"least_filled\"\ncompare_every_turns = 1",
    );
    let loaded = LoadedProtocol::from_text(&path, text, &models_dir()).unwrap();
    db::studies::import(&mut state.pool.get().unwrap(), &loaded).unwrap();
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let driver = Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let client = chromium(&driver, profile.path()).await;
    consent(
        &client,
        &server.url("/s/quick-pilot?PROLIFIC_PID=browser-compare"),
    )
    .await;
    let input = client.find(Locator::Id("input")).await.unwrap();
    input
        .send_keys("Write a short thank-you note.")
        .await
        .unwrap();
    click(&client, "#send").await;
    wait_for(
        &client,
        "document.querySelectorAll('.comparison .candidate').length === 2",
    )
    .await;
    wait_for(
        &client,
        "document.querySelector('.choices button[data-choice=\"b\"]')",
    )
    .await;
    assert!(
        has_attribute(&client, "#send", "disabled").await,
        "no new message while the pick is due"
    );
    click(&client, ".choices button[data-choice=\"b\"]").await;
    wait_for(&client, "!document.getElementById('rating').hidden").await;
    wait_for(
        &client,
        "document.querySelectorAll('.comparison').length === 0",
    )
    .await;
    rate(&client, "#rating", "interaction", 7).await;
    click(&client, "#rating-submit").await;
    wait_for(&client, "document.getElementById('rating').hidden").await;
    // Another reply to the same message: the two are offered, the participant keeps the first.
    wait_for(&client, "!document.getElementById('regenerate').disabled").await;
    click(&client, "#regenerate").await;
    wait_for(
        &client,
        "document.querySelector('.choices button[data-choice=\"a\"]')",
    )
    .await;
    click(&client, ".choices button[data-choice=\"a\"]").await;
    wait_for(
        &client,
        "document.querySelectorAll('.comparison').length === 0",
    )
    .await;
    wait_for(
        &client,
        "document.querySelectorAll('.msg.assistant').length === 1",
    )
    .await;
    client.close().await.unwrap();

    let mut conn = pool.get().unwrap();
    let study = db::studies::find_by_slug(&mut conn, "quick-pilot")
        .unwrap()
        .unwrap();
    let version = db::studies::current_version(&mut conn, study.id).unwrap();
    let session = db::sessions::list_for_version(&mut conn, version.id)
        .unwrap()
        .remove(0);
    let candidates = db::candidates::list_for_session(&mut conn, session.id).unwrap();
    let picks: Vec<(&str, Option<bool>)> = candidates
        .iter()
        .map(|c| (c.source.as_str(), c.chosen))
        .collect();
    assert_eq!(
        picks,
        [
            ("compare", Some(false)),
            ("compare", Some(true)),
            ("regenerate", Some(true)),
            ("regenerate", Some(false))
        ]
    );
    let messages = db::messages::list_for_session(&mut conn, session.id).unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(
        messages[1].content, candidates[1].content,
        "B was picked, then kept over its replacement"
    );
}

/// The one session of the quick pilot's current version.
fn pilot_sessions(pool: &collabllm::db::DbPool) -> Vec<collabllm::db::models::Session> {
    let mut conn = pool.get().unwrap();
    let study = db::studies::find_by_slug(&mut conn, "quick-pilot")
        .unwrap()
        .unwrap();
    let version = db::studies::current_version(&mut conn, study.id).unwrap();
    db::sessions::list_for_version(&mut conn, version.id).unwrap()
}

/// Sends a message and waits for the `n`th reply and its rating, which the quick pilot asks for
/// after every turn.
async fn chat_and_rate(client: &Client, text: &str, n: usize) {
    let input = client.find(Locator::Id("input")).await.unwrap();
    input.send_keys(text).await.unwrap();
    click(client, "#send").await;
    let started = Instant::now();
    while replies(client).await < n {
        assert!(started.elapsed() < WAIT, "no reply to {text:?}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_for(client, "!document.getElementById('rating').hidden").await;
    rate(client, "#rating", "interaction", 6).await;
    click(client, "#rating-submit").await;
    wait_for(client, "document.getElementById('rating').hidden").await;
}

async fn body_text(client: &Client) -> String {
    client
        .find(Locator::Css("body"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn refreshing_during_a_choice_shows_the_choice_and_never_a_code() {
    let db = TestDb::sqlite();
    let state = state_with_model(&db);
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let driver = Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let client = chromium(&driver, profile.path()).await;
    let link = server.url("/s/quick-pilot?PROLIFIC_PID=browser-choice&SESSION_ID=ps-1");
    consent(&client, &link).await;
    chat_and_rate(&client, "Write a two-line note to my landlord.", 1).await;
    wait_for(&client, "!document.getElementById('regenerate').disabled").await;
    click(&client, "#regenerate").await;
    wait_for(
        &client,
        "document.querySelector('.choices button[data-choice=\"a\"]')",
    )
    .await;
    assert_eq!(
        pilot_sessions(&pool)[0].state,
        collabllm::db::vocab::SessionState::Choosing
    );
    // A refresh, then the study link again: the choice is offered, the turn still counts, and
    // nothing shows the study's completion code.
    for open in [None, Some(link.as_str())] {
        match open {
            None => client.refresh().await.unwrap(),
            Some(url) => client.goto(url).await.unwrap(),
        }
        wait_for(
            &client,
            "document.querySelector('.choices button[data-choice=\"b\"]')",
        )
        .await;
        wait_for(
            &client,
            "document.getElementById('turns').textContent.startsWith('Turn 1 ')",
        )
        .await;
        let text = body_text(&client).await;
        assert!(!text.contains("PILOT-DONE"), "a code was shown: {text}");
        assert!(!text.contains("Thank you"), "{text}");
        assert!(
            has_attribute(&client, "#completed", "hidden").await,
            "the completion dialog stays hidden"
        );
    }
    // The pick goes through after the refresh.
    click(&client, ".choices button[data-choice=\"b\"]").await;
    wait_for(
        &client,
        "document.querySelectorAll('.comparison').length === 0",
    )
    .await;
    client.close().await.unwrap();
    let session = &pilot_sessions(&pool)[0];
    assert_eq!(session.state, collabllm::db::vocab::SessionState::Chatting);
    assert_eq!(session.completion_code, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_browser_with_the_same_prolific_id_needs_proof_and_the_first_keeps_working() {
    let db = TestDb::sqlite();
    let state = state_with_model(&db);
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let driver = Driver::start();
    let (first_profile, second_profile) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = chromium(&driver, first_profile.path()).await;
    consent(
        &first,
        &server.url("/s/quick-pilot?PROLIFIC_PID=shared-pid&SESSION_ID=ps-first"),
    )
    .await;
    chat_and_rate(&first, "Secret draft: my grandmother's recipe.", 1).await;

    // Someone who knows the PID, in another browser, without Prolific's session id.
    let second = chromium(&driver, second_profile.path()).await;
    for link in [
        "/s/quick-pilot?PROLIFIC_PID=shared-pid",
        "/s/quick-pilot?PROLIFIC_PID=shared-pid&SESSION_ID=guessed",
    ] {
        second.goto(&server.url(link)).await.unwrap();
        let text = body_text(&second).await;
        assert!(
            text.contains("already has a session of this study open in another browser"),
            "{text}"
        );
        assert!(!text.contains("grandmother"), "{text}");
        assert!(
            !text.contains("I agree"),
            "no consent, no second session: {text}"
        );
    }
    assert_eq!(pilot_sessions(&pool).len(), 1, "no session was forked");

    // The first browser is not cut off: it chats on.
    chat_and_rate(&first, "Make it shorter.", 2).await;

    // With the same Prolific session id, the participant's own second browser resumes.
    second
        .goto(&server.url("/s/quick-pilot?PROLIFIC_PID=shared-pid&SESSION_ID=ps-first"))
        .await
        .unwrap();
    wait_for(
        &second,
        "document.querySelectorAll('.msg.assistant .insert').length === 2",
    )
    .await;
    assert!(body_text(&second).await.contains("grandmother"));
    // The first browser's session moved: reloading it explains instead of starting over.
    first.refresh().await.unwrap();
    let text = body_text(&first).await;
    assert!(text.contains("continues elsewhere"), "{text}");
    first.close().await.unwrap();
    second.close().await.unwrap();

    let sessions = pilot_sessions(&pool);
    assert_eq!(sessions.len(), 1);
    let mut conn = pool.get().unwrap();
    let audit: Vec<String> = db::audit::list_for_session(&mut conn, sessions[0].id)
        .unwrap()
        .into_iter()
        .map(|a| a.kind)
        .collect();
    assert_eq!(
        audit,
        ["entry_refused", "entry_refused", "moved_to_new_browser"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn text_typed_just_before_the_page_closes_is_saved() {
    let db = TestDb::sqlite();
    let state = TestApp::new(&db).state();
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let driver = Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let client = chromium(&driver, profile.path()).await;
    consent(
        &client,
        &server.url("/s/quick-pilot?PROLIFIC_PID=browser-close&SESSION_ID=ps-2"),
    )
    .await;
    let doc = client.find(Locator::Id("document")).await.unwrap();
    doc.send_keys("Typed a moment before leaving.")
        .await
        .unwrap();
    // Well inside the 0.8 s autosave delay: the page goes away.
    client.goto("about:blank").await.unwrap();
    let started = Instant::now();
    let saved = loop {
        let mut conn = pool.get().unwrap();
        let session = pilot_sessions(&pool).remove(0);
        let latest = db::revisions::latest(&mut conn, session.id).unwrap();
        if let Some(r) = latest {
            break r.content;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the document was not saved"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(saved, "Typed a moment before leaving.");
    client.close().await.unwrap();
}

/// A reply's Markdown is rendered as elements and any HTML in it stays text: a scripted model
/// answers with both.
#[tokio::test(flavor = "multi_thread")]
async fn replies_render_markdown_and_never_html() {
    let reply = "**Dear Jo**,\n\n- thanks for the plants\n- and the <img src=x onerror=\"window.pwned=1\">\n\nSee `code`.";
    let engine = std::sync::Arc::new(crate::common::ScriptedEngine::new(move |_| {
        reply.to_string()
    }));
    let db = TestDb::sqlite();
    let server = TestApp::new(&db).scripted(engine).start();
    let driver = Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let client = chromium(&driver, profile.path()).await;
    consent(&client, &server.url("/s/quick-pilot")).await;
    send_by_script(&client, "a note for Jo").await;
    wait_for(&client, "document.querySelector('.msg.assistant .insert')").await;
    wait_for(
        &client,
        "document.getElementById('finish-hint').textContent.includes('1 more')",
    )
    .await;
    let rendered = client
        .execute(
            "const b = document.querySelector('.msg.assistant .body');
             return [b.querySelector('strong')?.textContent, b.querySelectorAll('li').length,
                     b.querySelector('img') === null, window.pwned === undefined,
                     b.querySelectorAll('li')[1]?.textContent, b.querySelector('code')?.textContent,
                     document.getElementById('finish-hint').textContent];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        rendered,
        json!([
            "Dear Jo",
            2,
            true,
            true,
            "and the <img src=x onerror=\"window.pwned=1\">",
            "code",
            "You can finish after 1 more turn."
        ])
    );
    // Inserting takes the reply as written, Markdown and all.
    let document = client
        .execute(
            "document.querySelector('.msg.assistant .insert').click();
             return document.getElementById('document').value;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(document, json!(reply));
    client.close().await.unwrap();
}

/// Runs axe-core's WCAG 2.1 A and AA rules on the page as it is now and fails with each
/// violation: the rule, its impact and the elements. axe-core is installed by `scripts/setup
/// --tests` (npm, pinned in `tests/browser/package.json`).
async fn assert_accessible(client: &Client, what: &str) {
    let path = repo_root().join("tests/browser/node_modules/axe-core/axe.min.js");
    let axe = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run scripts/setup --tests, which installs axe-core",
            path.display()
        )
    });
    client
        .execute(&format!("{axe}\nreturn typeof axe;"), vec![])
        .await
        .unwrap();
    let violations = client
        .execute_async(
            r#"const done = arguments[arguments.length - 1];
               axe.run(document, { runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"] } })
                 .then((r) => done(r.violations.map((v) => ({
                   rule: v.id, impact: v.impact, help: v.help,
                   elements: v.nodes.map((n) => n.target.join(" ")),
                 }))))
                 .catch((e) => done([{ rule: "axe failed", help: String(e) }]));"#,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        violations,
        json!([]),
        "{what} fails the accessibility check:\n{violations:#}"
    );
}

/// Every page a participant or a researcher sees passes an automated accessibility check (axe-core,
/// WCAG 2.1 AA): consent, the workspace with a reply, the rating and final dialogs, the completion
/// code, and the console's login, home and study pages (whose screenshot the README shows).
#[tokio::test(flavor = "multi_thread")]
async fn participant_and_console_pages_pass_an_accessibility_check() {
    let engine = std::sync::Arc::new(crate::common::ScriptedEngine::new(|_| {
        "Here is a draft:\n\n**Dear Jo,** thank you for the *tomatoes*.\n\n- one\n- two".into()
    }));
    let db = TestDb::sqlite();
    let server = TestApp::new(&db).scripted(engine).researcher().start();
    let driver = Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let client = chromium(&driver, profile.path()).await;

    // Four participants with different ratings, so the console has results to show; the
    // first one's pages are checked.
    for participant in 0..4 {
        let first = participant == 0;
        client
            .goto(&server.url(&format!("/s/quick-pilot?PROLIFIC_PID=a11y-{participant}")))
            .await
            .unwrap();
        wait_for(&client, "document.getElementById('agree')").await;
        if first {
            assert_accessible(&client, "the consent page").await;
        }
        click(&client, "#agree").await;
        wait_for(
            &client,
            "document.getElementById('connection')?.textContent === 'Connected'",
        )
        .await;
        for turn in 1..=2 {
            send_by_script(&client, "a note for Jo").await;
            wait_for(&client, "!document.getElementById('rating').hidden").await;
            if first && turn == 1 {
                assert_accessible(&client, "the workspace with a rating due").await;
            }
            let value = 4 + (participant + 2 * turn) % 6;
            client
                .execute(
                    &format!(
                        "document.querySelector('#rating [data-value=\"{value}\"]').click();
                         document.getElementById('rating-submit').click();"
                    ),
                    vec![],
                )
                .await
                .unwrap();
            wait_for(&client, "document.getElementById('rating').hidden").await;
        }
        wait_for(&client, "!document.getElementById('finish').disabled").await;
        if first {
            assert_accessible(&client, "the workspace after two turns").await;
        }
        click(&client, "#finish").await;
        wait_for(&client, "!document.getElementById('final').hidden").await;
        if first {
            assert_accessible(&client, "the final questions").await;
        }
        let value = 6 + participant;
        client
            .execute(
                &format!(
                    "for (const q of document.querySelectorAll('#final .scale')) q.querySelector('[data-value=\"{value}\"]').click();
                     document.getElementById('final-submit').click();"
                ),
                vec![],
            )
            .await
            .unwrap();
        wait_for(&client, "!document.getElementById('completed').hidden").await;
        if first {
            assert_accessible(&client, "the completion code").await;
        }
    }

    client.goto(&server.url("/console/login")).await.unwrap();
    assert_accessible(&client, "the console login").await;
    client
        .execute(
            "document.querySelector('[name=name]').value = 'ada';
             document.querySelector('[name=password]').value = 'lovelace-1815';
             document.querySelector('form').submit();",
            vec![],
        )
        .await
        .unwrap();
    wait_for(
        &client,
        "document.querySelector('form[action=\"/console/studies/import\"]')",
    )
    .await;
    assert_accessible(&client, "the console home").await;
    client
        .goto(&server.url("/console/studies/quick-pilot"))
        .await
        .unwrap();
    wait_for(&client, "document.getElementById('results-sessions')").await;
    assert_accessible(&client, "the console's study page").await;
    client
        .execute(
            "document.getElementById('live-results').scrollIntoView();",
            vec![],
        )
        .await
        .unwrap();
    let png = client.screenshot().await.unwrap();
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-study.png");
    std::fs::write(&shot, png).unwrap();
    // The page updates its tables in place, which the researcher can pause.
    wait_for(&client, "!document.getElementById('live-toggle').hidden").await;
    click(&client, "#live-toggle").await;
    assert!(has_attribute(&client, "#live-toggle[aria-pressed=true]", "id").await);
    client.close().await.unwrap();
}

/// A reply that fails leaves no half-written bubble; the page offers "Try again", also when the
/// next try is refused before it starts, and the last try gets the reply.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_reply_can_be_tried_again_from_the_page() {
    let engine = crate::common::FailingFirst::new(
        std::sync::Arc::new(crate::common::ScriptedEngine::new(|_| {
            "Dear Jo, thank you.".into()
        })),
        2,
        |_| true,
    );
    let db = TestDb::sqlite();
    let server = TestApp::new(&db)
        .serving(std::sync::Arc::new(engine))
        .start();
    let driver = Driver::start();
    let profile = tempfile::tempdir().unwrap();
    let client = chromium(&driver, profile.path()).await;
    consent(&client, &server.url("/s/quick-pilot")).await;
    send_by_script(&client, "a note for Jo").await;
    wait_for(
        &client,
        "document.getElementById('regenerate').textContent === 'Try again'
         && !document.getElementById('regenerate').disabled",
    )
    .await;
    let shown = client
        .execute(
            "return [document.querySelectorAll('.msg.assistant').length,
                     document.body.innerText.includes('press Try again')];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        shown,
        json!([0, true]),
        "no part of the failed reply is shown"
    );
    // The second try is refused before it starts: the page offers Try again once more.
    click(&client, "#regenerate").await;
    wait_for(
        &client,
        "document.getElementById('regenerate').textContent === 'Try again'
         && !document.getElementById('regenerate').disabled
         && document.body.innerText.includes('not available right now')",
    )
    .await;
    click(&client, "#regenerate").await;
    wait_for(&client, "document.querySelector('.msg.assistant .insert')").await;
    let shown = client
        .execute(
            "return [document.querySelector('.msg.assistant .body').textContent,
                     document.getElementById('regenerate').textContent];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(shown, json!(["Dear Jo, thank you.", "Another reply"]));
    client.close().await.unwrap();
}
