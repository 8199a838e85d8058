//! The researcher console: login required on every route, CSRF on every form, pages with real
//! data on both backends, escaping, downloads.

use std::collections::HashMap;

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
    db::researchers::set(
        &mut conn,
        "ada",
        &auth::hash_password("lovelace-1815").unwrap(),
    )
    .unwrap();
    let state = AppState::new(pool.clone(), Engines::new(), crate::common::models_dir()).unwrap();
    let session = {
        let entry = state
            .studio
            .enter("quick-pilot".into(), Some("pid-console".into()), None)
            .await
            .unwrap();
        state.studio.agree(entry.session.id).await.unwrap()
    };
    db::messages::append(
        &mut conn,
        session.id,
        &NewMessage {
            role: "user",
            content: "<script>alert('x')</script> & \"quotes\"",
            ..Default::default()
        },
    )
    .unwrap();
    db::revisions::append(
        &mut conn,
        session.id,
        "assistant_insert",
        Some(2),
        "Hello world",
    )
    .unwrap();
    db::revisions::append(&mut conn, session.id, "user", None, "Hello brave world!").unwrap();
    // A reward `collabllm pairs` stored for a fresh candidate.
    let candidate = db::candidates::insert(
        &mut conn,
        &NewCandidate {
            session_id: session.id,
            after_seq: 1,
            source: "mr",
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
            "/console/studies/import".into(),
            "protocol=x&csrf=x",
        ),
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
    assert!(
        refused.body.contains("pasted protocol:29:1"),
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
    db::researchers::set(
        &mut pool.get().unwrap(),
        "ada",
        &auth::hash_password("lovelace-1815").unwrap(),
    )
    .unwrap();
    let state = AppState::new(pool.clone(), Engines::new(), crate::common::models_dir()).unwrap();
    for i in 0..6 {
        let entry = state
            .studio
            .enter("doc-cocreation".into(), Some(format!("p{i}")), None)
            .await
            .unwrap();
        let s = state.studio.agree(entry.session.id).await.unwrap();
        let mut conn = pool.get().unwrap();
        db::messages::append(
            &mut conn,
            s.id,
            &NewMessage {
                role: "user",
                content: "hi",
                ..Default::default()
            },
        )
        .unwrap();
        db::messages::append(
            &mut conn,
            s.id,
            &NewMessage {
                role: "assistant",
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
        db::sessions::finish(&mut conn, s.id, "finished", "completed", "CODE").unwrap();
    }
    let mut conn = pool.get().unwrap();
    let study = db::studies::find_by_slug(&mut conn, "doc-cocreation")
        .unwrap()
        .unwrap();
    let version = db::studies::current_version(&mut conn, study.id).unwrap();
    let per_arm = collabllm::results::per_arm(&mut conn, version.id, &loaded.protocol).unwrap();
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
    assert!(page.contains("7.00 [7.00, 7.00]"), "the estimate is shown");
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
