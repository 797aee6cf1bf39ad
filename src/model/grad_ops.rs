//! Differentiable versions of the forward pass's fast operations, for training.
//!
//! candle's fused ops (`rms_norm`, `rope`, `softmax_last_dim`) and our quantized matmul have no
//! backward: gradients would silently stop at them. These custom ops keep fast forwards and add
//! the backward a LoRA trainer needs: the gradient with respect to the activations only (the
//! base weights are frozen, so no weight gradient is ever computed), and attention that
//! recomputes its probabilities in the backward pass instead of storing `L×L` maps per layer.
//! Off the CPU (or for non-f32 activations) they fall back to composed candle ops, which are
//! slower but differentiable.

use super::attention::Heads;
use super::bf16_gemm::{self, PairedRows, RowSource};
use super::linear::{ComputeDtype, Weight};
use super::vmath::{self, wide};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor, D,
};
use rayon::prelude::*;
use std::sync::Arc;

fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expected f32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: expected a contiguous tensor")
    };
    Ok(&v[a..b])
}

/// Runs `f` on the f32 data of a contiguous CPU tensor.
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (guard, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*guard else {
        candle_core::bail!("expected a CPU tensor")
    };
    Ok(f(f32_slice(s, layout, "tensor")?))
}

fn threads() -> gemm::Parallelism {
    gemm::Parallelism::Rayon(rayon::current_num_threads())
}

/// Fewer rows than this stay on the f32 path even in bf16 mode: packing would cost more than
/// the arithmetic saves.
const BF16_MIN_ROWS: usize = 16;

/// `xs · [W₀; W₁; …]ᵀ` for frozen weights, with an input-only gradient.
struct FrozenLinear {
    ws: Vec<Weight>,
    dtype: ComputeDtype,
}

