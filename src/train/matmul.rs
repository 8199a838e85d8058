//! Matrix products on slices, and the linear layers training computes with them.
//!
//! candle's matmul takes whole tensors and computes the gradient of both sides; a linear layer
//! here has a frozen weight (and maybe a LoRA adapter), so its ops multiply views of the inputs
//! in place and pass gradients only where they are needed, with no copy of an input or output
//! and no intermediate tensor for the adapter's contribution.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, WithDType,
};
use num_traits::Float;

use super::model::Adapter;

/// The float types training computes in.
pub(super) trait Real: Float + Send + Sync + 'static {}

impl<T: Float + Send + Sync + 'static> Real for T {}

/// A matrix in a slice: element (i, j) at `offset + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(super) struct View<'a, T> {
    data: &'a [T],
    offset: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> View<'a, T> {
    pub fn new(
        data: &'a [T],
        offset: usize,
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    ) -> Self {
        View {
            data,
            offset,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// A whole row-major (rows, cols) matrix.
    pub fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        View::new(data, 0, rows, cols, cols, 1)
    }

    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every element lies in `data`.
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || self.offset + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// The threads a matrix product runs on.
#[derive(Clone, Copy)]
pub(super) enum Threads {
    /// The calling thread, for callers that already run on every core.
    One,
    All,
}

/// dst (lhs.rows × rhs.cols from `dst[0]`, row stride `dst_rs`) = alpha · lhs · rhs, added to
/// what dst holds when `accumulate`.
pub(super) fn gemm_into<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    lhs: View<'_, T>,
    rhs: View<'_, T>,
    alpha: T,
    accumulate: bool,
    threads: Threads,
) {
    let parallelism = match (threads, rayon::current_num_threads()) {
        (Threads::One, _) | (Threads::All, 1) => gemm::Parallelism::None,
        (Threads::All, n) => gemm::Parallelism::Rayon(n),
    };
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    assert_eq!(
        k, rhs.rows,
        "matrix product of {m}×{k} and {}×{n}",
        rhs.rows
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + n <= dst.len() && n <= dst_rs,
        "matrix product out of its destination"
    );
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs)
                .take(m)
                .for_each(|row| row[..n].fill(T::zero()));
        }
        return;
    }
    assert!(lhs.fits() && rhs.fits(), "matrix product out of its inputs");
    // SAFETY: the asserts above keep every element gemm reads inside lhs's and rhs's slices and
    // every element it writes inside dst, which this call borrows mutably; the rows of dst do not
    // overlap (n ≤ dst_rs).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr().add(lhs.offset),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr().add(rhs.offset),
            rhs.cs as isize,
            rhs.rs as isize,
            T::one(),
            alpha,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// alpha · lhs · rhs as a new row-major matrix, on every core.
fn product<T: Real>(lhs: View<'_, T>, rhs: View<'_, T>, alpha: T) -> Vec<T> {
    let mut out = vec![T::zero(); lhs.rows * rhs.cols];
    gemm_into(&mut out, rhs.cols, lhs, rhs, alpha, false, Threads::All);
    out
}

/// An op input's values in its layout's order (a contiguous layout), as `T`.
pub(super) fn values<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("training's ops need contiguous inputs");
    };
    Ok(&storage.as_slice::<T>()?[start..end])
}

/// A contiguous tensor's storage, held for reading its values in place.
pub(super) struct Borrowed<'a> {
    storage: candle_core::StorageRef<'a>,
    layout: &'a Layout,
}

impl Borrowed<'_> {
    pub fn of(t: &Tensor) -> Borrowed<'_> {
        let (storage, layout) = t.storage_and_layout();
        Borrowed { storage, layout }
    }

    pub fn values<T: WithDType>(&self) -> candle_core::Result<&[T]> {
        match &*self.storage {
            Storage::Cpu(cpu) => values(cpu, self.layout),
            _ => candle_core::bail!("training computes on the CPU"),
        }
    }
}

/// `x · Wᵀ` for a frozen W, the gradient passed to x alone.
pub(super) fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenLinear(w.clone()))
}

/// `x · Wᵀ` plus `adapter`'s contribution, the gradient passed to x and the adapter's A and B.
pub(super) fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    adapter: &Adapter,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(
        adapter.a.as_tensor(),
        adapter.b.as_tensor(),
        LoraLinear {
            w: w.clone(),
            scale: adapter.scale,
        },
    )
}

/// `x · Wᵀ` for a weight that is not trained, on x (t, in) and W (out, in). candle's matmul
/// always computes the gradient of both sides, which for a frozen weight is a wasted matmul per
/// layer and a weight-sized tensor kept until the end of the backward pass; this op passes the
/// gradient to `x` alone.
struct FrozenLinear(Tensor);

/// `x · Wᵀ + scale · (x · Aᵀ) · Bᵀ`: a frozen W (out, in) with a LoRA adapter, A (rank, in) and
/// B (out, rank), the ones trained. One op where the composition takes five (and as many
/// gradient buffers and additions in the backward pass): the adapter's product is added into
/// the output, and its gradients are computed from the rank-wide products alone.
struct LoraLinear {
    w: Tensor,
    scale: f64,
}

/// The sizes of a linear layer: t rows of `input` values to `output` values, LoRA rank `rank`.
#[derive(Clone, Copy)]
struct Sizes {
    t: usize,
    input: usize,
    output: usize,
    rank: usize,
}

