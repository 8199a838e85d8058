//! Masked grouped-query attention as one differentiable op that computes only what a row sees.
//!
//! A packed pair (prompt, chosen reply, rejected reply) has three parts; the rejected rows do not
//! see the chosen reply, and no row sees the rows after it, so under half of the t × t scores
//! exist. The op works in blocks of rows (and, in its backward pass, of columns) that lie in one
//! part, and multiplies only the visible column ranges of each block: the score, probability and
//! gradient matrix products skip the masked blocks, and no transposed copy of q, k, v or the
//! output is made. The probabilities are kept for the backward pass; the raw scores are not.

use std::ops::Range;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::matmul::{float, gemm_into, values, Borrowed, Real, Threads, View};

/// Which earlier rows a row attends to. A plain sequence is causal (`prompt` = `second` = its
/// length). A packed pair (prompt, chosen reply, rejected reply) computes the prompt once: rows
/// from `second` on are the rejected reply, which sees the first `prompt` rows and itself but not
/// the chosen reply, and takes up the positions after the prompt again.
#[derive(Debug, Clone, Copy)]
pub(super) struct Visibility {
    pub prompt: usize,
    pub second: usize,
}

impl Visibility {
    pub fn causal(t: usize) -> Self {
        Visibility {
            prompt: t,
            second: t,
        }
    }

    /// The columns row `r` sees: `[0, a)` and `[b, r]`.
    fn columns(self, r: usize) -> (usize, usize) {
        if r < self.second {
            (0, 0)
        } else {
            (self.prompt, self.second)
        }
    }

    pub fn position(self, r: usize) -> usize {
        if r < self.second {
            r
        } else {
            self.prompt + r - self.second
        }
    }

    /// `[0, t)` cut at the prompt's end, at the second reply's start and every `size` rows: every
    /// row of a block sees the same column ranges, and every column of it is seen by the same rows.
    fn blocks(self, t: usize, size: usize) -> Vec<Range<usize>> {
        let mut blocks = Vec::new();
        let mut start = 0;
        for end in [self.prompt.min(t), self.second.min(t), t] {
            while start < end {
                let stop = (start + size).min(end);
                blocks.push(start..stop);
                start = stop;
            }
        }
        blocks
    }

    /// The column ranges the rows of a block see, up to its last row.
    fn seen_by(self, rows: &Range<usize>) -> Vec<Range<usize>> {
        let (a, b) = self.columns(rows.start);
        [0..a, b..rows.end]
            .into_iter()
            .filter(|range| !range.is_empty())
            .collect()
    }

    /// The rows that see some column of a block: from its first column on, except that the
    /// chosen reply is not seen by the rejected one.
    fn seeing(self, columns: &Range<usize>, t: usize) -> Range<usize> {
        let chosen = self.prompt <= columns.start && columns.start < self.second;
        columns.start..if chosen { self.second } else { t }
    }
}

/// softmax(q·kᵀ·scale)·v with each row seeing what `visibility` lets it, on q (t, heads·hd) and
/// k, v (t, kv_heads·hd), q and k already roped; query heads of one kv head sit together (llama.cpp:
/// kv head = head / group).
pub(super) struct Attention {
    heads: usize,
    kv_heads: usize,
    scale: f64,
    visibility: Visibility,
    block: usize,
    /// The probabilities of the forward pass, (heads, t, t), zero where a row does not look.
    probs: OnceLock<CpuStorage>,
}

/// Rows per block: large enough for the matrix kernels, small enough that a pair's causal
/// triangle wastes little and both cores get many blocks.
const BLOCK: usize = 64;

impl Attention {
    pub fn new(heads: usize, kv_heads: usize, head_dim: usize, visibility: Visibility) -> Self {
        Attention::with_block(heads, kv_heads, head_dim, visibility, BLOCK)
    }

    fn with_block(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        visibility: Visibility,
        block: usize,
    ) -> Self {
        Attention {
            heads,
            kv_heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            visibility,
            block,
            probs: OnceLock::new(),
        }
    }

    fn sizes(&self, q: &Shape, k: &Shape, v: &Shape) -> candle_core::Result<Sizes> {
        let (t, width) = q.dims2()?;
        let (heads, kv) = (self.heads, self.kv_heads);
        if kv == 0 || heads % kv != 0 || width % heads != 0 {
            candle_core::bail!("attention: {heads} heads over {kv} kv heads in {width} columns");
        }
        let hd = width / heads;
        if k.dims() != [t, kv * hd] || v.dims() != [t, kv * hd] {
            candle_core::bail!("attention: k {k:?} and v {v:?} do not fit q {q:?}");
        }
        Ok(Sizes { t, heads, kv, hd })
    }

