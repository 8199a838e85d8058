//! `train dpo`: a LoRA adapter trained on preference pairs, with progress and checkpoints.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use indicatif::ProgressBar;

use collabllm::train;

use super::{stop_signal, Context};

#[derive(Subcommand)]
pub enum TrainCommand {
    /// Train a LoRA adapter with DPO (sigmoid loss) on the CPU from TRL conversational pairs
    /// (`export pairs`, `pairs`, `synth --pairs-out`), fitted to the exact weights llama.cpp serves,
    /// and write it as a llama.cpp adapter GGUF with a JSON report beside it (`ADAPTER.json`).
    /// Add it to a protocol as `[[arms.lora]]` to serve it as an arm. Ctrl-C or SIGTERM stops after
    /// saving a checkpoint; `--resume` continues to the same adapter an uninterrupted run writes.
    Dpo {
        /// JSONL file of pairs; repeat for several. KTO rows (`completion`/`label`) are skipped.
        #[arg(long = "pairs", required = true)]
        pairs: Vec<PathBuf>,
        /// Base model: a protocol's model id (with --protocol) or a GGUF file.
        #[arg(long)]
        model: String,
        /// Protocol whose `[[models]]` resolve a model id.
        #[arg(long)]
        protocol: Option<PathBuf>,
        /// Adapter GGUF to write.
        #[arg(long)]
        out: PathBuf,
        /// Held-out pairs: reward accuracy and margins of the trained adapter on them.
        #[arg(long)]
        eval: Option<PathBuf>,
        /// DPO temperature: how far the policy may move from the reference.
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
        /// LoRA rank.
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// LoRA alpha; the update is scaled by alpha/rank.
        #[arg(long, default_value_t = 16.0)]
        alpha: f64,
        /// Layers adapted, from q,k,v,o,gate,up,down.
        #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
        targets: Vec<String>,
        /// Peak learning rate (AdamW), decayed linearly to 0 over every epoch's steps.
        #[arg(long, default_value_t = 5e-5)]
        lr: f64,
        /// Passes over the pairs.
        #[arg(long, default_value_t = 1)]
        epochs: usize,
        /// Pairs per optimizer step.
        #[arg(long, default_value_t = 8)]
        grad_accum: usize,
        /// Longest sequence (prompt + reply); longer prompts are cut from the left.
        #[arg(long, default_value_t = 512)]
        max_tokens: usize,
        /// Seed of the adapter's initialisation and of the order of the pairs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop after this many optimizer steps; the checkpoint stays, so --resume continues.
        #[arg(long)]
        max_steps: Option<usize>,
        /// Continue the run whose checkpoint (--out with `.checkpoint` added) is beside --out.
        #[arg(long)]
        resume: bool,
        /// Replace an existing --out (and discard an unfinished run's checkpoint).
        #[arg(long)]
        force: bool,
        /// Save the checkpoint every N optimizer steps (always at the end and when stopped).
        #[arg(long, default_value_t = 1)]
        checkpoint_every: usize,
    },
}

pub fn train(ctx: &Context, command: TrainCommand) -> Result<()> {
    let TrainCommand::Dpo {
        pairs,
        model,
        protocol,
        out,
        eval,
        beta,
        rank,
        alpha,
        targets,
        lr,
        epochs,
        grad_accum,
        max_tokens,
        seed,
        max_steps,
        resume,
        force,
        checkpoint_every,
    } = command;
    let options = train::DpoOptions {
        pairs,
        eval,
        model: resolve_model(ctx, &model, protocol.as_deref())?,
        out,
        hyper: train::Hyper {
            beta,
            rank,
            alpha,
            targets,
            lr,
            epochs,
            grad_accum,
            max_tokens,
            seed,
            max_grad_norm: 1.0,
        },
        max_steps,
        resume,
        force,
        checkpoint_every,
    };
    run_train_dpo(&options)
}

