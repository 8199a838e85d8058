//! DPO training of a LoRA adapter on the CPU, from the preference pairs the platform exports, into
//! an adapter GGUF that llama.cpp serves as a study arm.
//!
//! The base weights are the served GGUF's, dequantized (the adapter is fitted to the exact weights
//! llama.cpp runs); the tokens are the served tokens (the model's own vocabulary and chat
//! template). Reference log-probabilities are computed once and kept in the checkpoint, which is
//! written after every few optimizer steps: a stopped run resumes to the same bytes an
//! uninterrupted one writes.

pub mod adapter;
mod attention;
pub mod data;
mod matmul;
pub mod model;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::engine::llama;
use data::{PairFiles, PairTokens, Sequence, Tokenizer};
use model::{Lora, Target, Weights};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{at}: {reason}")]
    Input { at: String, reason: String },
    #[error("{0}")]
    Model(String),
    #[error("{0}")]
    Options(String),
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl TrainError {
    fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        TrainError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        }
    }
}

/// What shapes the adapter: a checkpoint resumes only under the same values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    pub beta: f64,
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    pub lr: f64,
    pub epochs: usize,
    pub grad_accum: usize,
    pub max_tokens: usize,
    pub seed: u64,
    /// Gradients are scaled down to this global norm (TRL's default, 1.0).
    pub max_grad_norm: f64,
}

impl Hyper {
    fn targets(&self) -> Result<Vec<Target>, TrainError> {
        let mut out = Vec::new();
        for t in &self.targets {
            let target = Target::parse(t.trim()).ok_or_else(|| {
                TrainError::Options(format!(
                    "unknown LoRA target `{t}`; choose from q,k,v,o,gate,up,down"
                ))
            })?;
            if !out.contains(&target) {
                out.push(target);
            }
        }
        if out.is_empty() {
            return Err(TrainError::Options("--targets names no layer".into()));
        }
        Ok(out)
    }

    fn check(&self) -> Result<(), TrainError> {
        let bad = |what: &str| Err(TrainError::Options(what.to_string()));
        if self.rank == 0 {
            return bad("--rank must be at least 1");
        }
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return bad("--beta must be a positive number");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("--lr must be a positive number");
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return bad("--alpha must be a positive number");
        }
        if self.epochs == 0 || self.grad_accum == 0 {
            return bad("--epochs and --grad-accum must be at least 1");
        }
        if self.max_tokens < 16 {
            return bad("--max-tokens must be at least 16");
        }
        self.targets().map(|_| ())
    }
}

pub struct DpoOptions {
    pub pairs: Vec<PathBuf>,
    pub eval: Option<PathBuf>,
    pub model: PathBuf,
    pub out: PathBuf,
    pub hyper: Hyper,
    /// Stop after this many optimizer steps (the schedule still spans every epoch, so a later
    /// `--resume` continues it).
    pub max_steps: Option<usize>,
    pub resume: bool,
    pub force: bool,
    pub checkpoint_every: usize,
}

/// What a run reports while it works.
pub enum Progress {
    /// Reference log-probabilities: pairs done of total.
    Reference { done: usize, total: usize },
    /// An optimizer step finished.
    Step(StepRecord),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    pub reward_accuracy: f64,
    pub margin: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
}

pub enum Outcome {
    /// The adapter and its report were written.
    Finished {
        adapter: PathBuf,
        report_path: PathBuf,
        report: Box<serde_json::Value>,
    },
    /// Stopped by a signal; the checkpoint holds every finished step.
    Stopped { step: usize, checkpoint: PathBuf },
}

/// The checkpoint beside an adapter being trained.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".checkpoint");
    PathBuf::from(p)
}

/// The JSON report beside an adapter.
pub fn report_path(out: &Path) -> PathBuf {
    out.with_extension("json")
}

/// A pair ready for training: tokens of both sides and their reference log-probabilities.
struct Prepared {
    pair: PairTokens,
    reference: (f64, f64),
}

/// DPO numbers of one pair, given the policy's and the reference's log-probabilities.
#[derive(Debug, Clone, Copy)]
struct PairStats {
    loss: f64,
    chosen_reward: f64,
    rejected_reward: f64,
}

