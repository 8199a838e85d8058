//! `collabllm loop` with the real models, kept short: two rounds (the second started by a later
//! run, as a resumed loop), each simulating, scoring, training and evaluating.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::common::{real_models, repo_root};

/// The quick pilot with two turns a session and the default model in every role, so a round
/// takes a few minutes on two cores.
fn short_protocol(dir: &Path) -> std::path::PathBuf {
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

fn run_loop(dir: &Path, protocol: &Path, rounds: usize) -> String {
    let database = format!("sqlite://{}", dir.join("loop.sqlite3").display());
    let out = Command::new(env!("CARGO_BIN_EXE_collabllm"))
        .args(["--database-url", &database, "--models-dir"])
        .arg(real_models())
        .arg("loop")
        .arg("--protocol")
        .arg(protocol)
        .args([
            "--rounds",
            &rounds.to_string(),
            "--users",
            "1",
            "--eval-users",
            "1",
        ])
        .args([
            "--samples",
            "1",
            "--window",
            "1",
            "--max-turns",
            "1",
            "--epochs",
            "1",
        ])
        .arg("--out")
        .arg(dir.join("run"))
        .env("COLLABLLM_LOG", "warn")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    format!("{stdout}\n{stderr}")
}

#[test]
fn a_loop_of_two_rounds_trains_evaluates_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let protocol = short_protocol(dir.path());
    let run = dir.path().join("run");
    run_loop(dir.path(), &protocol, 1);
    let commands = |round: usize| {
        std::fs::read_to_string(run.join(format!("round-{round}/commands.txt"))).unwrap()
    };
    let first = commands(1);
    let first_pairs = std::fs::read(run.join("round-1/pairs.jsonl")).unwrap_or_default();

    // A second run with one round more: round 1 is done and left alone; round 2 samples with
    // round 1's adapter, trains on both rounds' pairs and is evaluated on the same users.
    let output = run_loop(dir.path(), &protocol, 2);
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