    fn forward<T: Real>(&self, q: &[T], k: &[T], v: &[T], z: Sizes) -> (Vec<T>, Vec<T>) {
        let Sizes { t, heads, hd, .. } = z;
        let scale = float::<T>(self.scale);
        let blocks = self.visibility.blocks(t, self.block);
        let mut probs = vec![T::zero(); heads * t * t];
        let mut out = vec![T::zero(); heads * t * hd];
        let tasks = block_tasks(&blocks, heads, (&mut probs, t), (&mut out, hd));
        tasks.into_par_iter().for_each(|(h, rows, p, o)| {
            let g = h / z.group();
            let columns = self.visibility.seen_by(&rows);
            for c in &columns {
                let scores = &mut p[c.start..];
                gemm_into(
                    scores,
                    t,
                    z.q(q, h, rows.clone()),
                    z.kv(k, g, c.clone()).t(),
                    scale,
                    false,
                    Threads::One,
                );
            }
            for (i, r) in rows.clone().enumerate() {
                let (a, b) = self.visibility.columns(r);
                softmax_visible(&mut p[i * t..i * t + rows.end], a, b, r);
            }
            for (n, c) in columns.iter().enumerate() {
                let p = View::new(p, c.start, rows.len(), c.len(), t, 1);
                gemm_into(
                    o,
                    hd,
                    p,
                    z.kv(v, g, c.clone()),
                    T::one(),
                    n > 0,
                    Threads::One,
                );
            }
        });
        (merge_heads(&out, z, heads), probs)
    }

    /// With P the probabilities and dS = P ⊙ (dP − Σ dP ⊙ P) per row: dP = dO·vᵀ, dq = scale·dS·k,
    /// dk = scale·dSᵀ·q, dv = Pᵀ·dO, each over the blocks that are seen.
    fn backward<T: Real>(&self, inputs: [&[T]; 3], p: &[T], d: &[T], z: Sizes) -> Grads<T> {
        let [q, k, v] = inputs;
        let Sizes { t, heads, hd, .. } = z;
        let scale = float::<T>(self.scale);
        let blocks = self.visibility.blocks(t, self.block);
        let mut ds = vec![T::zero(); heads * t * t];
        let mut dq = vec![T::zero(); heads * t * hd];
        let by_rows = block_tasks(&blocks, heads, (&mut ds, t), (&mut dq, hd));
        by_rows.into_par_iter().for_each(|(h, rows, s, dq)| {
            let g = h / z.group();
            let columns = self.visibility.seen_by(&rows);
            for c in &columns {
                gemm_into(
                    &mut s[c.start..],
                    t,
                    z.q(d, h, rows.clone()),
                    z.kv(v, g, c.clone()).t(),
                    T::one(),
                    false,
                    Threads::One,
                );
            }
            let p = &p[(h * t + rows.start) * t..(h * t + rows.end) * t];
            for (s, p) in s.chunks_mut(t).zip(p.chunks(t)) {
                let seen = || columns.iter().flat_map(|c| c.clone());
                let dot = seen().fold(T::zero(), |sum, j| sum + s[j] * p[j]);
                for j in seen() {
                    s[j] = p[j] * (s[j] - dot);
                }
            }
            for (n, c) in columns.iter().enumerate() {
                let s = View::new(s, c.start, rows.len(), c.len(), t, 1);
                gemm_into(dq, hd, s, z.kv(k, g, c.clone()), scale, n > 0, Threads::One);
            }
        });
        let (mut dk, mut dv) = (
            vec![T::zero(); heads * t * hd],
            vec![T::zero(); heads * t * hd],
        );
        let by_columns = block_tasks(&blocks, heads, (&mut dk, hd), (&mut dv, hd));
        by_columns.into_par_iter().for_each(|(h, c, dk, dv)| {
            let rows = self.visibility.seeing(&c, t);
            let at = (h * t + rows.start) * t + c.start;
            let s = View::new(&ds, at, rows.len(), c.len(), t, 1).t();
            gemm_into(
                dk,
                hd,
                s,
                z.q(q, h, rows.clone()),
                scale,
                false,
                Threads::One,
            );
            let p = View::new(p, at, rows.len(), c.len(), t, 1).t();
            gemm_into(
                dv,
                hd,
                p,
                z.q(d, h, rows.clone()),
                T::one(),
                false,
                Threads::One,
            );
        });
        Grads {
            q: merge_heads(&dq, z, heads),
            k: merge_heads(&dk, z, z.kv),
            v: merge_heads(&dv, z, z.kv),
        }
    }