/// Runs `f` with a source of `w`'s rows as f32 (dequantized tile by tile, or borrowed).
fn with_rows<R>(w: &Weight, f: impl FnOnce(RowSource<'_>) -> R) -> Result<R> {
    match w {
        Weight::Quantized(q) => Ok(f(&|r0, _r1, out: &mut [f32]| q.dequantize_rows(r0, out))),
        Weight::Dense(t) => {
            let k = w.in_dim();
            with_data(t, |wd| {
                f(&|r0, r1, out: &mut [f32]| out.copy_from_slice(&wd[r0 * k..r1 * k]))
            })
        }
    }
}

impl FrozenLinear {
    fn total_out(&self) -> usize {
        self.ws.iter().map(Weight::out_dim).sum()
    }

    fn bf16(&self, m: usize) -> bool {
        self.dtype == ComputeDtype::Bf16 && m >= BF16_MIN_ROWS && bf16_gemm::available()
    }

    fn forward(&self, xs: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        let k = self.ws[0].in_dim();
        let total = self.total_out();
        if self.bf16(m) {
            let xs = PairedRows::new(xs, m, k, 0, k);
            let mut c0 = 0;
            for w in &self.ws {
                with_rows(w, |rows| xs.matmul_t(w.out_dim(), rows, out, total, c0))?;
                c0 += w.out_dim();
            }
            return Ok(());
        }
        let quantized: Option<Vec<&super::quant::QMatrix>> = self
            .ws
            .iter()
            .map(|w| match w {
                Weight::Quantized(q) => Some(q.as_ref()),
                Weight::Dense(_) => None,
            })
            .collect();
        if let Some(qs) = quantized {
            super::quant::matmul_group(&qs, xs, m, out);
            return Ok(());
        }
        let mut c0 = 0;
        for w in &self.ws {
            let n = w.out_dim();
            match w {
                Weight::Dense(t) => with_data(t, |wd| {
                    // SAFETY: out is [m, total] and columns c0..c0+n exist; wd is [n, k].
                    unsafe {
                        gemm::gemm(
                            m,
                            n,
                            k,
                            out.as_mut_ptr().add(c0),
                            1,
                            total as isize,
                            false,
                            xs.as_ptr(),
                            1,
                            k as isize,
                            wd.as_ptr(),
                            k as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            threads(),
                        )
                    }
                })?,
                Weight::Quantized(q) => {
                    let mut part = vec![0f32; m * n];
                    q.matmul(xs, m, &mut part);
                    for i in 0..m {
                        out[i * total + c0..i * total + c0 + n]
                            .copy_from_slice(&part[i * n..(i + 1) * n]);
                    }
                }
            }
            c0 += n;
        }
        Ok(())
    }

    /// `out[m, k] = grad[m, total] · [W₀; W₁; …]`.
    fn backward(&self, grad: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        let k = self.ws[0].in_dim();
        let total = self.total_out();
        let mut c0 = 0;
        for w in &self.ws {
            let n = w.out_dim();
            if self.bf16(m) {
                let g = PairedRows::new(grad, m, total, c0, n);
                with_rows(w, |rows| g.matmul_acc(rows, k, out))?;
                c0 += n;
                continue;
            }
            match w {
                Weight::Quantized(q) => q.backward_into(grad, total, c0, m, out),
                Weight::Dense(t) => with_data(t, |wd| {
                    // SAFETY: grad is [m, total], wd is [n, k], out is [m, k].
                    unsafe {
                        gemm::gemm(
                            m,
                            k,
                            n,
                            out.as_mut_ptr(),
                            1,
                            k as isize,
                            true,
                            grad.as_ptr().add(c0),
                            1,
                            total as isize,
                            wd.as_ptr(),
                            1,
                            k as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            threads(),
                        )
                    }
                })?,
            }
            c0 += n;
        }
        Ok(())
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "tuneshop-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = f32_slice(s, l, "frozen linear input")?;
        let mut dims = l.shape().dims().to_vec();
        let k = self.ws[0].in_dim();
        if dims.last() != Some(&k) {
            candle_core::bail!("frozen linear: input {dims:?} does not end in {k}")
        }
        let m = xs.len() / k;
        let total = self.total_out();
        let mut out = vec![0f32; m * total];
        self.forward(xs, m, &mut out)?;
        if let Some(last) = dims.last_mut() {
            *last = total;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let k = self.ws[0].in_dim();
        let m = arg.elem_count() / k;
        let mut out = vec![0f32; m * k];
        with_data(grad, |g| self.backward(g, m, &mut out))??;
        Ok(Some(Tensor::from_vec(out, arg.shape(), arg.device())?))
    }
}

/// `xs · Wᵢᵀ` for each frozen weight, differentiable with respect to `xs` only.
pub fn frozen_matmul_t(ws: &[&Weight], xs: &Tensor, dtype: ComputeDtype) -> Result<Vec<Tensor>> {
    let cpu_weights = ws.iter().all(|w| match w {
        Weight::Quantized(_) => true,
        Weight::Dense(t) => cpu_f32(t),
    });
    if !(cpu_f32(xs) && cpu_weights) {
        // Composed fallback: correct, but candle also computes (and drops) weight gradients.
        return ws
            .iter()
            .map(|w| match w {
                Weight::Dense(t) => xs.broadcast_matmul(&t.t()?),
                Weight::Quantized(_) => {
                    candle_core::bail!("quantized weights need CPU f32 activations")
                }
            })
            .collect();
    }
    let op = FrozenLinear {
        ws: ws.iter().map(|w| (*w).clone()).collect(),
        dtype,
    };
    let ys = xs.contiguous()?.apply_op1(op)?;
    if ws.len() == 1 {
        return Ok(vec![ys]);
    }
    let mut start = 0;
    ws.iter()
        .map(|w| {
            let y = ys.narrow(D::Minus1, start, w.out_dim());
            start += w.out_dim();
            y
        })
        .collect()
}

/// RMS norm over the last dimension with a frozen scale.
struct RmsNorm {
    weight: Arc<Vec<f32>>,
    eps: f32,
}

impl RmsNorm {
    fn rstd(&self, row: &[f32]) -> f32 {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        1.0 / (ms + self.eps).sqrt()
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "tuneshop-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = f32_slice(s, l, "rms norm input")?;
        let d = self.weight.len();
        let mut out = vec![0f32; xs.len()];
        for (x, o) in xs.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let r = self.rstd(x);
            for ((o, x), w) in o.iter_mut().zip(x).zip(self.weight.iter()) {
                *o = x * r * w;
            }
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = self.weight.len();
        let xs = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xs.len()];
        with_data(grad, |g| {
            for ((x, g), dx) in xs
                .chunks_exact(d)
                .zip(g.chunks_exact(d))
                .zip(dx.chunks_exact_mut(d))
            {
                let r = self.rstd(x);
                // dx = r · (w⊙g − x̂ · mean(x̂ ⊙ w⊙g)), x̂ = x·r
                let mean: f32 = x
                    .iter()
                    .zip(g)
                    .zip(self.weight.iter())
                    .map(|((x, g), w)| x * r * w * g)
                    .sum::<f32>()
                    / d as f32;
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(self.weight.iter()) {
                    *dx = r * (w * g - x * r * mean);
                }
            }
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    if cpu_f32(xs) && cpu_f32(weight) {
        let op = RmsNorm {
            weight: Arc::new(weight.to_vec1()?),
            eps,
        };
        return xs.contiguous()?.apply_op1(op);
    }
    let dtype = xs.dtype();
    let x = xs.to_dtype(DType::F32)?;
    let rstd = (x.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
        .sqrt()?
        .recip()?;
    x.broadcast_mul(&rstd)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
}

/// Non-interleaved RoPE on `[rows, heads, dim]` with per-row angles; its backward is the same
/// rotation by the opposite angle.
struct Rope {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    inverse: bool,
}

impl Rope {
    fn apply(&self, xs: &[f32], rows: usize, heads: usize, dim: usize) -> Vec<f32> {
        let half = dim / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut out = vec![0f32; xs.len()];
        for r in 0..rows {
            let (c, s) = (
                &self.cos[r * half..(r + 1) * half],
                &self.sin[r * half..(r + 1) * half],
            );
            for h in 0..heads {
                let base = (r * heads + h) * dim;
                let (x1, x2) = xs[base..base + dim].split_at(half);
                let (o1, o2) = out[base..base + dim].split_at_mut(half);
                for i in 0..half {
                    let sn = sign * s[i];
                    o1[i] = x1[i] * c[i] - x2[i] * sn;
                    o2[i] = x2[i] * c[i] + x1[i] * sn;
                }
            }
        }
        out
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "tuneshop-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = f32_slice(s, l, "rope input")?;
        let (rows, heads, dim) = l.shape().dims3()?;
        Ok((
            CpuStorage::F32(self.apply(xs, rows, heads, dim)),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, heads, dim) = arg.dims3()?;
        let back = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
        };
        let dx = with_data(grad, |g| back.apply(g, rows, heads, dim))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// RoPE of `xs` (`[rows, heads, dim]`) with `cos`/`sin` of shape `[rows, dim / 2]`.
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if cpu_f32(xs) {
        let op = Rope {
            cos: Arc::new(cos.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
            sin: Arc::new(sin.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
            inverse: false,
        };
        return xs.contiguous()?.apply_op1(op);
    }
    let half = xs.dim(D::Minus1)? / 2;
    let (x1, x2) = (
        xs.narrow(D::Minus1, 0, half)?,
        xs.narrow(D::Minus1, half, half)?,
    );
    let (c, s) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    let o1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
    let o2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
    Tensor::cat(&[o1, o2], D::Minus1)
}

/// Causal self-attention of one sequence (`q`: `[q_heads, L, dim]`, `k`/`v`: `[kv_heads, L, dim]`)
/// whose backward recomputes the attention probabilities instead of keeping them.
struct CausalAttention {
    heads: Heads,
}

impl CausalAttention {
    fn scale(&self) -> f32 {
        1.0 / (self.heads.dim as f32).sqrt()
    }

    /// Attention probabilities `[kv, g·L, L]`, masked causally.
    fn probs(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let h = self.heads;
        let l = q.dim(1)?;
        let qg = q.reshape((h.kv, (h.q / h.kv) * l, h.dim))?;
        let scores = qg.matmul(&k.t()?)?;
        let shape = scores.shape().clone();
        let mut s = scores.flatten_all()?.to_vec1::<f32>()?;
        causal_softmax(&mut s, l, self.scale());
        Tensor::from_vec(s, shape, q.device())
    }
}

/// Rows per parallel task of the softmax passes.
const SOFTMAX_ROWS: usize = 16;

/// `softmax(scores · scale)` in place over rows of length `l`, causally: row `r` is query
/// `r mod l`, which sees keys `0..=r mod l` (the rest become 0). Replaces a mask tensor, its
/// broadcast add and a generic softmax with one pass that skips the masked half.
fn causal_softmax(s: &mut [f32], l: usize, scale: f32) {
    s.par_chunks_mut(SOFTMAX_ROWS * l)
        .enumerate()
        .for_each(|(c, rows)| {
            for (k, row) in rows.chunks_exact_mut(l).enumerate() {
                let i = (c * SOFTMAX_ROWS + k) % l;
                let (live, masked) = row.split_at_mut(i + 1);
                wide(|| {
                    let max = live.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    for v in live.iter_mut() {
                        *v = vmath::exp((*v - max) * scale);
                    }
                    let inv = 1.0 / live.iter().sum::<f32>();
                    for v in live.iter_mut() {
                        *v *= inv;
                    }
                });
                masked.fill(0.0);
            }
        });
}

/// The softmax's backward in place: `d ← scale · p ⊙ (d − Σⱼ d⊙p)` row by row (rows of length
/// `l`), so `d` turns from the gradient of the probabilities into that of the raw scores.
fn softmax_backward(p: &[f32], d: &mut [f32], l: usize, scale: f32) {
    d.par_chunks_mut(SOFTMAX_ROWS * l)
        .zip(p.par_chunks(SOFTMAX_ROWS * l))
        .for_each(|(d, p)| {
            for (d, p) in d.chunks_exact_mut(l).zip(p.chunks_exact(l)) {
                wide(|| {
                    let dot: f32 = d.iter().zip(p).map(|(d, p)| d * p).sum();
                    for (d, &p) in d.iter_mut().zip(p) {
                        *d = scale * p * (*d - dot);
                    }
                });
            }
        });
}

fn tensor_of(s: &CpuStorage, l: &Layout, what: &str) -> Result<Tensor> {
    Tensor::from_slice(f32_slice(s, l, what)?, l.shape(), &Device::Cpu)
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "tuneshop-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            tensor_of(s1, l1, "q")?,
            tensor_of(s2, l2, "k")?,
            tensor_of(s3, l3, "v")?,
        );
        let out = self.probs(&q, &k)?.matmul(&v)?;
        let shape = l1.shape().clone();
        let data = out.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(data), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = self.heads;
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let l = q.dim(1)?;
        let g = h.q / h.kv;
        let p = self.probs(&q, &k)?; // [kv, g·L, L]
        let d_o = grad.detach().contiguous()?.reshape((h.kv, g * l, h.dim))?;
        let d_v = p.t()?.matmul(&d_o)?; // [kv, L, dim]
        let d_p = d_o.matmul(&v.t()?)?; // [kv, g·L, L]
        let shape = d_p.shape().clone();
        let mut d_s = d_p.flatten_all()?.to_vec1::<f32>()?;
        with_data(&p, |p| softmax_backward(p, &mut d_s, l, self.scale()))?;
        let d_s = Tensor::from_vec(d_s, shape, q.device())?;
        let d_q = d_s.matmul(&k)?.reshape((h.q, l, h.dim))?;
        let qg = q.reshape((h.kv, g * l, h.dim))?;
        let d_k = d_s.t()?.matmul(&qg)?;
        Ok((Some(d_q), Some(d_k), Some(d_v)))
    }
}

/// Causal attention for training (no KV cache): `[q_heads, L, dim]`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: Heads) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if cpu_f32(&q) {
        return q.apply_op3(&k, &v, CausalAttention { heads });
    }
    let l = q.dim(1)?;
    let g = heads.q / heads.kv;
    let qg = q.reshape((heads.kv, g * l, heads.dim))?;
    let scores = (qg.matmul(&k.t()?)? * (1.0 / (heads.dim as f64).sqrt()))?;
    let mask: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (l, l), q.device())?.to_dtype(q.dtype())?;
    let scores = scores
        .reshape((heads.kv, g, l, l))?
        .broadcast_add(&mask)?
        .reshape((heads.kv, g * l, l))?;
    candle_nn::ops::softmax(&scores, D::Minus1)?
        .matmul(&v)?
        .reshape((heads.q, l, heads.dim))
}

#[cfg(test)]
#[path = "grad_ops_tests.rs"]
mod tests;
