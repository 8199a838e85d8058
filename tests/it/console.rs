//! The researcher console: login required on every route, CSRF on every form, pages with real
//! data on both backends, escaping, downloads.

use std::collections::HashMap;

use collabllm::db::vocab::{MessageRole, Outcome, RevisionAuthor};
use collabllm::db::{
    self,
    models::{NewCandidate, NewMessage, NewReward},
};
use collabllm::engine::Engines;
use collabllm::web::{auth, AppState};

use crate::common::{protocol, TestDb, TestServer};

/// A browser for the console: keeps cookies, follows no redirects.
struct Client {
    base: String,
    http: reqwest::Client,
    cookies: HashMap<String, String>,
}

struct Reply {
    status: u16,
    location: String,
    body: String,
}

impl Client {
    fn new(server: &TestServer) -> Self {
        Self {
            base: server.url(""),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: HashMap::new(),
        }
    }

    async fn send(&mut self, request: reqwest::RequestBuilder) -> Reply {
        let cookie: Vec<String> = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let response = request
            .header("cookie", cookie.join("; "))
            .send()
            .await
            .unwrap();
        for set in response.headers().get_all("set-cookie") {
            let pair = set.to_str().unwrap().split(';').next().unwrap();
            let (k, v) = pair.split_once('=').unwrap();
            self.cookies.insert(k.to_string(), v.to_string());
        }
        Reply {
            status: response.status().as_u16(),
            location: response
                .headers()
                .get("location")
                .map(|l| l.to_str().unwrap().to_string())
                .unwrap_or_default(),
            body: response.text().await.unwrap(),
        }
    }

    async fn get(&mut self, path: &str) -> Reply {
        let r = self.http.get(format!("{}{path}", self.base));
        self.send(r).await
    }

    async fn post(&mut self, path: &str, form: &str) -> Reply {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_string());
        self.send(r).await
    }

    /// The CSRF token of the forms on a page.
    async fn csrf(&mut self, path: &str) -> String {
        let page = self.get(path).await.body;
        let at = page
            .find("name=\"csrf\" value=\"")
            .expect("the page has a form")
            + 19;
        page[at..at + 64].to_string()
    }

    async fn login(&mut self, name: &str, password: &str) -> Reply {
        let token = self.csrf("/console/login").await;
        self.post(
            "/console/login",
            &format!("name={name}&password={password}&csrf={token}"),
        )
        .await
    }
}

/// A server with the quick pilot, one session with a hostile message, and researcher "ada".
async fn seeded(db: &TestDb) -> (TestServer, String) {
    let pool = db.pool();
    let mut conn = pool.get().unwrap();
    db::studies::import(&mut conn, &protocol("quick-pilot.toml")).unwrap();
    crate::common::add_researcher(&pool);
    let state = AppState::new(pool.clone(), Engines::new(), crate::common::models_dir()).unwrap();
    let session = {
        let entry = state
            .studio
            .enter(
                "quick-pilot".into(),
                collabllm::study::Arrival {
                    external_id: Some("pid-console".into()),
                    resume_proof: None,
                },
                None,
                true,
            )
            .await
            .unwrap();
        state.studio.agree(entry.session.id).await.unwrap()
    };
    db::messages::append(
        &mut conn,
        session.id,
        &NewMessage {
            role: MessageRole::User,
            content: "<script>alert('x')</script> & \"quotes\"",
            ..Default::default()
        },
    )
    .unwrap();
    db::revisions::append(
        &mut conn,
        session.id,
        RevisionAuthor::AssistantInsert,
        Some(2),
        "Hello world",
    )
    .unwrap();
    db::revisions::append(
        &mut conn,
        session.id,
        RevisionAuthor::User,
        None,
        "Hello brave world!",
    )
    .unwrap();
    // A reward `collabllm pairs` stored for a fresh candidate.
    let candidate = db::candidates::insert(
        &mut conn,
        &NewCandidate {
            session_id: session.id,
            after_seq: 1,
            source: collabllm::db::vocab::CandidateSource::Mr,
            content: "<b>bold</b> candidate",
            chosen: None,
            policy_json: "{}",
            created_at: db::now(),
        },
    )
    .unwrap();
    db::rewards::record(
        &mut conn,
        &NewReward {
            session_id: session.id,
            turn: 2,
            candidate_id: Some(candidate.id),
            mr: 0.8126,
            mr_std: 0.05,
            components_json: r#"{"means":{"bleu":0.25,"interactivity":0.75,"tokens_k":0.1},"samples":3,"window":2}"#,
            created_at: db::now(),
            config_sha256: "0123456789abcdef",
        },
    )
    .unwrap();
    (TestServer::start(state), session.public_id)
}