fn sizes(x: &Shape, w: &Shape, adapter: Option<(&Shape, &Shape)>) -> candle_core::Result<Sizes> {
    let ((t, input), (output, w_input)) = (x.dims2()?, w.dims2()?);
    if w_input != input {
        candle_core::bail!("linear layer: x {x:?} does not fit the weight {w:?}");
    }
    let rank = match adapter {
        None => 0,
        Some((a, b)) => {
            let rank = a.dims2()?.0;
            if a.dims() != [rank, input] || b.dims() != [output, rank] {
                candle_core::bail!("LoRA A {a:?} and B {b:?} do not fit the weight {w:?}");
            }
            rank
        }
    };
    Ok(Sizes {
        t,
        input,
        output,
        rank,
    })
}

/// y = x·Wᵀ, plus scale·(x·Aᵀ)·Bᵀ with an adapter.
fn linear_forward<T: Real + WithDType>(
    z: Sizes,
    x: &[T],
    w: &[T],
    adapter: Option<(&[T], &[T], f64)>,
) -> Vec<T> {
    let Sizes {
        t,
        input,
        output,
        rank,
    } = z;
    let x = View::rows(x, t, input);
    let mut y = product(x, View::rows(w, output, input).t(), T::one());
    if let Some((a, b, scale)) = adapter {
        let u = product(x, View::rows(a, rank, input).t(), T::one());
        let (u, b) = (View::rows(&u, t, rank), View::rows(b, output, rank).t());
        gemm_into(&mut y, output, u, b, float(scale), true, Threads::All);
    }
    y
}

pub(super) fn float<T: Real>(v: f64) -> T {
    T::from(v).expect("a scale is a float")
}

/// An adapter as a [`LoraLinear`] op receives it: A's and B's storage and layout, and the scale.
type AdapterInput<'a> = (&'a CpuStorage, &'a Layout, &'a CpuStorage, &'a Layout, f64);

fn linear_storage(
    z: Sizes,
    x: (&CpuStorage, &Layout),
    w: &Tensor,
    adapter: Option<AdapterInput<'_>>,
) -> candle_core::Result<CpuStorage> {
    let w = Borrowed::of(w);
    macro_rules! run {
        ($t:ty, $variant:ident) => {{
            let adapter = match adapter {
                Some((a, a_layout, b, b_layout, scale)) => Some((
                    values::<$t>(a, a_layout)?,
                    values::<$t>(b, b_layout)?,
                    scale,
                )),
                None => None,
            };
            let x = values::<$t>(x.0, x.1)?;
            CpuStorage::$variant(linear_forward(z, x, w.values::<$t>()?, adapter))
        }};
    }
    Ok(match x.0 {
        CpuStorage::F32(_) => run!(f32, F32),
        CpuStorage::F64(_) => run!(f64, F64),
        _ => candle_core::bail!("a linear layer computes in f32 or f64"),
    })
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let z = sizes(layout.shape(), self.0.shape(), None)?;
        let y = linear_storage(z, (storage, layout), &self.0, None)?;
        Ok((y, (z.t, z.output).into()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.0)?))
    }
}

impl LoraLinear {
    /// With gB = g·B: dx = g·W + scale·gB·A, dA = scale·gBᵀ·x, dB = scale·gᵀ·(x·Aᵀ).
    fn grads<T: Real + WithDType>(
        &self,
        z: Sizes,
        [x, a, b, g]: [&Tensor; 4],
    ) -> candle_core::Result<[Tensor; 3]> {
        let Sizes {
            t,
            input,
            output,
            rank,
        } = z;
        let held = [x, a, b, g, &self.w].map(Borrowed::of);
        let (x, a, b, g, w) = (
            View::rows(held[0].values::<T>()?, t, input),
            View::rows(held[1].values::<T>()?, rank, input),
            View::rows(held[2].values::<T>()?, output, rank),
            View::rows(held[3].values::<T>()?, t, output),
            View::rows(held[4].values::<T>()?, output, input),
        );
        let scale = float::<T>(self.scale);
        let gb = product(g, b, T::one());
        let gb = View::rows(&gb, t, rank);
        let mut dx = product(g, w, T::one());
        gemm_into(&mut dx, input, gb, a, scale, true, Threads::All);
        let da = product(gb.t(), x, scale);
        let u = product(x, a.t(), T::one());
        let db = product(g.t(), View::rows(&u, t, rank), scale);
        Ok([
            Tensor::from_vec(dx, (t, input), &Device::Cpu)?,
            Tensor::from_vec(da, (rank, input), &Device::Cpu)?,
            Tensor::from_vec(db, (output, rank), &Device::Cpu)?,
        ])
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let adapter = Some((a_layout.shape(), b_layout.shape()));
        let z = sizes(x_layout.shape(), self.w.shape(), adapter)?;
        let adapter = Some((a, a_layout, b, b_layout, self.scale));
        let y = linear_storage(z, (x, x_layout), &self.w, adapter)?;
        Ok((y, (z.t, z.output).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let z = sizes(x.shape(), self.w.shape(), Some((a.shape(), b.shape())))?;
        let (x, a, b, g) = (
            x.contiguous()?,
            a.contiguous()?,
            b.contiguous()?,
            grad.contiguous()?,
        );
        let held = [&x, &a, &b, &g];
        let [dx, da, db] = match x.dtype() {
            DType::F32 => self.grads::<f32>(z, held)?,
            DType::F64 => self.grads::<f64>(z, held)?,
            dtype => candle_core::bail!("a linear layer computes in f32 or f64, not {dtype:?}"),
        };
        Ok((Some(dx), Some(da), Some(db)))
    }
}
