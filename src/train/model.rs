//! The llama forward pass that training differentiates, with LoRA on its linear layers.
//!
//! Built only from candle ops that have a backward pass (matmul, index_select, narrow, …) and
//! custom ops that carry their own: candle's fused softmax, rms_norm, rope and quantized matmul
//! have none and would stop the gradient without an error. The weights are the served GGUF's,
//! dequantized, with q/k rows in llama.cpp's rope layout (pairs of adjacent values rotate
//! together), so an adapter fitted here is the one llama.cpp applies, with no permutation.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor, Var, D};
use rand::{Rng, SeedableRng};

use super::attention::{Attention, Visibility};
use super::data::PairTokens;
use super::matmul::{frozen_linear, lora_linear};
use super::TrainError;

/// A linear layer LoRA can adapt, named as llama.cpp names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The name on the command line (`q,k,v,o,gate,up,down`).
    pub fn short(self) -> &'static str {
        match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::O => "o",
            Target::Gate => "gate",
            Target::Up => "up",
            Target::Down => "down",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.short() == s)
    }

    /// The tensor's name in a llama GGUF, after `blk.N.`.
    pub fn gguf(self) -> &'static str {
        match self {
            Target::Q => "attn_q",
            Target::K => "attn_k",
            Target::V => "attn_v",
            Target::O => "attn_output",
            Target::Gate => "ffn_gate",
            Target::Up => "ffn_up",
            Target::Down => "ffn_down",
        }
    }
}

