//! `collabllm loop`: two rounds, each simulating, scoring, training and evaluating. Fast, with a
//! tiny random policy and a scripted simulated user and judge served over `/v1`: the files of a
//! loop stopped in round 2 and resumed are those of a loop that ran through. And with the real
//! models, kept short: the second round started by a later run, as a resumed loop.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{
    asker, real_models, repo_root, request_text, write_tiny_model, Asker, ScriptedEngine, TestApp,
    TestDb, TestServer, TEST_API_KEY,
};

/// The quick pilot with two turns a session and the default model in every role, so a round
/// takes a few minutes on two cores.
fn short_protocol(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("study-protocols/quick-pilot.toml"))
        .unwrap()
        .replace("max_turns = 6", "max_turns = 2")
        .replace(
            "simulator_model = \"qwen2.5-coder-1.5b\"",
            "simulator_model = \"smollm2-135m\"",
        )
        .replace(
            "judge_model = \"qwen2.5-coder-1.5b\"",
            "judge_model = \"smollm2-135m\"",
        );
    assert!(text.contains("judge_model = \"smollm2-135m\""));
    let path = dir.join("short.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// One `collabllm loop` of `rounds` rounds over the database and run folder of `dir`.
struct LoopRun<'a> {
    dir: &'a Path,
    protocol: &'a Path,
    models: PathBuf,
    users: usize,
}

impl LoopRun<'_> {
    fn out(&self) -> PathBuf {
        self.dir.join("run")
    }

    fn command(&self, rounds: usize) -> Command {
        let database = format!("sqlite://{}", self.dir.join("loop.sqlite3").display());
        let users = self.users.to_string();
        let mut command = Command::new(env!("CARGO_BIN_EXE_collabllm"));
        command
            .args(["--database-url", &database, "--models-dir"])
            .arg(&self.models)
            .arg("loop")
            .arg("--protocol")
            .arg(self.protocol)
            .args(["--rounds", &rounds.to_string()])
            .args(["--users", &users, "--eval-users", &users])
            .args(["--samples", "1", "--window", "1", "--max-turns", "1"])
            .args(["--epochs", "1"])
            .arg("--out")
            .arg(self.out())
            .env("COLLABLLM_LOG", "warn")
            .env(KEY_VAR, TEST_API_KEY);
        command
    }

    fn run(&self, rounds: usize) -> String {
        let out = self.command(rounds).output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stdout}\n{stderr}");
        format!("{stdout}\n{stderr}")
    }

    /// Starts the loop and kills it (SIGKILL, as a machine that goes down) `after` the first
    /// line of its output that holds `at`; false when the loop ended before.
    fn kill_at(&self, rounds: usize, at: &str, after: std::time::Duration) -> bool {
        let mut child = self
            .command(rounds)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (lines, seen) = std::sync::mpsc::channel();
        let readers = [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ]
        .map(|stream| {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stream).lines() {
                    let _ = lines.send(line.unwrap_or_default());
                }
            })
        });
        drop(lines);
        let found = seen.iter().any(|line| line.contains(at));
        if found {
            std::thread::sleep(after);
            child.kill().unwrap();
        }
        child.wait().unwrap();
        for reader in readers {
            reader.join().unwrap();
        }
        found
    }
}