/// A GGUF path, or a protocol's model id resolved to its file.
fn resolve_model(ctx: &Context, model: &str, protocol: Option<&Path>) -> Result<PathBuf> {
    if train::data::is_gguf_path(model) {
        return Ok(PathBuf::from(model));
    }
    let Some(protocol) = protocol else {
        bail!("--model `{model}` is not a .gguf file; give --protocol to resolve a model id");
    };
    let loaded = ctx.load_protocol(protocol)?;
    let spec = loaded
        .protocol
        .models
        .iter()
        .find(|m| m.id == model)
        .with_context(|| format!("{} has no model `{model}`", protocol.display()))?;
    spec.resolved_file(&ctx.settings.models_dir)
        .with_context(|| {
            format!(
                "model `{model}` of {} is served from an endpoint; training needs its GGUF file",
                protocol.display()
            )
        })
}

/// Runs DPO training with a progress bar; Ctrl-C or SIGTERM stops it at a checkpoint.
fn run_train_dpo(options: &train::DpoOptions) -> Result<()> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let flag = stop.clone();
    let _signals = std::thread::spawn(move || {
        runtime.block_on(stop_signal());
        eprintln!("stopping: saving the checkpoint…");
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let bar = ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} {bar:30} {pos}/{len} {msg} ({elapsed} so far, {eta} left)",
        )
        .expect("static template"),
    );
    let progress = |p: train::Progress| match p {
        train::Progress::Reference { done, total } => {
            bar.set_prefix("reference log-probs");
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        train::Progress::Step(r) => {
            if bar.prefix() != "steps" {
                bar.set_prefix("steps");
                bar.reset_eta();
            }
            bar.set_length(r.total_steps as u64);
            bar.set_position(r.step as u64);
            bar.set_message(format!(
                "loss {:.4} · reward acc {:.2} · margin {:+.3} · {:.0} tok/s",
                r.loss, r.reward_accuracy, r.margin, r.tokens_per_s
            ));
            tracing::info!(
                step = r.step,
                loss = r.loss,
                reward_accuracy = r.reward_accuracy,
                margin = r.margin,
                grad_norm = r.grad_norm,
                lr = r.lr,
                tokens_per_s = r.tokens_per_s,
                "step"
            );
        }
    };
    let outcome = train::train_dpo(options, &progress, &stop);
    bar.finish_and_clear();
    match outcome? {
        train::Outcome::Finished {
            adapter,
            report_path,
            report,
        } => {
            let d = &report["data"];
            println!(
                "trained on {} pairs ({} prompts cut to --max-tokens, {} pairs longer left out, \
                 {} KTO rows skipped, {} pairs made with another model)",
                d["pairs"], d["truncated"], d["too_long"], d["kto_rows_skipped"], d["other_model"]
            );
            let figures = |s: &serde_json::Value| {
                format!(
                    "loss {:.4}, reward accuracy {:.2}, margin {:+.3}",
                    s["loss"].as_f64().unwrap_or(f64::NAN),
                    s["reward_accuracy"].as_f64().unwrap_or(f64::NAN),
                    s["margin"].as_f64().unwrap_or(f64::NAN)
                )
            };
            println!("last epoch: {}", figures(&report["train"]));
            if !report["eval"].is_null() {
                println!(
                    "eval ({} pairs): {}",
                    report["eval"]["n"],
                    figures(&report["eval"])
                );
            }
            println!(
                "llama.cpp applies the adapter as trained: the same next token at {:.0}% of positions",
                report["llama_cpp_check"]["same_next_token"].as_f64().unwrap_or(0.0) * 100.0
            );
            println!("adapter: {}", adapter.display());
            println!("report: {}", report_path.display());
            Ok(())
        }
        train::Outcome::Stopped { step, checkpoint } => {
            eprintln!(
                "stopped after {step} steps; the checkpoint is {}: run the same command with --resume to continue",
                checkpoint.display()
            );
            std::process::exit(130);
        }
    }
}