/// Every console route, with a form body for the POSTs.
fn routes(session: &str) -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("GET", "/console".into(), ""),
        ("GET", "/console/studies/quick-pilot".into(), ""),
        ("GET", format!("/console/sessions/{session}"), ""),
        (
            "GET",
            "/console/studies/quick-pilot/export/sessions.csv".into(),
            "",
        ),
        (
            "POST",
            "/console/studies/quick-pilot/status".into(),
            "status=paused&csrf=x",
        ),
        ("POST", "/console/logout".into(), "csrf=x"),
        (
            "POST",
            format!("/console/sessions/{session}/handover"),
            "csrf=x",
        ),
        (
            "POST",
            "/console/studies/import".into(),
            "protocol=x&csrf=x",
        ),
        ("GET", "/console/studies/quick-pilot/preview".into(), ""),
        ("GET", "/console/preview/s/quick-pilot".into(), ""),
        ("GET", "/console/preview/s/quick-pilot/p".into(), ""),
        ("GET", "/console/preview/s/quick-pilot/ws".into(), ""),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_console_route_needs_a_login() {
    let db = TestDb::sqlite();
    let (server, session) = seeded(&db).await;
    let mut client = Client::new(&server);
    // A participant's cookie is no key to the console.
    client
        .cookies
        .insert("collabllm_session".into(), "participant-token".into());
    for (method, path, form) in routes(&session) {
        let reply = match method {
            "GET" => client.get(&path).await,
            _ => client.post(&path, form).await,
        };
        assert_eq!(
            (reply.status, reply.location.as_str()),
            (303, "/console/login"),
            "{method} {path}"
        );
        assert!(
            !reply.body.contains("pid") && !reply.body.contains("script"),
            "{method} {path} leaked"
        );
    }
    // A forged session cookie is refused too.
    client
        .cookies
        .insert(auth::SESSION_COOKIE.into(), "1.99999999999.deadbeef".into());
    assert_eq!(client.get("/console").await.status, 303);
}

