//! DPO training: gradients, the forward pass against llama.cpp, the adapter llama.cpp loads,
//! a run that learns, resume to the same bytes, and refused input.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, Var};
use collabllm::engine::llama::{all_logits, load_model};
use collabllm::engine::registry::engine_name;
use collabllm::engine::{ChatMessage, ChatRequest, EngineEvent, Engines, Role, Sampling};
use collabllm::protocol::LoadedProtocol;
use collabllm::train::data::{PairTokens, Tokenizer};
use collabllm::train::model::{BaseInfo, Config, Lora, Target, Weights};
use collabllm::train::{adapter, compare_logits, DpoOptions, Hyper, Outcome};
use serde_json::json;

use crate::common::{model_path, models_dir, repo_root, write_temp};

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn set_values(var: &Var, data: Vec<f64>) {
    let t = Tensor::from_vec(data, var.as_tensor().dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(var.as_tensor().dtype())
        .unwrap();
    var.set(&t).unwrap();
}

/// Fills every B of `lora` with values in ±`scale` (a fresh adapter has B = 0 and changes nothing).
fn randomise_b(lora: &Lora, scale: f64) {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for adapter in lora.adapters.values() {
        let n = adapter.b.as_tensor().elem_count();
        let data = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                scale * ((x % 2001) as f64 / 1000.0 - 1.0)
            })
            .collect();
        set_values(&adapter.b, data);
    }
}

fn tiny_config() -> Config {
    Config {
        layers: 2,
        embedding: 16,
        heads: 4,
        kv_heads: 2,
        feed_forward: 24,
        vocab: 40,
        rms_eps: 1e-5,
        rope_base: 10_000.0,
    }
}

fn tiny_pair() -> PairTokens {
    PairTokens {
        prompt: vec![3, 17, 5],
        chosen: vec![22, 39, 0, 11, 8],
        rejected: vec![9, 30, 2, 8],
    }
}

/// The DPO objective's policy part: log π(chosen) − log π(rejected), from the packed pair.
fn pair_margin(weights: &Weights, pair: &PairTokens, lora: &Lora) -> Tensor {
    let (chosen, rejected) = weights.pair_logprobs(pair, Some(lora)).unwrap();
    (chosen - rejected).unwrap()
}