    fn grads<T: Real + WithDType>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(probs) = self.probs.get() else {
            candle_core::bail!("attention's backward pass needs its forward pass first");
        };
        let z = self.sizes(q.shape(), k.shape(), v.shape())?;
        let (q, k, v, grad) = (
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            grad.contiguous()?,
        );
        let held = [&q, &k, &v, &grad].map(Borrowed::of);
        let inputs = [
            held[0].values::<T>()?,
            held[1].values::<T>()?,
            held[2].values::<T>()?,
        ];
        let g = self.backward(inputs, probs.as_slice::<T>()?, held[3].values::<T>()?, z);
        let tensor =
            |data: Vec<T>, like: &Tensor| Tensor::from_vec(data, like.shape(), &Device::Cpu);
        Ok((
            Some(tensor(g.q, &q)?),
            Some(tensor(g.k, &k)?),
            Some(tensor(g.v, &v)?),
        ))
    }
}

struct Grads<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
}

#[derive(Debug, Clone, Copy)]
struct Sizes {
    t: usize,
    heads: usize,
    kv: usize,
    hd: usize,
}

impl Sizes {
    fn group(self) -> usize {
        self.heads / self.kv
    }

    /// Rows `rows` of query head `h` in a (t, heads·hd) matrix.
    fn q<T>(self, data: &[T], h: usize, rows: Range<usize>) -> View<'_, T> {
        let width = self.heads * self.hd;
        View::new(
            data,
            rows.start * width + h * self.hd,
            rows.len(),
            self.hd,
            width,
            1,
        )
    }

    /// Rows `rows` of kv head `g` in a (t, kv·hd) matrix.
    fn kv<T>(self, data: &[T], g: usize, rows: Range<usize>) -> View<'_, T> {
        let width = self.kv * self.hd;
        View::new(
            data,
            rows.start * width + g * self.hd,
            rows.len(),
            self.hd,
            width,
            1,
        )
    }
}

/// `data`, laid out as (heads, t, width), cut into one mutable piece a (head, block of rows),
/// head by head.
fn pieces<'a, T>(data: &'a mut [T], width: usize, blocks: &[Range<usize>]) -> Vec<&'a mut [T]> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        for block in blocks {
            let (piece, tail) = rest.split_at_mut(block.len() * width);
            out.push(piece);
            rest = tail;
        }
    }
    out
}

/// One task a (head, block): the block's pieces of two (heads, t, width) buffers, written by that
/// task alone, so that the tasks run on every core.
type BlockTask<'a, T> = (usize, Range<usize>, &'a mut [T], &'a mut [T]);

fn block_tasks<'a, T>(
    blocks: &[Range<usize>],
    heads: usize,
    (first, first_width): (&'a mut [T], usize),
    (second, second_width): (&'a mut [T], usize),
) -> Vec<BlockTask<'a, T>> {
    let per_head = (0..heads).flat_map(|h| blocks.iter().map(move |b| (h, b.clone())));
    per_head
        .zip(pieces(first, first_width, blocks))
        .zip(pieces(second, second_width, blocks))
        .map(|(((h, b), first), second)| (h, b, first, second))
        .collect()
}

/// (heads, t, hd) per-head rows into (t, into·hd), summing the heads that share one of `into`
/// (the query heads of a kv head, for k and v gradients).
fn merge_heads<T: Real>(x: &[T], z: Sizes, into: usize) -> Vec<T> {
    let Sizes { t, heads, hd, .. } = z;
    let group = heads / into;
    let mut out = vec![T::zero(); t * into * hd];
    out.par_chunks_mut(into * hd)
        .enumerate()
        .for_each(|(r, row)| {
            for h in 0..heads {
                let (from, to) = (
                    &x[(h * t + r) * hd..][..hd],
                    &mut row[h / group * hd..][..hd],
                );
                for (o, &v) in to.iter_mut().zip(from) {
                    *o = *o + v;
                }
            }
        });
    out
}