async fn console_pages_show_the_study(db: TestDb) {
    let (server, session) = seeded(&db).await;
    let mut client = Client::new(&server);
    let wrong = client.login("ada", "not-her-password").await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("wrong password"));
    let ok = client.login("ada", "lovelace-1815").await;
    assert_eq!((ok.status, ok.location.as_str()), (303, "/console"));

    let home = client.get("/console").await;
    assert_eq!(home.status, 200);
    assert!(home.body.contains("quick-pilot") && home.body.contains("ada"));
    let study = client.get("/console/studies/quick-pilot").await;
    assert_eq!(study.status, 200);
    assert!(study.body.contains("proactive") && study.body.contains(&session));
    assert!(
        study.body.contains("A thank-you note to a neighbour")
            || study.body.contains("Moving a team meeting"),
        "tasks are listed"
    );
    assert!(study.body.contains("Tokens/s"), "engine health is shown");
    let detail = client.get(&format!("/console/sessions/{session}")).await;
    assert_eq!(detail.status, 200);
    assert!(
        detail.body.contains("&#60;script&#62;alert"),
        "text is escaped"
    );
    assert!(
        !detail.body.contains("<script>alert"),
        "no raw HTML from the data"
    );
    assert!(
        detail.body.contains("<ins>brave </ins>"),
        "revisions show their change"
    );
    assert!(
        detail.body.contains(">39%</strong> typed")
            && detail.body.contains(">61%</strong> inserted")
    );
    assert!(
        detail
            .body
            .contains("<td>0.813</td><td>0.050</td><td>0.250</td><td>0.750</td>")
            && detail.body.contains("S=3 w=2 · 01234567"),
        "the multiturn-aware rewards are listed"
    );
    assert!(
        detail.body.contains("&#60;b&#62;bold"),
        "candidates are escaped"
    );
    // Times to the second ("2026-12-02 05:09:03"), without fractions of it.
    let times: Vec<&str> = detail
        .body
        .match_indices("<td>20")
        .map(|(at, _)| &detail.body[at + 4..at + 4 + 20])
        .filter(|t| t.as_bytes()[4] == b'-')
        .collect();
    assert!(!times.is_empty());
    for t in &times {
        assert!(t.ends_with('<') && t.as_bytes()[13] == b':', "{t}");
    }
    // The page's title is the title alone.
    let title = detail.body.split("<title>").nth(1).unwrap();
    assert!(title
        .split("</title>")
        .next()
        .unwrap()
        .starts_with("Session "));
    assert!(!title.split("</title>").next().unwrap().contains('<'));
    let csv = client
        .get("/console/studies/quick-pilot/export/messages.csv")
        .await;
    assert_eq!(csv.status, 200);
    assert!(csv.body.starts_with("session,participant,arm,seq"));
    assert!(csv.body.contains("<script>alert('x')</script>"));
    assert_eq!(
        client
            .get("/console/studies/quick-pilot/export/passwd")
            .await
            .status,
        404
    );
    assert_eq!(client.get("/console/studies/none").await.status, 404);
    let dump = client
        .get("/console/studies/quick-pilot/export/study.json")
        .await;
    assert_eq!(dump.status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump.body).unwrap();
    assert_eq!(dump["sessions"][0]["session"], session.as_str());

    // Forms need the CSRF token of this browser.
    let no_token = client
        .post("/console/studies/quick-pilot/status", "status=paused&csrf=")
        .await;
    assert_eq!(no_token.status, 403);
    let forged = client
        .post(
            "/console/studies/quick-pilot/status",
            &format!("status=paused&csrf={}", "0".repeat(64)),
        )
        .await;
    assert_eq!(forged.status, 403);
    let token = client.csrf("/console/studies/quick-pilot").await;
    let paused = client
        .post(
            "/console/studies/quick-pilot/status",
            &format!("status=paused&csrf={token}"),
        )
        .await;
    assert_eq!(paused.status, 303);
    assert!(client.get("/console").await.body.contains("paused"));
    let bad = client
        .post(
            "/console/studies/quick-pilot/status",
            &format!("status=deleted&csrf={token}"),
        )
        .await;
    assert_eq!(bad.status, 400);

    // Importing a protocol: problems are shown with their lines; a valid one is stored.
    let original = std::fs::read_to_string(
        crate::common::repo_root().join("study-protocols/quick-pilot.toml"),
    )
    .unwrap();
    let broken = original.replace("model = \"smollm2-135m\"", "model = \"gone\"");
    let form = |text: &str| format!("protocol={}&csrf={token}", urlencode(text));
    let refused = client.post("/console/studies/import", &form(&broken)).await;
    assert_eq!(refused.status, 422);
    let line = 1 + broken
        .lines()
        .position(|l| l.contains("model = \"gone\""))
        .unwrap();
    assert!(
        refused.body.contains(&format!("pasted protocol:{line}:1")),
        "{}",
        refused.body
    );
    assert!(
        refused.body.contains("gone"),
        "the draft is kept for fixing"
    );
    let renamed = original.replace("slug = \"quick-pilot\"", "slug = \"pasted-pilot\"");
    let imported = client
        .post("/console/studies/import", &form(&renamed))
        .await;
    assert_eq!(
        (imported.status, imported.location.as_str()),
        (303, "/console/studies/pasted-pilot")
    );
    assert!(client.get("/console").await.body.contains("pasted-pilot"));
    // A protocol whose model is served elsewhere (an OpenAI-compatible endpoint).
    let remote = original
        .replace("slug = \"quick-pilot\"", "slug = \"remote-pilot\"")
        .replace("id = \"smollm2-135m\"", "id = \"remote-smollm\"")
        .replace("model = \"smollm2-135m\"", "model = \"remote-smollm\"")
        .replace(
            "file = \"SmolLM2-135M-Instruct.Q4_1.gguf\"",
            "endpoint = \"http://127.0.0.1:9/v1\"\nremote_model = \"smollm2\"",
        )
        .replace(
            "sha256 = \"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\"\n",
            "",
        );
    let imported = client.post("/console/studies/import", &form(&remote)).await;
    assert_eq!(
        (imported.status, imported.location.as_str()),
        (303, "/console/studies/remote-pilot"),
        "{}",
        imported.body
    );

    let out = client
        .post("/console/logout", &format!("csrf={token}"))
        .await;
    assert_eq!(out.location, "/console/login");
    assert_eq!(client.get("/console").await.status, 303, "logged out");
}