impl PairStats {
    fn new(beta: f64, policy: (f64, f64), reference: (f64, f64)) -> Self {
        let chosen_reward = beta * (policy.0 - reference.0);
        let rejected_reward = beta * (policy.1 - reference.1);
        PairStats {
            loss: softplus(-(chosen_reward - rejected_reward)),
            chosen_reward,
            rejected_reward,
        }
    }

    fn margin(&self) -> f64 {
        self.chosen_reward - self.rejected_reward
    }
}

/// ln(1 + eˣ) without overflow: the sigmoid DPO loss is softplus(−margin).
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Means of a set of pairs' DPO numbers.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub n: usize,
    pub loss: f64,
    pub reward_accuracy: f64,
    pub margin: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
}

fn summarise(stats: &[PairStats]) -> Summary {
    let n = stats.len().max(1) as f64;
    let mean = |f: &dyn Fn(&PairStats) -> f64| stats.iter().map(f).sum::<f64>() / n;
    Summary {
        n: stats.len(),
        loss: mean(&|s| s.loss),
        reward_accuracy: mean(&|s| f64::from(u8::from(s.margin() > 0.0))),
        margin: mean(&|s| s.margin()),
        chosen_reward: mean(&|s| s.chosen_reward),
        rejected_reward: mean(&|s| s.rejected_reward),
    }
}

/// How the pairs became sequences.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DataReport {
    pub pairs: usize,
    pub kto_rows_skipped: usize,
    /// Pairs whose prompt was cut from the left to fit --max-tokens.
    pub truncated: usize,
    /// Pairs left out because a reply alone is longer than --max-tokens.
    pub too_long: usize,
    /// Pairs whose recorded model is not the base model being trained.
    pub other_model: usize,
}

/// Tokenises pairs for training; warns about pairs made with another model.
fn prepare(
    tokenizer: &Tokenizer,
    files: &PairFiles,
    base_sha256: &str,
    max_tokens: usize,
) -> Result<(Vec<PairTokens>, DataReport), TrainError> {
    let mut report = DataReport {
        kto_rows_skipped: files.kto_rows,
        ..DataReport::default()
    };
    let mut out = Vec::new();
    for pair in &files.pairs {
        if let Some(sha) = &pair.model_sha256 {
            if !data::base_of_fingerprint(sha).eq_ignore_ascii_case(base_sha256) {
                if report.other_model == 0 {
                    tracing::warn!(
                        at = %pair.origin, recorded = %sha, base = %base_sha256,
                        "pairs were made with another model: its vocabulary may differ"
                    );
                }
                report.other_model += 1;
            }
        }
        match tokenizer.encode_pair(&pair.prompt, &pair.chosen, &pair.rejected, max_tokens)? {
            Some((tokens, cut)) => {
                report.truncated += usize::from(cut);
                out.push(tokens);
            }
            None => report.too_long += 1,
        }
    }
    report.pairs = out.len();
    Ok((out, report))
}

/// Log-probabilities of both sides of each pair under `lora` (or the base model), no gradients.
fn logprobs(
    weights: &Weights,
    pairs: &[PairTokens],
    lora: Option<&Lora>,
    stop: &AtomicBool,
    on_done: &dyn Fn(usize),
) -> Result<Option<Vec<(f64, f64)>>, TrainError> {
    let mut out = Vec::with_capacity(pairs.len());
    for (i, pair) in pairs.iter().enumerate() {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let (chosen, rejected) = weights.pair_logprobs(pair, lora)?;
        out.push((scalar(&chosen)?, scalar(&rejected)?));
        on_done(i + 1);
    }
    Ok(Some(out))
}

/// The order of the pairs in `epoch`: a shuffle fixed by the seed.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    order.shuffle(&mut rng);
    order
}

/// AdamW (TRL's optimizer; no weight decay) over the adapter's tensors, with its moments.
struct Adam {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

const ADAM_BETAS: (f64, f64) = (0.9, 0.999);
const ADAM_EPS: f64 = 1e-8;

impl Adam {
    fn new(lora: &Lora) -> Result<Self, TrainError> {
        let zeros = lora
            .named()
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Adam {
            m: zeros.clone(),
            v: zeros,
        })
    }