impl LoopRun<'_> {
    /// Starts the loop and kills it once the scripted roles have answered `n` more requests.
    fn kill_after_requests(&self, rounds: usize, roles: &ScriptedEngine, n: usize) {
        let count = || roles.requests.load(std::sync::atomic::Ordering::SeqCst);
        let start = count();
        let mut child = self
            .command(rounds)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while count() < start + n {
            assert!(child.try_wait().unwrap().is_none(), "the loop ended first");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// Environment variable holding the scripted server's `/v1` key.
const KEY_VAR: &str = "COLLABLLM_TEST_ROLES_KEY";

/// A number of its own for each text, to rate it by.
fn spread(text: &str) -> u64 {
    text.bytes()
        .map(u64::from)
        .fold(7, |h, b| h.wrapping_mul(31) ^ b)
}

/// The simulated user and the judge: the user asks for a note and keeps every reply; the judge
/// rates each reply by its text, so a turn's candidates differ and make pairs.
fn scripted_roles() -> Arc<ScriptedEngine> {
    Arc::new(ScriptedEngine::new(|r| {
        let all = request_text(r);
        let answer = |a: Value| json!({"thought": "", "answer": a}).to_string();
        match asker(&all) {
            Asker::Interactivity(judged) => {
                json!({"thought": "", "interactivity": 1 + spread(judged) % 3}).to_string()
            }
            Asker::Document => {
                json!({"thought": "", "final_document": "Dear Jo, thanks."}).to_string()
            }
            Asker::Quality => json!({"thought": "", "quality": 1 + spread(&all) % 9}).to_string(),
            Asker::Simulator
                if all.contains("What do you do with the assistant's latest reply") =>
            {
                answer(json!("keep"))
            }
            Asker::Simulator if all.contains("Which reply do you prefer") => answer(json!("a")),
            Asker::Simulator if all.contains("Answer with a whole number") => answer(json!(7)),
            Asker::Simulator if all.contains("Answer in a sentence or two") => {
                answer(json!("fine"))
            }
            Asker::Simulator => {
                let mut message = json!({"thought": "", "response": "A thank-you note, please."});
                let grammar = match &r.constraint {
                    Some(collabllm::engine::Constraint::Grammar(g)) => g.as_str(),
                    _ => "",
                };
                if grammar.contains("current_answer") {
                    message["current_answer"] = json!("");
                }
                message.to_string()
            }
            Asker::Policy => panic!("the policy is the tiny model: {all}"),
        }
    }))
}

/// The quick pilot with the tiny model as the arm's policy and the scripted roles at
/// `endpoint`.
fn scripted_protocol(dir: &Path, endpoint: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("study-protocols/quick-pilot.toml"))
        .unwrap()
        .replace(
            "file = \"SmolLM2-135M-Instruct.Q4_1.gguf\"\nsha256 = \"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\"",
            "file = \"tiny.gguf\"",
        )
        .replace(
            "file = \"qwen2.5-coder-1.5b-instruct-q4_k_m.gguf\"\nsha256 = \"cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046\"",
            &format!(
                "endpoint = \"{endpoint}\"\nremote_model = \"smollm2-135m\"\napi_key_env = \"{KEY_VAR}\""
            ),
        )
        .replace("max_turns = 6", "max_turns = 2");
    assert!(
        text.contains("tiny.gguf") && text.contains(endpoint),
        "{text}"
    );
    let path = dir.join("scripted.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A run's files with what differs from run to run by design taken out: the loop's and the
/// sessions' random ids, timings, the hashes of files that hold those ids, the attempt a
/// resumed simulation ran in, and the commands a resumed step logged again (with `--resume`
/// for a training that goes on from its checkpoint). Adapters are
/// compared by their tensors.
fn normalised(run: &Path) -> Vec<(String, String)> {
    let loop_json: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("loop.json")).unwrap()).unwrap();
    let loop_id = loop_json["id"].as_str().unwrap().to_string();
    let mut files = Vec::new();
    let mut stack = vec![run.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.strip_prefix(run).unwrap().display().to_string();
            if name.ends_with("study.txt") {
                continue; // only a resumed simulation has one
            }
            if name.ends_with(".gguf") {
                files.push((name, tensors(&path)));
                continue;
            }
            let mut text = std::fs::read_to_string(&path)
                .unwrap()
                .replace(&loop_id, "LOOP")
                .replace(&run.display().to_string(), "RUN");
            for attempt in 2..10 {
                text = text.replace(&format!("-a{attempt}"), "");
            }
            let text = match path.extension().and_then(|e| e.to_str()) {
                Some("json") => pretty(&text),
                Some("jsonl") => text.lines().map(pretty).collect(),
                // A training that went on from its checkpoint (or started over) says so.
                _ if name.ends_with("commands.txt") => {
                    let mut seen = std::collections::HashSet::new();
                    text.lines()
                        .map(|l| l.replace(" --resume", "").replace(" --force", ""))
                        .filter(|l| seen.insert(l.clone()))
                        .map(|l| format!("{l}\n"))
                        .collect()
                }
                _ => text,
            };
            files.push((name, text));
        }
    }
    files.sort();
    files
}

/// An adapter's tensors, by name, as text.
fn tensors(path: &Path) -> String {
    use candle_core::quantized::gguf_file::Content;
    let mut file = std::fs::File::open(path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let t = content
                .tensor(&mut file, name, &candle_core::Device::Cpu)
                .unwrap();
            let values = t.dequantize(&candle_core::Device::Cpu).unwrap();
            let values = values.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            format!("{name} {values:?}\n")
        })
        .collect()
}

/// A JSON text without its varying fields, a line per field so that a difference shows its line.
fn pretty(json: &str) -> String {
    serde_json::to_string_pretty(&strip(serde_json::from_str(json).unwrap())).unwrap() + "\n"
}

/// `value` without the fields that differ between two runs of the same loop.
fn strip(value: Value) -> Value {
    const VARYING: [&str; 6] = [
        "session",
        "participant",
        "seconds",
        "tokens_per_s",
        "created_at",
        "id",
    ];
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(k, _)| !VARYING.contains(&k.as_str()) && !k.ends_with("sha256"))
                .map(|(k, v)| (k, strip(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(strip).collect()),
        // An adapter's fingerprint: the hash of a file that holds the pairs' hash.
        Value::String(s) if s.contains("+lora:") => {
            Value::String(s.split("+lora:").next().unwrap().to_string() + "+lora")
        }
        other => other,
    }
}