crate::on_both_backends_async!(console_pages_show_the_study);

#[tokio::test(flavor = "multi_thread")]
async fn login_needs_the_csrf_token_too() {
    let db = TestDb::sqlite();
    let (server, _) = seeded(&db).await;
    let mut client = Client::new(&server);
    let reply = client
        .post("/console/login", "name=ada&password=lovelace-1815&csrf=")
        .await;
    assert_eq!(reply.status, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn results_per_arm_are_computed_and_plotted() {
    let db = TestDb::sqlite();
    let pool = db.pool();
    let loaded = protocol("doc-cocreation.toml");
    db::studies::import(&mut pool.get().unwrap(), &loaded).unwrap();
    crate::common::add_researcher(&pool);
    let state = AppState::new(pool.clone(), Engines::new(), crate::common::models_dir()).unwrap();
    // Six people, and two simulated participants the results of people must leave out.
    for i in 0..8 {
        let s = if i < 6 {
            let arrival = collabllm::study::Arrival {
                external_id: Some(format!("p{i}")),
                resume_proof: None,
            };
            let entry = state
                .studio
                .enter("doc-cocreation".into(), arrival, None, true)
                .await
                .unwrap();
            state.studio.agree(entry.session.id).await.unwrap()
        } else {
            let arm = Some("base".to_string());
            state
                .studio
                .enter_simulated("doc-cocreation".into(), arm, 0)
                .await
                .unwrap()
                .0
        };
        let mut conn = pool.get().unwrap();
        db::messages::append(
            &mut conn,
            s.id,
            &NewMessage {
                role: MessageRole::User,
                content: "hi",
                ..Default::default()
            },
        )
        .unwrap();
        db::messages::append(
            &mut conn,
            s.id,
            &NewMessage {
                role: MessageRole::Assistant,
                content: "hello",
                gen_tokens: Some(10),
                ttft_ms: Some(50),
                ..Default::default()
            },
        )
        .unwrap();
        db::ratings::record(&mut conn, s.id, 3, "interaction", 5 + i % 3).unwrap();
        db::ratings::record(&mut conn, s.id, 6, "interaction", 6 + i % 3).unwrap();
        db::ratings::record(&mut conn, s.id, 8, "document_quality", 7).unwrap();
        db::ratings::record(&mut conn, s.id, 8, "overall_interaction", 8).unwrap();
        db::sessions::finish(&mut conn, s.id, Outcome::Completed, "CODE").unwrap();
    }
    let mut conn = pool.get().unwrap();
    let study = db::studies::find_by_slug(&mut conn, "doc-cocreation")
        .unwrap()
        .unwrap();
    let version = db::studies::current_version(&mut conn, study.id).unwrap();
    let results = |simulated| {
        collabllm::results::per_arm(
            &mut pool.get().unwrap(),
            version.id,
            &loaded.protocol,
            simulated,
        )
        .unwrap()
    };
    let everyone = results(None);
    assert_eq!(everyone.iter().map(|a| a.n).sum::<usize>(), 8);
    assert_eq!(
        results(Some(true)).iter().map(|a| a.n).collect::<Vec<_>>(),
        [2, 0, 0]
    );
    let per_arm = results(Some(false));
    assert_eq!(per_arm.len(), 3);
    assert_eq!(per_arm.iter().map(|a| a.n).sum::<usize>(), 6);
    for arm in &per_arm {
        assert_eq!(arm.n, 2, "permuted blocks give each arm two of six");
        let quality = arm.finals["document_quality"].as_ref().unwrap();
        assert_eq!((quality.mean, quality.low, quality.high), (7.0, 7.0, 7.0));
        let turns: Vec<i32> = arm.by_turn["interaction"].iter().map(|(t, _)| *t).collect();
        assert_eq!(turns, [3, 6]);
        assert_eq!(arm.assistant_tokens.as_ref().unwrap().mean, 10.0);
        assert!(arm.minutes.is_some());
    }
    drop(conn);
    let server = TestServer::start(state);
    let mut client = Client::new(&server);
    client.login("ada", "lovelace-1815").await;
    let page = client.get("/console/studies/doc-cocreation").await.body;
    std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-study.html"),
        &page,
    )
    .unwrap();
    assert!(page.contains("Results per arm"));
    assert!(
        page.contains("7 [7, 7]"),
        "the estimate is shown, a whole number as one"
    );
    assert_eq!(page.matches("<polyline").count(), 3, "one line per arm");
    assert_eq!(page.matches("<rect").count(), 3, "one box per arm");
}

/// Percent-encodes a form value.
fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_logins_are_throttled_per_name() {
    let db = TestDb::sqlite();
    let (server, _) = seeded(&db).await;
    let mut c = Client::new(&server);
    for _ in 0..5 {
        assert_eq!(c.login("ada", "guess").await.status, 401);
    }
    // Now even the right password waits: guessing cannot go on at full speed.
    let limited = c.login("ada", "lovelace-1815").await;
    assert_eq!(limited.status, 429);
    assert!(
        limited.body.contains("Too many failed logins"),
        "{}",
        limited.body
    );
    assert_eq!(c.get("/console").await.status, 303);
    // Another name is not locked by ada's failures.
    assert_eq!(c.login("grace", "x").await.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_name_takes_as_long_as_a_wrong_password() {
    let db = TestDb::sqlite();
    let (server, _) = seeded(&db).await;
    let mut c = Client::new(&server);
    // Warm up (the decoy hash is made on first use), then time each kind, alternating.
    c.login("nobody-0", "x").await;
    let (mut unknown, mut wrong) = (Vec::new(), Vec::new());
    for i in 0..4 {
        let started = std::time::Instant::now();
        assert_eq!(c.login(&format!("nobody-{}", i + 1), "x").await.status, 401);
        unknown.push(started.elapsed());
        let started = std::time::Instant::now();
        assert_eq!(c.login("ada", &format!("wrong-{i}")).await.status, 401);
        wrong.push(started.elapsed());
    }
    unknown.sort();
    wrong.sort();
    // Without the decoy an unknown name answers without running argon2 at all, many times
    // faster; the medians must be of the same order.
    let (u, w) = (unknown[2].as_secs_f64(), wrong[2].as_secs_f64());
    assert!(
        u > 0.4 * w,
        "unknown name {u:.4}s vs wrong password {w:.4}s"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn logging_out_revokes_the_session_cookie() {
    let db = TestDb::sqlite();
    let (server, _) = seeded(&db).await;
    let mut c = Client::new(&server);
    assert_eq!(c.login("ada", "lovelace-1815").await.status, 303);
    let console = c.get("/console").await;
    assert_eq!(console.status, 200);
    let stolen = c.cookies["collabllm_console"].clone();
    let token = c.csrf("/console").await;
    assert_eq!(
        c.post("/console/logout", &format!("csrf={token}"))
            .await
            .status,
        303
    );
    // The cookie copied before the logout no longer opens the console.
    c.cookies.insert("collabllm_console".into(), stolen);
    let after = c.get("/console").await;
    assert_eq!(
        (after.status, after.location.as_str()),
        (303, "/console/login")
    );
    // A new login works at once.
    assert_eq!(c.login("ada", "lovelace-1815").await.status, 303);
    let page = c.get("/console").await;
    assert_eq!(page.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_researcher_moves_a_session_to_a_new_browser() {
    let db = TestDb::sqlite();
    let (server, session) = seeded(&db).await;
    let mut c = Client::new(&server);
    c.login("ada", "lovelace-1815").await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let link = server.url("/s/quick-pilot?PROLIFIC_PID=pid-console");
    // The participant lost their browser: a new one is refused…
    assert_eq!(http.get(&link).send().await.unwrap().status(), 409);
    let page = format!("/console/sessions/{session}");
    let token = c.csrf(&page).await;
    let moved = c
        .post(&format!("{page}/handover"), &format!("csrf={token}"))
        .await;
    assert_eq!(
        (moved.status, moved.location.as_str()),
        (303, page.as_str())
    );
    assert!(c
        .get(&page)
        .await
        .body
        .contains("will take the session over"));
    // …until the researcher's handover, which the next entry uses up.
    let entered = http.get(&link).send().await.unwrap();
    assert_eq!(entered.status(), 303);
    assert!(entered.headers().get("set-cookie").is_some());
    assert_eq!(http.get(&link).send().await.unwrap().status(), 409);
    let audit = c.get(&page).await.body;
    for kind in ["entry_refused", "handover_allowed", "moved_to_new_browser"] {
        assert!(audit.contains(kind), "{kind} missing from the audit");
    }
}

/// The results page shows the study's latest evaluation with simulated users, escaped.
async fn the_latest_evaluation_is_shown(db: TestDb) {
    let (server, _) = seeded(&db).await;
    let pool = db.pool();
    let mut conn = pool.get().unwrap();
    let study = db::studies::find_by_slug(&mut conn, "quick-pilot")
        .unwrap()
        .unwrap();
    let table = |itr: f64| {
        let i = |mean: f64| serde_json::json!({"n": 3, "mean": mean, "lo": mean - 1.0, "hi": mean + 1.0});
        serde_json::json!({
            "baseline": "proactive",
            "order": ["proactive", "<b>writer</b>"],
            "arms": {
                "proactive": {"n": 3, "bleu": null, "tokens_k": i(0.5), "itr": i(itr), "quality": i(7.0), "turns": i(2.0)},
                "<b>writer</b>": {"n": 3, "bleu": null, "tokens_k": i(0.25), "itr": i(10.0), "quality": i(6.0), "turns": i(1.0)}
            },
            "diff": {"<b>writer</b>": {"bleu": null, "tokens_k": i(-0.25), "itr": i(itr - 10.0), "quality": i(-1.0), "turns": i(-1.0)}}
        })
        .to_string()
    };
    db::evaluations::insert(&mut conn, study.id, 3, &table(11.0), "{}").unwrap();
    db::evaluations::insert(&mut conn, study.id, 3, &table(87.5), "{}").unwrap();
    let mut client = Client::new(&server);
    client.login("ada", "lovelace-1815").await;
    let page = client.get("/console/studies/quick-pilot").await.body;
    let at = page
        .find("Latest evaluation with simulated users")
        .expect("the evaluation is shown");
    let section = &page[at..];
    assert!(section.contains("87.50 [86.50, 88.50]"), "{section}");
    assert!(
        !page.contains("11 [10, 12]"),
        "an older evaluation is shown"
    );
    assert!(
        section.contains("77.50 [76.50, 78.50]"),
        "the paired difference"
    );
    assert!(
        section.contains("&#60;b&#62;writer&#60;/b&#62; − proactive"),
        "{section}"
    );
    assert!(!page.contains("<b>writer</b>"));
    assert!(section.contains("ITR") && section.contains("—"));
}

crate::on_both_backends_async!(the_latest_evaluation_is_shown);

/// The results page lists the rounds of the online DPO runs of the study, run by run, each with
/// the trained arm's difference to the base and how often each asks; rounds of another study's
/// runs are not among them.
async fn the_rounds_of_a_loop_are_shown(db: TestDb) {
    use collabllm::collab::evaluate::loop_eval_slug;
    let (server, _) = seeded(&db).await;
    let pool = db.pool();
    let mut conn = pool.get().unwrap();
    let round_study = |conn: &mut db::DbConn, slug: String| {
        let mut loaded = protocol("quick-pilot.toml");
        loaded.protocol.study.slug = slug;
        db::studies::import(conn, &loaded).unwrap().study
    };
    let table = |quality: f64, asks: f64| {
        let i = |mean: f64| serde_json::json!({"n": 4, "mean": mean, "lo": mean - 0.5, "hi": mean + 0.5});
        let rate = |rate: f64| serde_json::json!({"n": 10, "k": (rate * 10.0) as usize, "rate": rate, "lo": 0.0, "hi": 1.0});
        serde_json::json!({
            "baseline": "base",
            "order": ["base", "trained"],
            "arms": {},
            "diff": {"trained": {"bleu": null, "tokens_k": i(0.0), "itr": i(0.25), "quality": i(quality), "turns": i(1.0)}},
            "asking": {
                "samples": 1,
                "arms": {
                    "base": {"ambiguous": rate(0.2), "clear": rate(0.1)},
                    "trained": {"ambiguous": rate(asks), "clear": rate(0.1)}
                },
                "diff": {}
            }
        })
        .to_string()
    };
    for (round, quality, asks) in [(2, 1.75, 0.7), (1, 0.5, 0.4)] {
        let study = round_study(&mut conn, loop_eval_slug("quick-pilot", "ab12cd34", round));
        db::evaluations::insert(&mut conn, study.id, 4, &table(quality, asks), "{}").unwrap();
    }
    let other = round_study(&mut conn, loop_eval_slug("quick-pilot-2", "ab12cd34", 1));
    db::evaluations::insert(&mut conn, other.id, 4, &table(9.25, 0.9), "{}").unwrap();

    let mut client = Client::new(&server);
    client.login("ada", "lovelace-1815").await;
    let page = client.get("/console/studies/quick-pilot").await.body;
    let at = page
        .find("Online DPO rounds")
        .expect("the rounds are shown");
    let section = &page[at..];
    let first = section.find("0.50 [0, 1]").expect("round 1's Δ quality");
    let second = section
        .find("1.75 [1.25, 2.25]")
        .expect("round 2's Δ quality");
    assert!(first < second, "rounds in order: {section}");
    assert!(
        section.contains("40% vs 20%") && section.contains("70% vs 20%"),
        "{section}"
    );
    assert!(section.contains("10% vs 10%"), "{section}");
    assert!(
        !section.contains("9.25"),
        "another study's round is shown: {section}"
    );
    assert!(section.contains(&format!(
        "/console/studies/{}",
        loop_eval_slug("quick-pilot", "ab12cd34", 2)
    )));
}

crate::on_both_backends_async!(the_rounds_of_a_loop_are_shown);

/// A researcher tries the study as a participant sees it, with the arm they pick: consent, the
/// workspace and a reply over the real websocket, all under the console's login, and nothing of
/// it reaches the study's database.
#[tokio::test(flavor = "multi_thread")]
async fn a_preview_shows_the_study_and_records_nothing() {
    let db = TestDb::sqlite();
    let loaded = protocol("doc-cocreation.toml");
    // The reply names the arm's system prompt, so the test sees which arm answered.
    let engine = std::sync::Arc::new(crate::common::ScriptedEngine::new(|r| {
        format!("prompt: {}", r.messages[0].content)
    }));
    let state = crate::common::TestApp::new(&db)
        .loaded(loaded.clone())
        .scripted(engine)
        .researcher()
        .state();
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let mut client = Client::new(&server);
    client.login("ada", "lovelace-1815").await;
    let study = client.get("/console/studies/doc-cocreation").await.body;
    assert!(
        study.contains("href=\"/console/studies/doc-cocreation/preview?arm=collabllm\""),
        "{study}"
    );

    let unknown = client
        .get("/console/studies/doc-cocreation/preview?arm=nobody")
        .await;
    assert_eq!(unknown.status, 404);
    let start = client
        .get("/console/studies/doc-cocreation/preview?arm=collabllm")
        .await;
    assert_eq!(
        (start.status, start.location.as_str()),
        (303, "/console/preview/s/doc-cocreation/p")
    );
    let consent = client.get("/console/preview/s/doc-cocreation/p").await.body;
    assert!(consent.contains("nothing here is recorded"), "{consent}");
    assert!(consent.contains("action=\"/console/preview/s/doc-cocreation/consent\""));
    let agreed = client
        .post(
            "/console/preview/s/doc-cocreation/consent",
            "decision=agree",
        )
        .await;
    assert_eq!(agreed.location, "/console/preview/s/doc-cocreation/p");
    let workspace = client.get("/console/preview/s/doc-cocreation/p").await.body;
    assert!(workspace.contains("data-path=\"/console/preview/s/doc-cocreation\""));

    let cookies: Vec<String> = client
        .cookies
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut ws = crate::participant::Socket::connect_to(
        &format!("ws://{}/console/preview/s/doc-cocreation/ws", server.addr),
        Some(&cookies.join("; ")),
    )
    .await;
    let collabllm_prompt = &loaded
        .protocol
        .arms
        .iter()
        .find(|a| a.id == "collabllm")
        .unwrap()
        .system_prompt;
    assert!(matches!(
        ws.hello().await,
        collabllm::study::frames::ServerFrame::State(_)
    ));
    let reply = ws.chat("Help me write a toast.").await;
    let head: String = collabllm_prompt.chars().take(80).collect();
    assert!(
        reply.contains(&head),
        "the preview answers with the arm picked: {reply}"
    );

    // The study's own database has no participant, session or draw of the preview.
    let mut conn = pool.get().unwrap();
    let study = db::studies::find_by_slug(&mut conn, "doc-cocreation")
        .unwrap()
        .unwrap();
    let version = db::studies::current_version(&mut conn, study.id).unwrap();
    assert!(db::sessions::list_for_version(&mut conn, version.id)
        .unwrap()
        .is_empty());
    assert_eq!(
        db::assignments::count_for_version(&mut conn, version.id, false).unwrap(),
        0
    );
    // The preview's session cookie opens nothing in the study.
    let token = client.cookies["collabllm_session"].clone();
    let mut participant = Client::new(&server);
    participant
        .cookies
        .insert("collabllm_session".into(), token);
    let page = participant.get("/s/doc-cocreation/p").await.body;
    assert!(!page.contains("data-session"), "{page}");
    // A preview that declines ends on the end page, without the link back to Prolific.
    client.get("/console/studies/doc-cocreation/preview").await;
    client
        .post(
            "/console/preview/s/doc-cocreation/consent",
            "decision=decline",
        )
        .await;
    let done = client.get("/console/preview/s/doc-cocreation/p").await.body;
    assert!(done.contains("CLLM-NOCONSENT-4K8P"), "{done}");
    assert!(!done.contains("prolific.com"), "{done}");
}

/// The engine table says what each engine is doing now: slots in use, replies paused, requests
/// waiting by class, the share of prompt tokens reused, and whether it had to be restarted.
#[tokio::test(flavor = "multi_thread")]
async fn the_engine_table_shows_slots_queues_and_prompt_reuse() {
    let db = TestDb::sqlite();
    let engine = crate::common::ScriptedEngine::new(|_| "unused".into()).reporting(
        collabllm::engine::EngineStatus {
            running: true,
            restarts: 1,
            slots: 8,
            active: 3,
            paused: 2,
            queued: 7,
            queued_by_priority: [2, 1, 4],
            prompt_tokens_processed: 250,
            prompt_tokens_reused: 750,
            caches_restored: 5,
            ..Default::default()
        },
    );
    let server = crate::common::TestApp::new(&db)
        .scripted(std::sync::Arc::new(engine))
        .researcher()
        .start();
    let mut client = Client::new(&server);
    client.login("ada", "lovelace-1815").await;
    for page in ["/console", "/console/studies/quick-pilot"] {
        let body = client.get(page).await.body;
        let row = body
            .split("<tr>")
            .find(|r| r.contains("<td>scripted</td>"))
            .unwrap_or_else(|| panic!("{page} has no engine row: {body}"));
        for shown in [
            "restarted 1×",
            "3 of 8 (2 paused)",
            "2 / 1 / 4",
            "250 / 750 (75% reused)",
            "<td>5</td>",
        ] {
            assert!(row.contains(shown), "{page}: {shown:?} missing from {row}");
        }
    }
}