/// Softmax over the scores row `r` sees, `[0, a)` and `[b, r]`, in a row that holds its block's
/// columns; the scores after `r` become zero.
fn softmax_visible<T: Real>(row: &mut [T], a: usize, b: usize, r: usize) {
    let seen = || (0..a).chain(b..r + 1);
    let max = seen().fold(T::neg_infinity(), |m, j| m.max(row[j]));
    let mut sum = T::zero();
    for j in seen() {
        row[j] = (row[j] - max).exp();
        sum = sum + row[j];
    }
    for j in seen() {
        row[j] = row[j] / sum;
    }
    row[r + 1..].fill(T::zero());
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let z = self.sizes(q_layout.shape(), k_layout.shape(), v_layout.shape())?;
        let (out, probs) = match q {
            CpuStorage::F32(_) => {
                let (o, p) = self.forward::<f32>(
                    values(q, q_layout)?,
                    values(k, k_layout)?,
                    values(v, v_layout)?,
                    z,
                );
                (CpuStorage::F32(o), CpuStorage::F32(p))
            }
            CpuStorage::F64(_) => {
                let (o, p) = self.forward::<f64>(
                    values(q, q_layout)?,
                    values(k, k_layout)?,
                    values(v, v_layout)?,
                    z,
                );
                (CpuStorage::F64(o), CpuStorage::F64(p))
            }
            _ => candle_core::bail!("attention computes in f32 or f64"),
        };
        if self.probs.set(probs).is_err() {
            candle_core::bail!("attention ran its forward pass twice");
        }
        Ok((out, q_layout.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match q.dtype() {
            DType::F32 => self.grads::<f32>(q, k, v, grad),
            DType::F64 => self.grads::<f64>(q, k, v, grad),
            dtype => candle_core::bail!("attention computes in f32 or f64, not {dtype:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Var, D};

    fn random(n: usize, seed: u64) -> Vec<f64> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 2001) as f64 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The same attention from candle's dense ops: every score computed, the masked ones at −∞.
    fn dense(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        kv: usize,
        vis: Visibility,
    ) -> Tensor {
        let (t, width) = q.dims2().unwrap();
        let hd = width / heads;
        let of_head: Vec<u32> = (0..heads).map(|h| (h / (heads / kv)) as u32).collect();
        let of_head = Tensor::new(of_head.as_slice(), &Device::Cpu).unwrap();
        let split = |x: &Tensor, n: usize| x.reshape((t, n, hd)).unwrap().transpose(0, 1).unwrap();
        let shared = |x: &Tensor| {
            split(x, kv)
                .contiguous()
                .unwrap()
                .index_select(&of_head, 0)
                .unwrap()
        };
        let mask: Vec<f64> = (0..t)
            .flat_map(|r| {
                let (a, b) = vis.columns(r);
                (0..t).map(move |j| {
                    if j < a || (b <= j && j <= r) {
                        0.0
                    } else {
                        f64::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
        let scores = (split(q, heads).matmul(&shared(k).t().unwrap()).unwrap()
            / (hd as f64).sqrt())
        .unwrap()
        .broadcast_add(&mask)
        .unwrap();
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(&shared(v))
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .reshape((t, width))
            .unwrap()
    }

    fn close(ours: &Tensor, theirs: &Tensor, what: &str) {
        let (a, b) = (
            ours.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            theirs.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        );
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() < 1e-12 * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// Blocks that cut the prompt and both replies, and blocks as large as a part, must give the
    /// dense computation's output and gradients, for a packed pair and for a causal sequence.
    #[test]
    fn blocked_attention_matches_dense_attention() {
        let (t, heads, kv, hd) = (21, 4, 2, 3);
        let pair = Visibility {
            prompt: 5,
            second: 13,
        };
        for vis in [pair, Visibility::causal(t)] {
            for block in [4, 64] {
                let var = |cols: usize, seed| {
                    let x = Tensor::from_vec(random(t * cols, seed), (t, cols), &Device::Cpu);
                    Var::from_tensor(&x.unwrap()).unwrap()
                };
                let (q, k, v) = (var(heads * hd, 1), var(kv * hd, 2), var(kv * hd, 3));
                let weights =
                    Tensor::from_vec(random(t * heads * hd, 4), (t, heads * hd), &Device::Cpu)
                        .unwrap();
                let op = Attention::with_block(heads, kv, hd, vis, block);
                let ours = q
                    .as_tensor()
                    .apply_op3(k.as_tensor(), v.as_tensor(), op)
                    .unwrap();
                let theirs = dense(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, kv, vis);
                let what = format!("{vis:?}, blocks of {block}");
                close(&ours, &theirs, &format!("output, {what}"));
                let loss = |out: &Tensor| (out * &weights).unwrap().sum_all().unwrap();
                let (g_ours, g_theirs) = (
                    loss(&ours).backward().unwrap(),
                    loss(&theirs).backward().unwrap(),
                );
                for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                    let grad = |g: &candle_core::backprop::GradStore| {
                        g.get(x.as_tensor()).unwrap().clone()
                    };
                    close(
                        &grad(&g_ours),
                        &grad(&g_theirs),
                        &format!("d{name}, {what}"),
                    );
                }
            }
        }
    }
}