/// Every op of the forward pass must carry the gradient: an op without a backward pass would
/// make autograd disagree with finite differences (or give zero) for the tensors before it.
#[test]
fn gradients_match_finite_differences() {
    let weights = Weights::random(tiny_config(), 7, DType::F64).unwrap();
    let lora = Lora::new(&weights.config, 2, 4.0, &Target::ALL, 3, DType::F64).unwrap();
    randomise_b(&lora, 0.3);
    let pair = tiny_pair();
    let loss = |lora: &Lora| {
        pair_margin(&weights, &pair, lora)
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = pair_margin(&weights, &pair, &lora).backward().unwrap();
    let mut checked = 0;
    for (name, var) in lora.named() {
        let analytic = values(
            grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} has no gradient")),
        );
        let original = values(var.as_tensor());
        // Entries spread over the tensor, for both layers and every target.
        for i in [0, original.len() / 3, original.len() - 1] {
            let eps = 1e-6;
            let mut plus = original.clone();
            plus[i] += eps;
            set_values(var, plus);
            let up = loss(&lora);
            let mut minus = original.clone();
            minus[i] -= eps;
            set_values(var, minus);
            let down = loss(&lora);
            set_values(var, original.clone());
            let numeric = (up - down) / (2.0 * eps);
            let tolerance = 1e-6 + 1e-4 * numeric.abs().max(analytic[i].abs());
            assert!(
                (numeric - analytic[i]).abs() < tolerance,
                "{name}[{i}]: autograd {} vs finite differences {numeric}",
                analytic[i]
            );
            assert!(numeric.abs() > 1e-9, "{name}[{i}] does not move the loss");
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * 7 * 2 * 3);
}

/// A packed pair computes the prompt once; each reply's log-probability must be what the prompt
/// and that reply alone give, so the rejected reply neither sees the chosen one nor takes its
/// positions.
#[test]
fn a_packed_pair_scores_each_reply_as_its_own_sequence() {
    let weights = Weights::random(tiny_config(), 11, DType::F64).unwrap();
    let lora = Lora::new(&weights.config, 2, 4.0, &Target::ALL, 5, DType::F64).unwrap();
    randomise_b(&lora, 0.3);
    let pair = tiny_pair();
    let alone = |reply: &[u32]| {
        let tokens: Vec<u32> = pair.prompt.iter().chain(reply).copied().collect();
        weights
            .sequence_logprob(&tokens, pair.prompt.len(), Some(&lora))
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (chosen, rejected) = weights.pair_logprobs(&pair, Some(&lora)).unwrap();
    let (chosen, rejected) = (
        chosen.to_scalar::<f64>().unwrap(),
        rejected.to_scalar::<f64>().unwrap(),
    );
    assert!(
        (chosen - alone(&pair.chosen)).abs() < 1e-9,
        "chosen {chosen}"
    );
    assert!(
        (rejected - alone(&pair.rejected)).abs() < 1e-9,
        "rejected {rejected}"
    );
}

/// A conversation tokenised as serving does, from the real model's vocabulary and template.
fn conversation_tokens() -> Vec<u32> {
    let served = load_model(&model_path(), None, &[]).unwrap();
    let tokenizer = Tokenizer::new(&served).unwrap();
    let prompt = [
        ChatMessage::new(Role::System, "You are a helpful writing assistant."),
        ChatMessage::new(
            Role::User,
            "Help me write a short note to my landlord about the broken heating in the flat.",
        ),
    ];
    let reply = "Of course. Dear Mr. Patel, I am writing to let you know that the heating in \
                 flat 4 has not worked since Monday. Could you arrange for a repair this week? \
                 Thank you, Anna.";
    let (pair, cut) = tokenizer
        .encode_pair(&prompt, reply, "No.", 512)
        .unwrap()
        .unwrap();
    assert!(!cut);
    assert!(pair.chosen.len() > 20);
    pair.chosen_sequence().tokens
}

fn our_logits(weights: &Weights, tokens: &[u32], lora: Option<&Lora>) -> Vec<Vec<f32>> {
    weights
        .logits(&weights.hidden(tokens, lora).unwrap())
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn the_training_forward_pass_matches_llama_cpp() {
    let tokens = conversation_tokens();
    let (weights, _) = Weights::from_gguf(&model_path(), DType::F32).unwrap();
    let served = load_model(&model_path(), None, &[]).unwrap();
    let theirs = all_logits(&served, None, &tokens).unwrap();
    let ours = our_logits(&weights, &tokens, None);
    let c = compare_logits(&ours, &theirs);
    assert_eq!(c.positions, tokens.len());
    assert!(c.same_next_token >= 0.95, "{c:?}");
    assert!(c.mean_abs_diff < 0.25, "{c:?}");
}

fn adapter_file(dir: &Path, lora: &Lora, base: &BaseInfo) -> PathBuf {
    let path = dir.join("adapter.gguf");
    adapter::write_adapter(
        &path,
        base,
        lora,
        "sha",
        &json!({"pairs_files": []}),
        &json!({}),
    )
    .unwrap();
    path
}

#[test]
fn llama_cpp_applies_a_written_adapter_as_training_does() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = conversation_tokens();
    let (weights, base) = Weights::from_gguf(&model_path(), DType::F32).unwrap();
    let base_logits = all_logits(
        &load_model(&model_path(), None, &[]).unwrap(),
        None,
        &tokens,
    )
    .unwrap();

    // All-zero B: llama.cpp's output is the base model's.
    let zero = Lora::new(&weights.config, 4, 8.0, &Target::ALL, 1, DType::F32).unwrap();
    let path = adapter_file(dir.path(), &zero, &base);
    let served = load_model(&model_path(), None, std::slice::from_ref(&path)).unwrap();
    let with_zero = all_logits(&served, Some(&path), &tokens).unwrap();
    let c = compare_logits(&with_zero, &base_logits);
    assert!(c.max_abs_diff < 1e-3, "{c:?}");
    drop(served);

    // Non-zero B: llama.cpp and the training forward agree, and both differ from the base.
    let lora = Lora::new(&weights.config, 4, 8.0, &Target::ALL, 1, DType::F32).unwrap();
    randomise_b(&lora, 0.3);
    std::fs::remove_file(&path).unwrap();
    let path = adapter_file(dir.path(), &lora, &base);
    let served = load_model(&model_path(), None, std::slice::from_ref(&path)).unwrap();
    let theirs = all_logits(&served, Some(&path), &tokens).unwrap();
    let ours = our_logits(&weights, &tokens, Some(&lora));
    let agreement = compare_logits(&ours, &theirs);
    let moved = compare_logits(&theirs, &base_logits);
    assert!(agreement.same_next_token >= 0.95, "{agreement:?}");
    assert!(moved.same_next_token < 0.9, "{moved:?}");
    assert!(
        moved.mean_abs_diff > 5.0 * agreement.mean_abs_diff,
        "the adapter barely changes the output: {moved:?} vs {agreement:?}"
    );

    // The file is what llama.cpp expects to read.
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let text = |k: &str| content.metadata[k].to_string().unwrap().clone();
    assert_eq!(text("general.type"), "adapter");
    assert_eq!(text("adapter.type"), "lora");
    assert_eq!(text("general.architecture"), "llama");
    assert_eq!(
        content.metadata["adapter.lora.alpha"].to_f32().unwrap(),
        8.0
    );
    // ggml order: lora_a is (inputs, rank), lora_b (rank, outputs); candle lists dims reversed.
    let dims = |n: &str| content.tensor_infos[n].shape.dims().to_vec();
    assert_eq!(dims("blk.0.ffn_down.weight.lora_a"), [4, 1536]);
    assert_eq!(dims("blk.0.ffn_down.weight.lora_b"), [576, 4]);
    assert_eq!(dims("blk.29.attn_k.weight.lora_b"), [192, 4]);
    assert_eq!(content.tensor_infos.len(), 30 * 7 * 2);
}

fn pair_line(user: &str, chosen: &str, rejected: &str, model_sha256: &str) -> String {
    json!({
        "prompt": [{"role": "user", "content": user}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "metadata": {"model_sha256": model_sha256, "turn": 1}
    })
    .to_string()
}

const SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Short pairs where the chosen reply asks what the user wants and the rejected one assumes.
fn pairs_file(dir: &Path, n: usize, other_model: bool) -> PathBuf {
    let topics = [
        "a toast for my sister's wedding",
        "a cover letter",
        "a poem about the sea",
        "a product description for a lamp",
        "an apology to a neighbour",
        "a birthday message",
        "a blog post intro",
        "a thank-you note to a teacher",
    ];
    let mut lines: Vec<String> = topics
        .iter()
        .cycle()
        .take(n)
        .map(|t| {
            pair_line(
                &format!("Write {t}."),
                "Happy to help! Who is it for, and what tone would you like?",
                "Here it is: it was great. The end.",
                SHA,
            )
        })
        .collect();
    if other_model {
        lines[0] = pair_line(
            "Write a haiku.",
            "What season should it be about?",
            "Leaves fall. Done.",
            "0000",
        );
    }
    write_temp(dir, "pairs.jsonl", &(lines.join("\n") + "\n"))
}

fn hyper(lr: f64, grad_accum: usize, epochs: usize) -> Hyper {
    Hyper {
        beta: 0.1,
        rank: 8,
        alpha: 16.0,
        targets: Target::ALL.iter().map(|t| t.short().to_string()).collect(),
        lr,
        epochs,
        grad_accum,
        max_tokens: 512,
        seed: 5,
        max_grad_norm: 1.0,
    }
}

#[test]
fn dpo_training_learns_its_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = pairs_file(dir.path(), 4, true);
    let out = dir.path().join("policy.gguf");
    let options = DpoOptions {
        pairs: vec![pairs.clone()],
        eval: Some(pairs),
        model: model_path(),
        out: out.clone(),
        hyper: hyper(2e-3, 2, 3),
        max_steps: None,
        resume: false,
        force: false,
        checkpoint_every: 1,
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let Outcome::Finished {
        adapter,
        report_path,
        report: returned,
    } = collabllm::train::train_dpo(&options, &|_| {}, &stop).unwrap()
    else {
        panic!("stopped")
    };
    assert_eq!(adapter, out);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report_path).unwrap()).unwrap();
    assert_eq!(report, *returned);
    let curve = report["curve"].as_array().unwrap();
    assert_eq!(curve.len(), 6, "2 steps per epoch, 3 epochs");
    // Before any update the policy is the reference: loss ln 2, no pair preferred yet.
    assert!((curve[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-3);
    let last = curve.last().unwrap();
    assert!(last["loss"].as_f64().unwrap() < 0.6, "{last}");
    assert_eq!(report["eval"]["reward_accuracy"], 1.0, "{}", report["eval"]);
    assert!(report["eval"]["margin"].as_f64().unwrap() > 0.0);
    assert_eq!(report["data"]["other_model"], 1);
    assert_eq!(report["data"]["pairs"], 4);
    assert!(
        report["llama_cpp_check"]["same_next_token"]
            .as_f64()
            .unwrap()
            >= 0.9
    );
    assert!(!collabllm::train::checkpoint_path(&out).exists());
    let mut file = std::fs::File::open(&out).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let pairs_sha = content.metadata["collabllm.pairs.sha256"].to_vec().unwrap();
    assert_eq!(pairs_sha.len(), 1);
    assert_eq!(
        content.metadata["collabllm.base_model.sha256"]
            .to_string()
            .unwrap(),
        SHA
    );
    serve_as_an_arm(dir.path(), &out);
}

/// A protocol arm with the adapter as `[[arms.lora]]` is served with it.
fn serve_as_an_arm(dir: &Path, adapter: &Path) {
    let pilot =
        std::fs::read_to_string(repo_root().join("study-protocols/quick-pilot.toml")).unwrap();
    let lora = format!(
        "[[arms.lora]]\nfile = {:?}\nscale = 1.0\n",
        adapter.display().to_string()
    );
    let text = pilot.replacen("max_tokens = 96\n", &format!("max_tokens = 96\n{lora}"), 1);
    assert_ne!(text, pilot);
    let path = write_temp(dir, "trained.toml", &text);
    let loaded = LoadedProtocol::load(&path, &models_dir()).unwrap();
    let spec = loaded.protocol.arms[0].lora[0].clone();
    let engines = Engines::new();
    engines
        .load_protocol(&loaded.protocol, &crate::common::real_models())
        .unwrap();
    let engine = engines
        .get(&engine_name("smollm2-135m", Some(&spec)))
        .unwrap();
    assert!(
        engine.fingerprint().contains("+lora:"),
        "{}",
        engine.fingerprint()
    );
    let request = ChatRequest::new(
        vec![ChatMessage::new(Role::User, "Write a poem about the sea.")],
        Sampling {
            temperature: 0.0,
            max_tokens: 16,
            ..Sampling::default()
        },
    );
    let mut generation = engine.start(request).unwrap();
    let done = tokio::runtime::Runtime::new().unwrap().block_on(async {
        while let Some(event) = generation.next().await {
            match event {
                EngineEvent::Done(c) => return c,
                EngineEvent::Error(e) => panic!("{e}"),
                EngineEvent::Token(_) | EngineEvent::Queued { .. } | EngineEvent::Started => {}
            }
        }
        panic!("the generation ended without a result")
    });
    assert!(done.generated_tokens > 0);
}

fn train_command(pairs: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_collabllm"));
    c.args(["train", "dpo", "--pairs"])
        .arg(pairs)
        .arg("--model")
        .arg(model_path())
        .arg("--out")
        .arg(out)
        .args(["--grad-accum", "1", "--lr", "1e-3", "--seed", "9"])
        .args(extra)
        .env("COLLABLLM_LOG", "warn");
    c
}

#[test]
fn a_stopped_run_resumes_to_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = pairs_file(dir.path(), 8, false);
    let whole = dir.path().join("whole.gguf");
    let out = train_command(&pairs, &whole, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let parts = dir.path().join("parts.gguf");
    let checkpoint = collabllm::train::checkpoint_path(&parts);
    let child = train_command(&pairs, &parts, &[])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while !checkpoint.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint was written"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let stopped = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert_eq!(stopped.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    assert!(!parts.exists());

    // Without --resume the unfinished run is not silently discarded.
    let again = train_command(&pairs, &parts, &[]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));

    let resumed = train_command(&pairs, &parts, &["--resume"])
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(
        std::fs::read(&whole).unwrap(),
        std::fs::read(&parts).unwrap()
    );
    assert!(!checkpoint.exists());
}

#[test]
fn bad_training_input_is_refused_with_where() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |pairs: &Path, out: &Path, extra: &[&str], why: &str| {
        let o = train_command(pairs, out, extra).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "succeeded: {why}");
        assert!(stderr.contains(why), "expected `{why}` in: {stderr}");
    };
    let out = dir.path().join("a.gguf");
    let good = pair_line("Hi", "Hello! What would you like to write?", "Bye.", SHA);
    let broken = write_temp(
        dir.path(),
        "broken.jsonl",
        &format!("{good}\n{{\"prompt\": [\n"),
    );
    refused(
        &broken,
        &out,
        &[],
        &format!("{}:2: not JSON", broken.display()),
    );
    let empty = write_temp(
        dir.path(),
        "empty.jsonl",
        &pair_line("Hi", "Hello! What would you like?", "  ", SHA),
    );
    refused(
        &empty,
        &out,
        &[],
        &format!("{}:1: `rejected` is empty", empty.display()),
    );
    let ok = write_temp(dir.path(), "ok.jsonl", &good);
    refused(
        &ok,
        &out,
        &["--targets", "q,attn"],
        "unknown LoRA target `attn`",
    );
    std::fs::write(&out, b"keep me").unwrap();
    refused(&ok, &out, &[], "exists; pass --force");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");

    // A GGUF of another architecture.
    let gpt2 = dir.path().join("gpt2.gguf");
    let arch = gguf_file::Value::String("gpt2".into());
    let t = candle_core::quantized::QTensor::quantize(
        &Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap(),
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    gguf_file::write(
        &mut std::fs::File::create(&gpt2).unwrap(),
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &t)],
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_collabllm"))
        .args(["train", "dpo", "--pairs"])
        .arg(&ok)
        .arg("--model")
        .arg(&gpt2)
        .arg("--out")
        .arg(dir.path().join("b.gguf"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("architecture is `gpt2`"), "{stderr}");
    assert!(!dir.path().join("b.gguf").exists());
}