/// The shape of a llama model.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub layers: usize,
    pub embedding: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub feed_forward: usize,
    pub vocab: usize,
    pub rms_eps: f64,
    pub rope_base: f64,
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.embedding / self.heads
    }

    /// (inputs, outputs) of a target's weight.
    pub fn dims(&self, target: Target) -> (usize, usize) {
        let kv = self.kv_heads * self.head_dim();
        match target {
            Target::Q | Target::O => (self.embedding, self.embedding),
            Target::K | Target::V => (self.embedding, kv),
            Target::Gate | Target::Up => (self.embedding, self.feed_forward),
            Target::Down => (self.feed_forward, self.embedding),
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// Weights as (outputs, inputs), in `Target::ALL` order.
    linear: [Tensor; 7],
}

/// A llama model's weights, read-only: training never changes them.
pub struct Weights {
    pub config: Config,
    embed: Tensor,
    norm: Tensor,
    /// The output projection; `None` when it is tied to the embedding.
    output: Option<Tensor>,
    layers: Vec<Layer>,
    /// Per-frequency divisors of the rope angles (`rope_freqs.weight`), when the model has them.
    rope_factors: Option<Vec<f64>>,
}

/// What a base GGUF says about itself, kept for the adapter's metadata.
pub struct BaseInfo {
    pub architecture: String,
    pub name: Option<String>,
}

fn meta_u32(content: &gguf_file::Content, key: &str) -> Result<usize, TrainError> {
    content
        .metadata
        .get(key)
        .and_then(|v| {
            v.to_u32()
                .ok()
                .or_else(|| v.to_u64().ok().map(|n| n as u32))
        })
        .map(|n| n as usize)
        .ok_or_else(|| TrainError::Model(format!("the GGUF has no integer `{key}`")))
}

fn meta_f64(content: &gguf_file::Content, key: &str) -> Option<f64> {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
}

impl Weights {
    /// Reads and dequantizes a llama GGUF's weights into `dtype` tensors.
    pub fn from_gguf(path: &Path, dtype: DType) -> Result<(Self, BaseInfo), TrainError> {
        let in_file =
            |e: &dyn std::fmt::Display| TrainError::Model(format!("{}: {e}", path.display()));
        let mut file = File::open(path).map_err(|e| in_file(&e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| in_file(&e))?;
        let architecture = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if architecture != "llama" {
            return Err(TrainError::Model(format!(
                "{}: training supports llama models; this one's architecture is `{architecture}`",
                path.display()
            )));
        }
        if let Some(kind) = content
            .metadata
            .get("llama.rope.scaling.type")
            .and_then(|v| v.to_string().ok())
        {
            if kind != "none" {
                return Err(TrainError::Model(format!(
                    "{}: rope scaling `{kind}` is not supported in training",
                    path.display()
                )));
            }
        }
        let config = Config {
            layers: meta_u32(&content, "llama.block_count")?,
            embedding: meta_u32(&content, "llama.embedding_length")?,
            heads: meta_u32(&content, "llama.attention.head_count")?,
            kv_heads: meta_u32(&content, "llama.attention.head_count_kv")
                .or_else(|_| meta_u32(&content, "llama.attention.head_count"))?,
            feed_forward: meta_u32(&content, "llama.feed_forward_length")?,
            vocab: 0,
            rms_eps: meta_f64(&content, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_base: meta_f64(&content, "llama.rope.freq_base").unwrap_or(10_000.0),
        };
        if let Some(rope_dims) = content.metadata.get("llama.rope.dimension_count") {
            if rope_dims.to_u32().ok().map(|n| n as usize) != Some(config.head_dim()) {
                return Err(TrainError::Model(format!(
                    "{}: partial rope (dimension_count ≠ head size) is not supported",
                    path.display()
                )));
            }
        }
        let mut read = |name: &str| -> Result<Tensor, TrainError> {
            let q = content.tensor(&mut file, name, &Device::Cpu).map_err(|e| {
                TrainError::Model(format!("{}: tensor {name}: {e}", path.display()))
            })?;
            q.dequantize(&Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(|e| TrainError::Model(format!("{}: tensor {name}: {e}", path.display())))
        };
        let embed = read("token_embd.weight")?;
        let norm = read("output_norm.weight")?;
        let output = if content.tensor_infos.contains_key("output.weight") {
            Some(read("output.weight")?)
        } else {
            None
        };
        let rope_factors = if content.tensor_infos.contains_key("rope_freqs.weight") {
            let t = read("rope_freqs.weight")?
                .to_dtype(DType::F64)
                .map_err(model_error)?;
            Some(t.to_vec1::<f64>().map_err(model_error)?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(config.layers);
        for l in 0..config.layers {
            let linear = Target::ALL.map(|t| read(&format!("blk.{l}.{}.weight", t.gguf())));
            let [q, k, v, o, gate, up, down] = linear;
            layers.push(Layer {
                attn_norm: read(&format!("blk.{l}.attn_norm.weight"))?,
                ffn_norm: read(&format!("blk.{l}.ffn_norm.weight"))?,
                linear: [q?, k?, v?, o?, gate?, up?, down?],
            });
        }
        let vocab = embed.dims()[0];
        let weights = Weights {
            config: Config { vocab, ..config },
            embed,
            norm,
            output,
            layers,
            rope_factors,
        };
        weights.check_shapes().map_err(|e| in_file(&e))?;
        let name = content
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Ok((weights, BaseInfo { architecture, name }))
    }

    /// A model of `config`'s shape with random weights: a small one checks gradients in f64.
    pub fn random(config: Config, seed: u64, dtype: DType) -> Result<Self, TrainError> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensor = |dims: &[usize], scale: f64, offset: f64| {
            let n: usize = dims.iter().product();
            let data: Vec<f64> = (0..n)
                .map(|_| offset + scale * (rng.random::<f64>() * 2.0 - 1.0))
                .collect();
            Tensor::from_vec(data, dims, &Device::Cpu).and_then(|t| t.to_dtype(dtype))
        };
        let mut layers = Vec::new();
        for _ in 0..config.layers {
            let linear = Target::ALL.map(|t| {
                let (i, o) = config.dims(t);
                tensor(&[o, i], 1.0 / (i as f64).sqrt(), 0.0)
            });
            let [q, k, v, o, gate, up, down] = linear;
            layers.push(Layer {
                attn_norm: tensor(&[config.embedding], 0.2, 1.0)?,
                ffn_norm: tensor(&[config.embedding], 0.2, 1.0)?,
                linear: [q?, k?, v?, o?, gate?, up?, down?],
            });
        }
        let weights = Weights {
            embed: tensor(&[config.vocab, config.embedding], 1.0, 0.0)?,
            norm: tensor(&[config.embedding], 0.2, 1.0)?,
            output: None,
            layers,
            rope_factors: None,
            config,
        };
        weights.check_shapes()?;
        Ok(weights)
    }

    fn check_shapes(&self) -> Result<(), TrainError> {
        let c = &self.config;
        if c.heads == 0
            || c.kv_heads == 0
            || c.heads % c.kv_heads != 0
            || c.embedding % c.heads != 0
        {
            return Err(TrainError::Model(format!(
                "unsupported head layout: {} heads, {} kv heads, {} wide",
                c.heads, c.kv_heads, c.embedding
            )));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            for (t, w) in Target::ALL.iter().zip(&layer.linear) {
                let (i, o) = c.dims(*t);
                if w.dims() != [o, i] {
                    return Err(TrainError::Model(format!(
                        "blk.{l}.{}.weight has shape {:?}, expected [{o}, {i}]",
                        t.gguf(),
                        w.dims()
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// Final hidden states, one row per token, with `lora` applied where it adapts.
    pub fn hidden(&self, tokens: &[u32], lora: Option<&Lora>) -> Result<Tensor, TrainError> {
        self.hidden_rows(tokens, Visibility::causal(tokens.len()), lora)
    }

    fn hidden_rows(
        &self,
        tokens: &[u32],
        visibility: Visibility,
        lora: Option<&Lora>,
    ) -> Result<Tensor, TrainError> {
        let c = &self.config;
        let t = tokens.len();
        if t == 0 {
            return Err(TrainError::Model("an empty sequence".into()));
        }
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let rope = self.rope_tables((0..t).map(|r| visibility.position(r)));
        for (l, layer) in self.layers.iter().enumerate() {
            let linear = |target: Target, input: &Tensor| -> Result<Tensor, TrainError> {
                let w = &layer.linear[target as usize];
                Ok(match lora.and_then(|lora| lora.adapter(l, target)) {
                    None => frozen_linear(input, w)?,
                    Some(adapter) => lora_linear(input, w, adapter)?,
                })
            };
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let attn = self.attention(
                &linear(Target::Q, &h)?,
                &linear(Target::K, &h)?,
                &linear(Target::V, &h)?,
                &rope,
                visibility,
            )?;
            x = (x + linear(Target::O, &attn)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gated = linear(Target::Gate, &h)?.apply_op2(&linear(Target::Up, &h)?, SwiGlu)?;
            x = (x + linear(Target::Down, &gated)?)?;
        }
        Ok(rms_norm(&x, &self.norm, c.rms_eps)?)
    }

    /// Next-token logits of the given hidden states (rows × vocab).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor, TrainError> {
        let output = self.output.as_ref().unwrap_or(&self.embed);
        Ok(frozen_linear(hidden, output)?)
    }

    /// The log-probability of each row's target token (one value per row of `hidden`).
    fn target_logprobs(&self, hidden: &Tensor, targets: Vec<u32>) -> Result<Tensor, TrainError> {
        Ok(self.logits(hidden)?.apply_op1(TargetLogProb {
            targets: Arc::new(targets),
        })?)
    }

    /// The summed log-probability of `tokens[from..]`, each given the tokens before it.
    pub fn sequence_logprob(
        &self,
        tokens: &[u32],
        from: usize,
        lora: Option<&Lora>,
    ) -> Result<Tensor, TrainError> {
        if from == 0 || from >= tokens.len() {
            return Err(TrainError::Model(format!(
                "the scored part starts at {from} of {} tokens",
                tokens.len()
            )));
        }
        let hidden = self.hidden(tokens, lora)?;
        let rows = tokens.len() - from;
        Ok(self
            .target_logprobs(&hidden.narrow(0, from - 1, rows)?, tokens[from..].to_vec())?
            .sum_all()?)
    }

    /// The summed log-probabilities of a pair's chosen and rejected replies, each given the
    /// prompt, from one pass over prompt, chosen and rejected: the prompt is computed once,
    /// and the rejected reply sees the prompt but not the chosen one, at the positions it has
    /// after the prompt. Equal to two [`Weights::sequence_logprob`] calls, for about half the
    /// work when the prompt is as long as a reply.
    pub fn pair_logprobs(
        &self,
        pair: &PairTokens,
        lora: Option<&Lora>,
    ) -> Result<(Tensor, Tensor), TrainError> {
        let (p, c, r) = (pair.prompt.len(), pair.chosen.len(), pair.rejected.len());
        if p == 0 || c == 0 || r == 0 {
            return Err(TrainError::Model(format!(
                "a pair needs a prompt and two replies, not {p}, {c} and {r} tokens"
            )));
        }
        let hidden = self.hidden_rows(
            &pair.packed(),
            Visibility {
                prompt: p,
                second: p + c,
            },
            lora,
        )?;
        // Each reply token is predicted by the row before it; the prompt's last row predicts the
        // first token of both replies.
        let rows: Vec<u32> = (p - 1..p + c - 1)
            .chain([p - 1])
            .chain(p + c..p + c + r - 1)
            .map(|i| i as u32)
            .collect();
        let targets = pair.chosen.iter().chain(&pair.rejected).copied().collect();
        let picked = hidden.index_select(&Tensor::new(rows.as_slice(), &Device::Cpu)?, 0)?;
        let logprobs = self.target_logprobs(&picked, targets)?;
        Ok((
            logprobs.narrow(0, 0, c)?.sum_all()?,
            logprobs.narrow(0, c, r)?.sum_all()?,
        ))
    }

    /// cos and sin of every (position, frequency) pair, position-major.
    fn rope_tables(&self, positions: impl Iterator<Item = usize>) -> Rope {
        let half = self.config.head_dim() / 2;
        let dims = self.config.head_dim() as f64;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in positions {
            for i in 0..half {
                let factor = self
                    .rope_factors
                    .as_ref()
                    .and_then(|f| f.get(i).copied())
                    .unwrap_or(1.0);
                let theta = self.config.rope_base.powf(-2.0 * i as f64 / dims) / factor;
                let angle = p as f64 * theta;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Rope {
            cos: Arc::new(cos),
            sin: Arc::new(sin),
            head_dim: self.config.head_dim(),
            inverse: false,
        }
    }

    /// Grouped-query attention, each row seeing what `visibility` lets it; q (t, heads·hd), k and
    /// v (t, kv_heads·hd).
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: &Rope,
        visibility: Visibility,
    ) -> Result<Tensor, TrainError> {
        let c = &self.config;
        let attention = Attention::new(c.heads, c.kv_heads, c.head_dim(), visibility);
        Ok(q.apply_op1(rope.clone())?.apply_op3(
            &k.apply_op1(rope.clone())?,
            &v.contiguous()?,
            attention,
        )?)
    }
}

/// A custom op's input: its contiguous values, in one of the two float types training computes in.
enum Floats<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

fn floats<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<Floats<'a>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} needs a contiguous input");
    };
    match storage {
        CpuStorage::F32(v) => Ok(Floats::F32(&v[start..end])),
        CpuStorage::F64(v) => Ok(Floats::F64(&v[start..end])),
        _ => candle_core::bail!("{op} computes in f32 or f64"),
    }
}

/// log softmax(row)[target] of each row of logits (rows, vocab), as one op: composing it from
/// max, exp, sum, log and gather keeps four logits-sized tensors for the backward pass (the
/// vocabulary is 49,152 wide), where this one keeps none and recomputes the softmax from its
/// input.
struct TargetLogProb {
    targets: Arc<Vec<u32>>,
}

fn log_sum_exp<T: num_traits::Float>(row: &[T]) -> T {
    let max = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
    max + row.iter().fold(T::zero(), |s, &v| s + (v - max).exp()).ln()
}

fn target_logprob_rows<T>(x: &[T], vocab: usize, targets: &[u32]) -> Vec<T>
where
    T: num_traits::Float + Send + Sync,
{
    use rayon::prelude::*;
    x.par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &target)| row[target as usize] - log_sum_exp(row))
        .collect()
}

/// d logits = g · (onehot(target) − softmax(row)), row by row.
fn target_logprob_grad<T>(x: &[T], g: &[T], vocab: usize, targets: &[u32]) -> Vec<T>
where
    T: num_traits::Float + Send + Sync,
{
    use rayon::prelude::*;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(vocab)
        .zip(x.par_chunks(vocab))
        .zip(targets.par_iter().zip(g.par_iter()))
        .for_each(|((output, row), (&target, &g))| {
            let lse = log_sum_exp(row);
            for (o, &v) in output.iter_mut().zip(row) {
                *o = -g * (v - lse).exp();
            }
            output[target as usize] = output[target as usize] + g;
        });
    out
}

impl TargetLogProb {
    fn vocab(&self, op: &str, layout: &Layout) -> candle_core::Result<usize> {
        let Ok((rows, vocab)) = layout.shape().dims2() else {
            candle_core::bail!("{op} needs (rows, vocab) logits");
        };
        if rows != self.targets.len() || self.targets.iter().any(|&t| t as usize >= vocab) {
            candle_core::bail!(
                "{op}: {} targets do not fit ({rows}, {vocab}) logits",
                self.targets.len()
            );
        }
        Ok(vocab)
    }
}

impl CustomOp1 for TargetLogProb {
    fn name(&self) -> &'static str {
        "target-logprob"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let vocab = self.vocab(self.name(), layout)?;
        let out = match floats(self.name(), storage, layout)? {
            Floats::F32(x) => CpuStorage::F32(target_logprob_rows(x, vocab, &self.targets)),
            Floats::F64(x) => CpuStorage::F64(target_logprob_rows(x, vocab, &self.targets)),
        };
        Ok((out, Shape::from(self.targets.len())))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &TargetLogProbGrad(self.targets.clone()),
        )?))
    }
}

/// The backward pass of [`TargetLogProb`] on (logits, grad).
struct TargetLogProbGrad(Arc<Vec<u32>>);

impl CustomOp2 for TargetLogProbGrad {
    fn name(&self) -> &'static str {
        "target-logprob-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Ok((_, vocab)) = x_layout.shape().dims2() else {
            candle_core::bail!("{} needs (rows, vocab) logits", self.name());
        };
        let out = match (
            floats(self.name(), x, x_layout)?,
            floats(self.name(), grad, grad_layout)?,
        ) {
            (Floats::F32(x), Floats::F32(g)) => {
                CpuStorage::F32(target_logprob_grad(x, g, vocab, &self.0))
            }
            (Floats::F64(x), Floats::F64(g)) => {
                CpuStorage::F64(target_logprob_grad(x, g, vocab, &self.0))
            }
            _ => candle_core::bail!("{} needs two inputs of one float type", self.name()),
        };
        Ok((out, x_layout.shape().clone()))
    }
}

/// silu(gate) ⊙ up, llama's feed-forward gate, as one op on every core: composed, it keeps
/// silu(gate) as well for the backward pass and runs single-threaded.
struct SwiGlu;

fn sigmoid<T: num_traits::Float>(x: T) -> T {
    (T::one() + (-x).exp()).recip()
}

fn swiglu<T: num_traits::Float + Send + Sync>(gate: &[T], up: &[T]) -> Vec<T> {
    use rayon::prelude::*;
    gate.par_iter()
        .zip(up.par_iter())
        .map(|(&g, &u)| g * sigmoid(g) * u)
        .collect()
}

/// d gate = d · up · σ(g)(1 + g(1 − σ(g))), d up = d · silu(g); both halves, gate's first.
fn swiglu_grad<T: num_traits::Float + Send + Sync>(gate: &[T], up: &[T], d: &[T]) -> Vec<T> {
    use rayon::prelude::*;
    let n = gate.len();
    let mut out = vec![T::zero(); 2 * n];
    let (d_gate, d_up) = out.split_at_mut(n);
    d_gate
        .par_iter_mut()
        .zip(d_up.par_iter_mut())
        .enumerate()
        .for_each(|(i, (dg, du))| {
            let (g, s) = (gate[i], sigmoid(gate[i]));
            *dg = d[i] * up[i] * s * (T::one() + g * (T::one() - s));
            *du = d[i] * g * s;
        });
    out
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if gate_layout.shape() != up_layout.shape() {
            candle_core::bail!("swiglu needs gate and up of one shape");
        }
        let out = match (
            floats(self.name(), gate, gate_layout)?,
            floats(self.name(), up, up_layout)?,
        ) {
            (Floats::F32(g), Floats::F32(u)) => CpuStorage::F32(swiglu(g, u)),
            (Floats::F64(g), Floats::F64(u)) => CpuStorage::F64(swiglu(g, u)),
            _ => candle_core::bail!("swiglu needs two inputs of one float type"),
        };
        Ok((out, gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let both =
            Tensor::cat(&[gate, up], 0)?.apply_op2_no_bwd(&grad.contiguous()?, &SwiGluGrad)?;
        let rows = gate.dims()[0];
        Ok((
            Some(both.narrow(0, 0, rows)?),
            Some(both.narrow(0, rows, rows)?),
        ))
    }
}

/// The backward pass of [`SwiGlu`] on (gate and up stacked, grad): their gradients, stacked.
struct SwiGluGrad;

impl CustomOp2 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        both: &CpuStorage,
        both_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (
            floats(self.name(), both, both_layout)?,
            floats(self.name(), grad, grad_layout)?,
        ) {
            (Floats::F32(b), Floats::F32(d)) if b.len() == 2 * d.len() => {
                let (g, u) = b.split_at(d.len());
                CpuStorage::F32(swiglu_grad(g, u, d))
            }
            (Floats::F64(b), Floats::F64(d)) if b.len() == 2 * d.len() => {
                let (g, u) = b.split_at(d.len());
                CpuStorage::F64(swiglu_grad(g, u, d))
            }
            _ => candle_core::bail!("swiglu-grad needs stacked gate and up and their gradient"),
        };
        Ok((out, both_layout.shape().clone()))
    }
}

fn model_error(e: candle_core::Error) -> TrainError {
    TrainError::Model(e.to_string())
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(RmsNorm {
        weight: weight.clone(),
        eps,
    })
}

/// RMS normalisation with a frozen weight, as one op: y = w ⊙ x / √(mean(x²) + ε).
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

fn rms_norm_rows<T: num_traits::Float + Send + Sync>(x: &[T], w: &[T], eps: T) -> Vec<T> {
    use rayon::prelude::*;
    let d = w.len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(output, input)| {
            let sum = input.iter().fold(T::zero(), |s, &v| s + v * v);
            let count = T::from(d).expect("a row width is a float");
            let r = (sum / count + eps).sqrt().recip();
            for ((o, &v), &g) in output.iter_mut().zip(input).zip(w) {
                *o = v * r * g;
            }
        });
    out
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match floats(self.name(), storage, layout)? {
            Floats::F32(v) => CpuStorage::F32(rms_norm_rows(
                v,
                &self.weight.to_vec1::<f32>()?,
                self.eps as f32,
            )),
            Floats::F64(v) => {
                CpuStorage::F64(rms_norm_rows(v, &self.weight.to_vec1::<f64>()?, self.eps))
            }
        };
        Ok((out, layout.shape().clone()))
    }

    /// With n = x·r, r = (mean(x²) + ε)^(−½) and dn = g ⊙ w: dx = r·(dn − n·mean(dn ⊙ n)).
    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let n = x.broadcast_mul(&r)?;
        let dn = grad.broadcast_mul(&self.weight)?;
        let dot = (&dn * &n)?.mean_keepdim(D::Minus1)?;
        Ok(Some((dn - n.broadcast_mul(&dot)?)?.broadcast_mul(&r)?))
    }
}