#[test]
fn a_loop_stopped_in_round_two_resumes_to_the_files_of_one_that_ran_through() {
    let db = TestDb::sqlite();
    let roles = scripted_roles();
    let server = TestServer::start(TestApp::new(&db).scripted(roles.clone()).state());
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    write_tiny_model(&models.join("tiny.gguf"), 1);
    let protocol = scripted_protocol(dir.path(), &server.url("/v1"));
    let run = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let (through, stopped) = (run("through"), run("stopped"));
    fn loop_in<'a>(dir: &'a Path, protocol: &'a Path, models: &Path) -> LoopRun<'a> {
        LoopRun {
            dir,
            protocol,
            models: models.to_path_buf(),
            users: 2,
        }
    }

    let output = loop_in(&through, &protocol, &models).run(2);
    assert!(output.contains("report:"), "{output}");
    // Stopped in every step of round 2.
    let stopped_loop = loop_in(&stopped, &protocol, &models);
    let step = |name: &str| format!("round 2 of 2: {name}");
    // Stopped as round 2 begins, then, started again, a few simulated-user messages into its
    // simulation.
    assert!(stopped_loop.kill_at(2, &step("simulated"), Duration::ZERO));
    stopped_loop.kill_after_requests(2, &roles, 3);
    for name in ["scored", "trained", "evaluated"] {
        let into = Duration::from_millis(300);
        assert!(
            stopped_loop.kill_at(2, &step(name), into),
            "the loop ended before {name}"
        );
    }
    assert!(
        stopped.join("run/round-2/study.txt").exists(),
        "the stopped simulation ran again in a study of its own"
    );
    loop_in(&stopped, &protocol, &models).run(2);

    let (a, b) = (
        normalised(&through.join("run")),
        normalised(&stopped.join("run")),
    );
    let names = |f: &[(String, String)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b));
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let differing: Vec<String> = x
            .lines()
            .zip(y.lines())
            .enumerate()
            .filter(|(_, (l, r))| l != r)
            .take(12)
            .map(|(i, (l, r))| format!("line {}: {l}  ≠  {r}", i + 1))
            .collect();
        assert!(
            x == y,
            "{name} differs from the run that went through:\n{}",
            differing.join("\n")
        );
    }

    // The loop trained on pairs in both rounds, and round 2 sampled with round 1's adapter.
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(through.join("run/report.json")).unwrap())
            .unwrap();
    for r in report["rounds"].as_array().unwrap() {
        assert!(r["pairs"].as_u64().unwrap() > 0, "{r}");
        assert!(r["training"]["train"]["loss"].is_number(), "{r}");
    }
    let sample = std::fs::read_to_string(through.join("run/round-2/sample.toml")).unwrap();
    assert!(sample.contains("round-1/adapter.gguf"), "{sample}");
}

#[test]
fn a_loop_of_two_rounds_trains_evaluates_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let protocol = short_protocol(dir.path());
    let looped = LoopRun {
        dir: dir.path(),
        protocol: &protocol,
        models: real_models(),
        users: 1,
    };
    let run = looped.out();
    looped.run(1);
    let commands = |round: usize| {
        std::fs::read_to_string(run.join(format!("round-{round}/commands.txt"))).unwrap()
    };
    let first = commands(1);
    let first_pairs = std::fs::read(run.join("round-1/pairs.jsonl")).unwrap_or_default();

    // A second run with one round more: round 1 is done and left alone; round 2 samples with
    // round 1's adapter, trains on both rounds' pairs and is evaluated on the same users.
    let output = looped.run(2);
    assert_eq!(commands(1), first, "nothing of round 1 ran again");
    assert_eq!(
        std::fs::read(run.join("round-1/pairs.jsonl")).unwrap_or_default(),
        first_pairs
    );
    let second = commands(2);
    let adapter_1 = run.join("round-1/adapter.gguf");
    let sample: toml::Value =
        toml::from_str(&std::fs::read_to_string(run.join("round-2/sample.toml")).unwrap()).unwrap();
    let lora = &sample["arms"][0]["lora"];
    if adapter_1.exists() {
        assert_eq!(
            lora[0]["file"].as_str(),
            adapter_1.to_str(),
            "round 2 samples with round 1's adapter"
        );
        if run.join("round-2/train.jsonl").metadata().unwrap().len() > 0 {
            assert!(
                second.contains("round-1/train.jsonl") && second.contains("round-2/train.jsonl"),
                "round 2 trains on every pair so far: {second}"
            );
        }
    } else {
        assert!(lora.as_array().is_none_or(|l| l.is_empty()), "{sample}");
    }
    // Both rounds' evaluations used the same simulated users.
    let seed = |round: usize| {
        commands(round)
            .lines()
            .find(|l| l.starts_with("collabllm eval"))
            .and_then(|l| l.split("--seed ").nth(1))
            .map(|s| s.split(' ').next().unwrap().to_string())
    };
    assert!(seed(1).is_some());
    assert_eq!(seed(1), seed(2));

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{report}");
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r["round"], i + 1);
        let pairs = std::fs::read_to_string(run.join(format!("round-{}/pairs.jsonl", i + 1)))
            .unwrap_or_default();
        assert_eq!(r["pairs"], pairs.lines().count(), "{r}");
        assert!(r["eval"]["diff"]["trained"].is_object(), "{r}");
    }
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert_eq!(
        md.lines()
            .filter(|l| l.starts_with("| 1 |") || l.starts_with("| 2 |"))
            .count(),
        2
    );
    assert!(output.contains("report:"), "{output}");
}