    /// One update of step `t` (from 1) with learning rate `lr`.
    fn step(&mut self, lora: &Lora, grads: &[Tensor], t: usize, lr: f64) -> Result<(), TrainError> {
        let (b1, b2) = ADAM_BETAS;
        let c1 = 1.0 - b1.powi(t as i32);
        let c2 = 1.0 - b2.powi(t as i32);
        for (i, (_, var)) in lora.named().into_iter().enumerate() {
            let g = &grads[i];
            self.m[i] = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + ADAM_EPS)?)?;
            var.set(&(var.as_tensor() - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// Everything a resumed run needs to continue exactly.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    hyper: Hyper,
    base_sha256: String,
    pairs_sha256: Vec<String>,
    steps_done: usize,
    reference: Vec<(f64, f64)>,
    curve: Vec<StepRecord>,
}

/// Keeps freed memory in the process for the next allocation. A backward pass allocates and
/// frees hundreds of activation-sized buffers; glibc's defaults return many of them to the
/// kernel at once, and faulting them back in cost as much time as the arithmetic (measured:
/// 35 s of system time against 20 s of user time for one pair).
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator thresholds; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Refuses to overwrite an adapter or discard an unfinished run unless told to.
fn check_outputs(options: &DpoOptions, checkpoint: &Path) -> Result<(), TrainError> {
    let resuming = options.resume && checkpoint.exists();
    if options.out.exists() && !options.force && !resuming {
        return Err(TrainError::Options(format!(
            "{} exists; pass --force to replace it",
            options.out.display()
        )));
    }
    if options.resume && !checkpoint.exists() {
        return Err(TrainError::Options(format!(
            "--resume: no checkpoint at {}",
            checkpoint.display()
        )));
    }
    if checkpoint.exists() && !options.resume {
        if !options.force {
            return Err(TrainError::Options(format!(
                "an unfinished run's checkpoint is at {}: pass --resume to continue it or --force \
                 to start over",
                checkpoint.display()
            )));
        }
        std::fs::remove_file(checkpoint).map_err(|e| TrainError::io(checkpoint, e))?;
    }
    Ok(())
}

/// Mean loss, reward accuracy and margin over the steps of the last epoch trained.
fn last_epoch(curve: &[StepRecord]) -> serde_json::Value {
    let epoch = curve.last().map_or(0, |r| r.epoch);
    let steps: Vec<&StepRecord> = curve.iter().filter(|r| r.epoch == epoch).collect();
    let n = steps.len().max(1) as f64;
    let mean = |f: fn(&StepRecord) -> f64| steps.iter().map(|r| f(r)).sum::<f64>() / n;
    json!({
        "epoch": epoch,
        "loss": mean(|r| r.loss),
        "reward_accuracy": mean(|r| r.reward_accuracy),
        "margin": mean(|r| r.margin),
    })
}

/// Trains an adapter as `options` say; `stop` ends the run after saving what is finished.
///
/// The stages: read the pairs and the model, start (reference log-probabilities) or resume
/// (a checkpoint), take the optimizer steps, measure the held-out pairs, write the adapter
/// and its report.
pub fn train_dpo(
    options: &DpoOptions,
    progress: &dyn Fn(Progress),
    stop: &AtomicBool,
) -> Result<Outcome, TrainError> {
    keep_freed_memory();
    let started = Instant::now();
    let hyper = &options.hyper;
    hyper.check()?;
    let targets = hyper.targets()?;
    let checkpoint = checkpoint_path(&options.out);
    check_outputs(options, &checkpoint)?;
    let inputs = Inputs::read(options)?;

    let lora = Lora::new(
        &inputs.weights.config,
        hyper.rank,
        hyper.alpha,
        &targets,
        hyper.seed,
        DType::F32,
    )?;
    let mut adam = Adam::new(&lora)?;
    let Start {
        reference,
        mut curve,
        steps_done,
    } = if options.resume {
        inputs.resume(&checkpoint, hyper, &lora, &mut adam)?
    } else {
        let total = inputs.pairs.len();
        let Some(reference) = logprobs(&inputs.weights, &inputs.pairs, None, stop, &|done| {
            progress(Progress::Reference { done, total })
        })?
        else {
            return Err(TrainError::Options(
                "stopped while computing the reference log-probabilities; nothing to keep".into(),
            ));
        };
        Start {
            reference,
            curve: Vec::new(),
            steps_done: 0,
        }
    };
    let state_of = |curve: &[StepRecord], steps_done| CheckpointState {
        hyper: hyper.clone(),
        base_sha256: inputs.base_sha256.clone(),
        pairs_sha256: inputs.pairs_sha256(),
        steps_done,
        reference: reference.clone(),
        curve: curve.to_vec(),
    };

    let prepared: Vec<Prepared> = inputs
        .pairs
        .iter()
        .zip(&reference)
        .map(|(pair, reference)| Prepared {
            pair: pair.clone(),
            reference: *reference,
        })
        .collect();
    let steps_per_epoch = prepared.len().div_ceil(hyper.grad_accum);
    let total_steps = steps_per_epoch * hyper.epochs;
    let last = options
        .max_steps
        .map_or(total_steps, |m| m.min(total_steps));
    for step in steps_done..last {
        let epoch = step / steps_per_epoch;
        let order = epoch_order(prepared.len(), hyper.seed, epoch);
        let within = step % steps_per_epoch;
        let batch: Vec<&Prepared> = order
            [within * hyper.grad_accum..((within + 1) * hyper.grad_accum).min(order.len())]
            .iter()
            .map(|&i| &prepared[i])
            .collect();
        let lr = hyper.lr * (1.0 - step as f64 / total_steps as f64);
        let taken = train_step(
            &inputs.weights,
            &lora,
            &mut adam,
            &batch,
            hyper,
            (step, lr),
            stop,
        )?;
        let Some(Taken {
            stats,
            grad_norm,
            tokens_per_s,
        }) = taken
        else {
            adapter::save_checkpoint(&checkpoint, &lora, &adam, &state_of(&curve, step))?;
            return Ok(Outcome::Stopped { step, checkpoint });
        };
        let record = StepRecord {
            step: step + 1,
            total_steps,
            epoch: epoch + 1,
            loss: stats.loss,
            reward_accuracy: stats.reward_accuracy,
            margin: stats.margin,
            chosen_reward: stats.chosen_reward,
            rejected_reward: stats.rejected_reward,
            lr,
            grad_norm,
            tokens_per_s,
        };
        curve.push(record.clone());
        progress(Progress::Step(record));
        if (step + 1) % options.checkpoint_every.max(1) == 0 || step + 1 == last {
            adapter::save_checkpoint(&checkpoint, &lora, &adam, &state_of(&curve, step + 1))?;
        }
    }

    let ControlFlow::Continue(eval) = inputs.held_out(&lora, hyper.beta, stop)? else {
        return Ok(Outcome::Stopped {
            step: last,
            checkpoint,
        });
    };
    let finished = Finished {
        curve: &curve,
        steps: last,
        total_steps,
        eval,
        started,
    };
    finished.write(options, &inputs, &lora, &prepared[0].pair, &checkpoint)
}

/// Where a run takes up its steps: the pairs' reference log-probabilities, and the steps
/// taken so far (none on a fresh start).
struct Start {
    reference: Vec<(f64, f64)>,
    curve: Vec<StepRecord>,
    steps_done: usize,
}

/// What a run trains on: the pairs files read and tokenized with the base model's vocabulary,
/// and the base model's weights.
struct Inputs {
    train_files: PairFiles,
    eval_files: Option<PairFiles>,
    weights: Weights,
    base: model::BaseInfo,
    base_sha256: String,
    pairs: Vec<PairTokens>,
    eval_pairs: Option<Vec<PairTokens>>,
    data_report: DataReport,
}

impl Inputs {
    fn read(options: &DpoOptions) -> Result<Self, TrainError> {
        let hyper = &options.hyper;
        let train_files = data::read_pairs(&options.pairs)?;
        let eval_files = options
            .eval
            .as_ref()
            .map(|e| data::read_pairs(std::slice::from_ref(e)))
            .transpose()?;
        // The weights first: they say whether this is a model training supports.
        let (weights, base) = Weights::from_gguf(&options.model, DType::F32)?;
        let served = llama::load_model(&options.model, None, &[])
            .map_err(|e| TrainError::Model(e.to_string()))?;
        let tokenizer = Tokenizer::new(&served)?;
        let (pairs, data_report) =
            prepare(&tokenizer, &train_files, &served.sha256, hyper.max_tokens)?;
        if pairs.is_empty() {
            return Err(TrainError::Options(format!(
                "no pairs to train on in {} ({} KTO rows, {} pairs longer than --max-tokens)",
                display_paths(&options.pairs),
                data_report.kto_rows_skipped,
                data_report.too_long
            )));
        }
        let eval_pairs = match &eval_files {
            Some(files) => Some(prepare(&tokenizer, files, &served.sha256, hyper.max_tokens)?.0),
            None => None,
        };
        Ok(Inputs {
            train_files,
            eval_files,
            weights,
            base,
            base_sha256: served.sha256.clone(),
            pairs,
            eval_pairs,
            data_report,
        })
    }

    fn pairs_sha256(&self) -> Vec<String> {
        self.train_files
            .files
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Loads the checkpoint into `lora` and `adam`, after checking that it was made with the
    /// same hyper-parameters, base model and pairs files.
    fn resume(
        &self,
        checkpoint: &Path,
        hyper: &Hyper,
        lora: &Lora,
        adam: &mut Adam,
    ) -> Result<Start, TrainError> {
        let state = adapter::load_checkpoint(checkpoint, lora, adam)?;
        let mismatch = |what: &str| TrainError::Checkpoint {
            path: checkpoint.display().to_string(),
            reason: format!("made with other {what}: resume with the same or use --force"),
        };
        if state.hyper != *hyper {
            return Err(mismatch("hyper-parameters"));
        }
        if state.base_sha256 != self.base_sha256 {
            return Err(mismatch("base model"));
        }
        if state.pairs_sha256 != self.pairs_sha256() || state.reference.len() != self.pairs.len() {
            return Err(mismatch("pairs files"));
        }
        tracing::info!(steps = state.steps_done, "resuming");
        Ok(Start {
            reference: state.reference,
            curve: state.curve,
            steps_done: state.steps_done,
        })
    }

    /// The DPO numbers of the trained adapter on the held-out pairs (`None` without any);
    /// `Break` when stopped.
    fn held_out(
        &self,
        lora: &Lora,
        beta: f64,
        stop: &AtomicBool,
    ) -> Result<ControlFlow<(), Option<Summary>>, TrainError> {
        let Some(pairs) = self.eval_pairs.as_ref().filter(|p| !p.is_empty()) else {
            return Ok(ControlFlow::Continue(None));
        };
        let Some(reference) = logprobs(&self.weights, pairs, None, stop, &|_| {})? else {
            return Ok(ControlFlow::Break(()));
        };
        let Some(policy) = logprobs(&self.weights, pairs, Some(lora), stop, &|_| {})? else {
            return Ok(ControlFlow::Break(()));
        };
        let stats: Vec<PairStats> = policy
            .iter()
            .zip(&reference)
            .map(|(p, r)| PairStats::new(beta, *p, *r))
            .collect();
        Ok(ControlFlow::Continue(Some(summarise(&stats))))
    }
}

/// What one optimizer step measured.
struct Taken {
    /// The batch's DPO numbers.
    stats: Summary,
    /// The gradient's norm before clipping.
    grad_norm: f64,
    tokens_per_s: f64,
}

/// One optimizer step over `batch` (`step`: its index from 0 and its learning rate): the
/// pairs' gradients summed, clipped to the maximum norm, and Adam's update; `None` when stopped
/// before the update.
fn train_step(
    weights: &Weights,
    lora: &Lora,
    adam: &mut Adam,
    batch: &[&Prepared],
    hyper: &Hyper,
    (step, lr): (usize, f64),
    stop: &AtomicBool,
) -> Result<Option<Taken>, TrainError> {
    let started = Instant::now();
    let mut grads: Vec<Tensor> = lora
        .named()
        .iter()
        .map(|(_, v)| v.as_tensor().zeros_like())
        .collect::<Result<_, _>>()?;
    let mut stats = Vec::with_capacity(batch.len());
    let mut tokens = 0;
    for p in batch {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let (s, g) = pair_gradients(weights, lora, p, hyper.beta, batch.len())?;
        for (acc, d) in grads.iter_mut().zip(&g) {
            *acc = (&*acc + d)?;
        }
        stats.push(s);
        tokens += p.pair.sequence_tokens();
    }
    let norm = grads
        .iter()
        .map(|g| {
            g.sqr()
                .and_then(|s| s.sum_all())
                .and_then(|s| s.to_dtype(DType::F64))
                .and_then(|s| s.to_scalar::<f64>())
        })
        .sum::<Result<f64, _>>()?
        .sqrt();
    if norm > hyper.max_grad_norm {
        let scale = hyper.max_grad_norm / (norm + 1e-6);
        grads = grads.iter().map(|g| g * scale).collect::<Result<_, _>>()?;
    }
    adam.step(lora, &grads, step + 1, lr)?;
    let tokens_per_s = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
    Ok(Some(Taken {
        stats: summarise(&stats),
        grad_norm: norm,
        tokens_per_s,
    }))
}

/// A run whose steps are taken: what goes into its adapter's metadata and its report.
struct Finished<'a> {
    curve: &'a [StepRecord],
    steps: usize,
    total_steps: usize,
    eval: Option<Summary>,
    started: Instant,
}

impl Finished<'_> {
    /// Writes the adapter (with its provenance and metrics), checks it against llama.cpp on
    /// `check_pair`, writes the report beside it and, when every step is taken, removes the
    /// checkpoint.
    fn write(
        &self,
        options: &DpoOptions,
        inputs: &Inputs,
        lora: &Lora,
        check_pair: &PairTokens,
        checkpoint: &Path,
    ) -> Result<Outcome, TrainError> {
        let files = |files: &PairFiles| {
            files
                .files
                .iter()
                .map(|(p, s)| json!({"path": p.display().to_string(), "sha256": s}))
                .collect::<Vec<_>>()
        };
        let train = last_epoch(self.curve);
        let provenance = json!({
            "base_model": {"path": options.model.display().to_string(), "sha256": inputs.base_sha256},
            "pairs_files": files(&inputs.train_files),
            "eval_files": inputs.eval_files.as_ref().map(files).unwrap_or_default(),
            "hyperparameters": options.hyper,
            "steps": self.steps,
            "total_steps": self.total_steps,
            "finished": self.steps == self.total_steps,
        });
        let metrics = json!({"train": train, "eval": self.eval});
        adapter::write_adapter(
            &options.out,
            &inputs.base,
            lora,
            &inputs.base_sha256,
            &provenance,
            &metrics,
        )?;
        let check = llama_cpp_check(
            &options.model,
            &options.out,
            &inputs.weights,
            lora,
            &check_pair.chosen_sequence(),
        )?;
        let report = json!({
            "adapter": options.out.display().to_string(),
            "provenance": provenance,
            "data": inputs.data_report,
            "eval_pairs": inputs.eval_pairs.as_ref().map(Vec::len),
            "curve": self.curve,
            "train": train,
            "eval": self.eval,
            "llama_cpp_check": check,
            "seconds": self.started.elapsed().as_secs_f64(),
        });
        let report_file = report_path(&options.out);
        adapter::write_atomic(
            &report_file,
            serde_json::to_string_pretty(&report)
                .expect("JSON")
                .as_bytes(),
        )?;
        if self.steps == self.total_steps {
            std::fs::remove_file(checkpoint).map_err(|e| TrainError::io(checkpoint, e))?;
        }
        Ok(Outcome::Finished {
            adapter: options.out.clone(),
            report_path: report_file,
            report: Box::new(report),
        })
    }
}

/// One pair's DPO numbers and its gradients (of the batch-mean loss over `batch` pairs), one per
/// tensor of `lora.named()`: the loss's gradient is w·(∇log π(chosen) − ∇log π(rejected)) with
/// w = −β·σ(−margin)/batch, taken in one backward pass over the packed pair.
fn pair_gradients(
    weights: &Weights,
    lora: &Lora,
    p: &Prepared,
    beta: f64,
    batch: usize,
) -> Result<(PairStats, Vec<Tensor>), TrainError> {
    let (chosen, rejected) = weights.pair_logprobs(&p.pair, Some(lora))?;
    let s = PairStats::new(beta, (scalar(&chosen)?, scalar(&rejected)?), p.reference);
    let weight = -beta * sigmoid(-s.margin()) / batch as f64;
    let grads = ((chosen - rejected)? * weight)?.backward()?;
    let grads = lora
        .named()
        .iter()
        .map(|(_, v)| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => v.as_tensor().zeros_like(),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((s, grads))
}

fn scalar(t: &Tensor) -> Result<f64, TrainError> {
    Ok(t.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Agreement of the written adapter, as llama.cpp loads and applies it, with the training
/// forward pass on one sequence: the check that what was trained is what will be served.
fn llama_cpp_check(
    model: &Path,
    adapter: &Path,
    weights: &Weights,
    lora: &Lora,
    sequence: &Sequence,
) -> Result<serde_json::Value, TrainError> {
    let served = llama::load_model(model, None, &[adapter.to_path_buf()])
        .map_err(|e| TrainError::Model(format!("llama.cpp cannot load the adapter: {e}")))?;
    let theirs = llama::all_logits(&served, Some(adapter), &sequence.tokens)
        .map_err(|e| TrainError::Model(e.to_string()))?;
    let ours = weights.logits(&weights.hidden(&sequence.tokens, Some(lora))?)?;
    let comparison = compare_logits(&ours.to_vec2::<f32>()?, &theirs);
    if comparison.same_next_token < 0.9 {
        return Err(TrainError::Model(format!(
            "llama.cpp applies the written adapter differently from training: the next token \
             agrees at {:.0}% of positions",
            comparison.same_next_token * 100.0
        )));
    }
    Ok(serde_json::to_value(comparison).expect("JSON"))
}

/// How close two sets of next-token logits are, position by position.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LogitComparison {
    pub positions: usize,
    /// Share of positions where both pick the same most likely token.
    pub same_next_token: f64,
    pub max_abs_diff: f64,
    pub mean_abs_diff: f64,
}

pub fn compare_logits(ours: &[Vec<f32>], theirs: &[Vec<f32>]) -> LogitComparison {
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    let positions = ours.len().min(theirs.len());
    let (mut same, mut max, mut sum, mut count) = (0usize, 0f64, 0f64, 0usize);
    for (a, b) in ours.iter().zip(theirs) {
        same += usize::from(argmax(a) == argmax(b));
        for (x, y) in a.iter().zip(b) {
            let d = f64::from((x - y).abs());
            max = max.max(d);
            sum += d;
            count += 1;
        }
    }
    LogitComparison {
        positions,
        same_next_token: same as f64 / positions.max(1) as f64,
        max_abs_diff: max,
        mean_abs_diff: sum / count.max(1) as f64,
    }
}

/// `collabllm bench train`: one DPO pair's forward and backward passes against the forward-only
/// pass that computes reference log-probabilities, on random tokens of the model's vocabulary:
/// each side `tokens` long, the first half of it the prompt both sides share.
pub fn bench(
    model: &Path,
    tokens: usize,
    pairs: usize,
    epoch_pairs: usize,
) -> Result<TrainBench, TrainError> {
    if tokens < 4 {
        return Err(TrainError::Options("--tokens must be at least 4".into()));
    }
    keep_freed_memory();
    let (weights, _) = Weights::from_gguf(model, DType::F32)?;
    let lora = Lora::new(&weights.config, 8, 16.0, &Target::ALL, 0, DType::F32)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut random = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| rand::Rng::random_range(&mut rng, 0..weights.config.vocab as u32))
            .collect()
    };
    let samples: Vec<Prepared> = (0..pairs)
        .map(|_| Prepared {
            pair: PairTokens {
                prompt: random(tokens / 2),
                chosen: random(tokens - tokens / 2),
                rejected: random(tokens - tokens / 2),
            },
            reference: (0.0, 0.0),
        })
        .collect();
    let started = Instant::now();
    for p in &samples {
        weights.pair_logprobs(&p.pair, None)?;
    }
    let forward = started.elapsed().as_secs_f64() / pairs as f64;
    // The same pairs as two sequences each, as computed without sharing the prompt.
    let started = Instant::now();
    for p in &samples {
        for reply in [&p.pair.chosen, &p.pair.rejected] {
            let tokens: Vec<u32> = p.pair.prompt.iter().chain(reply).copied().collect();
            weights.sequence_logprob(&tokens, p.pair.prompt.len(), None)?;
        }
    }
    let unshared = started.elapsed().as_secs_f64() / pairs as f64;
    let started = Instant::now();
    for p in &samples {
        pair_gradients(&weights, &lora, p, 0.1, 1)?;
    }
    let train = started.elapsed().as_secs_f64() / pairs as f64;
    // The anchor: llama.cpp computing as many tokens (the packed pair as one sequence; quantized
    // weights, every position's logits) in this process.
    let served =
        llama::load_model(model, None, &[]).map_err(|e| TrainError::Model(e.to_string()))?;
    let started = Instant::now();
    for p in &samples {
        llama::all_logits(&served, None, &p.pair.packed())
            .map_err(|e| TrainError::Model(e.to_string()))?;
    }
    let llama_cpp = started.elapsed().as_secs_f64() / pairs as f64;
    Ok(TrainBench {
        llama_cpp_seconds_per_pair: llama_cpp,
        tokens,
        pairs,
        forward_seconds_per_pair: forward,
        unshared_forward_seconds_per_pair: unshared,
        train_seconds_per_pair: train,
        peak_rss_mib: crate::metrics::peak_rss_mib(),
        epoch_pairs,
    })
}

/// What `bench train` measured; per pair means both sides (2 × tokens, half of each the shared
/// prompt).
#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    pub tokens: usize,
    pub pairs: usize,
    pub forward_seconds_per_pair: f64,
    /// The forward pass over the pair as two sequences, the prompt computed for each.
    pub unshared_forward_seconds_per_pair: f64,
    pub train_seconds_per_pair: f64,
    /// llama.cpp's forward pass over as many tokens (the packed pair as one sequence).
    pub llama_cpp_seconds_per_pair: f64,
    pub peak_rss_mib: Option<f64>,
    pub epoch_pairs: usize,
}