/// llama.cpp's "normal" rope on (t, heads·head_dim) rows, as one op: values 2i and 2i+1 of each
/// head rotate by position × the i-th frequency. Its backward pass is the inverse rotation.
#[derive(Clone)]
struct Rope {
    cos: Arc<Vec<f64>>,
    sin: Arc<Vec<f64>>,
    head_dim: usize,
    inverse: bool,
}

impl Rope {
    fn rotate<T: num_traits::Float + Send + Sync>(&self, x: &[T], width: usize) -> Vec<T> {
        use rayon::prelude::*;
        let half = self.head_dim / 2;
        let cast = |v: &[f64]| -> Vec<T> {
            v.iter()
                .map(|&c| T::from(c).expect("an angle is a float"))
                .collect()
        };
        let (cos, sin) = (cast(&self.cos), cast(&self.sin));
        let sign = if self.inverse { -T::one() } else { T::one() };
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(width)
            .zip(x.par_chunks(width))
            .enumerate()
            .for_each(|(p, (output, input))| {
                let (cos, sin) = (
                    &cos[p * half..(p + 1) * half],
                    &sin[p * half..(p + 1) * half],
                );
                for (o, v) in output
                    .chunks_mut(self.head_dim)
                    .zip(input.chunks(self.head_dim))
                {
                    for i in 0..half {
                        let (a, b) = (v[2 * i], v[2 * i + 1]);
                        let (c, s) = (cos[i], sign * sin[i]);
                        o[2 * i] = a * c - b * s;
                        o[2 * i + 1] = a * s + b * c;
                    }
                }
            });
        out
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Ok((t, width)) = layout.shape().dims2() else {
            candle_core::bail!("rope needs (t, heads·head_dim) rows");
        };
        if width % self.head_dim != 0 || self.cos.len() != t * (self.head_dim / 2) {
            candle_core::bail!("rope tables do not fit a ({t}, {width}) input");
        }
        let out = match floats(self.name(), storage, layout)? {
            Floats::F32(v) => CpuStorage::F32(self.rotate(v, width)),
            Floats::F64(v) => CpuStorage::F64(self.rotate(v, width)),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inverse = Rope {
            inverse: !self.inverse,
            ..self.clone()
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// One adapted weight: ΔW = scale · B·A, A (rank, inputs), B (outputs, rank).
pub struct Adapter {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

/// The trainable LoRA adapters, in a fixed order (layer, then target).
pub struct Lora {
    pub rank: usize,
    pub alpha: f64,
    pub adapters: BTreeMap<(usize, Target), Adapter>,
}

impl Lora {
    /// A new adapter that changes nothing yet: A uniform in ±1/√inputs (PEFT's Kaiming init), B
    /// zero.
    pub fn new(
        config: &Config,
        rank: usize,
        alpha: f64,
        targets: &[Target],
        seed: u64,
        dtype: DType,
    ) -> Result<Self, TrainError> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut adapters = BTreeMap::new();
        for l in 0..config.layers {
            for &target in targets {
                let (inputs, outputs) = config.dims(target);
                let bound = 1.0 / (inputs as f64).sqrt();
                let a: Vec<f64> = (0..rank * inputs)
                    .map(|_| bound * (rng.random::<f64>() * 2.0 - 1.0))
                    .collect();
                let a = Tensor::from_vec(a, (rank, inputs), &Device::Cpu)?.to_dtype(dtype)?;
                let b = Tensor::zeros((outputs, rank), dtype, &Device::Cpu)?;
                adapters.insert(
                    (l, target),
                    Adapter {
                        a: Var::from_tensor(&a)?,
                        b: Var::from_tensor(&b)?,
                        scale: alpha / rank as f64,
                    },
                );
            }
        }
        Ok(Lora {
            rank,
            alpha,
            adapters,
        })
    }

    fn adapter(&self, layer: usize, target: Target) -> Option<&Adapter> {
        self.adapters.get(&(layer, target))
    }

    /// Every trainable tensor with the name it has in the adapter GGUF.
    pub fn named(&self) -> Vec<(String, &Var)> {
        self.adapters
            .iter()
            .flat_map(|((l, t), a)| {
                let base = format!("blk.{l}.{}.weight", t.gguf());
                [
                    (format!("{base}.lora_a"), &a.a),
                    (format!("{base}.lora_b"), &a.b),
                ]
            })
            .collect()
    }
}