impl std::fmt::Display for TrainBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tokens = 2.0 * self.tokens as f64;
        let packed = self.tokens / 2 + 2 * (self.tokens - self.tokens / 2);
        // An epoch: the reference pass once, then a forward and backward pass per pair.
        let epoch_minutes = self.epoch_pairs as f64
            * (self.forward_seconds_per_pair + self.train_seconds_per_pair)
            / 60.0;
        writeln!(
            f,
            "DPO training, pairs of 2 × {} tokens ({} of them the shared prompt, {} computed), \
             {} measured",
            self.tokens,
            self.tokens / 2,
            packed,
            self.pairs
        )?;
        writeln!(
            f,
            "  train step:   {:.2} s/pair, {:.0} training tokens/s",
            self.train_seconds_per_pair,
            tokens / self.train_seconds_per_pair
        )?;
        writeln!(
            f,
            "  forward only: {:.2} s/pair, {:.0} tokens/s",
            self.forward_seconds_per_pair,
            tokens / self.forward_seconds_per_pair
        )?;
        writeln!(
            f,
            "  ratio train/forward: {:.2}× (≈ 2× is the floor: frozen weights take no gradient of their own)",
            self.train_seconds_per_pair / self.forward_seconds_per_pair
        )?;
        writeln!(
            f,
            "  forward as two sequences (the prompt computed twice): {:.2} s/pair; \
             sharing the prompt: {:.2}× faster",
            self.unshared_forward_seconds_per_pair,
            self.unshared_forward_seconds_per_pair / self.forward_seconds_per_pair
        )?;
        writeln!(
            f,
            "  llama.cpp forward over the {} tokens (quantized, the anchor): {:.2} s/pair; \
             training forward / llama.cpp: {:.2}×",
            packed,
            self.llama_cpp_seconds_per_pair,
            self.forward_seconds_per_pair / self.llama_cpp_seconds_per_pair
        )?;
        if let Some(rss) = self.peak_rss_mib {
            writeln!(f, "  peak RSS: {rss:.0} MiB (target ≤ 4096)")?;
        }
        write!(
            f,
            "  one epoch of {} pairs (reference pass included): {:.1} min (target ≤ 30)",
            self.epoch_pairs, epoch_minutes
        )
    }
}
