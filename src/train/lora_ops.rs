//! The LoRA update as two fused, differentiable ops, so that a training step keeps almost
//! nothing per adapted projection for the backward pass:
//!
//! - [`lora_down`]: `t = dropout(x) · Aᵀ` (`[rows, r]`). The dropout mask is never stored: each
//!   element's keep/drop comes from a hash of (seed, index), recomputed in the backward pass.
//! - [`lora_up_add`]: `y = ys + scale · t · Bᵀ`, the frozen projection's output plus the update.
//!
//! Composed from candle ops the same update keeps a mask, the masked input and three
//! `[rows, out]` tensors per projection alive until the backward pass. Off the CPU (or for
//! non-f32 data) the composed form is used, with the same masks.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// A uniform number in `[0, 1)` for element `i` of the mask seeded by `seed`.
fn unit(seed: u64, i: u64) -> f32 {
    let mut z = seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// Inverted-dropout factors: `1/keep` for kept elements, 0 for dropped ones.
#[derive(Debug, Clone, Copy)]
struct Mask {
    keep: f32,
    seed: u64,
}

impl Mask {
    fn factor(&self, i: usize) -> f32 {
        if unit(self.seed, i as u64) < self.keep {
            1.0 / self.keep
        } else {
            0.0
        }
    }

    fn apply(&self, xs: &[f32]) -> Vec<f32> {
        xs.iter()
            .enumerate()
            .map(|(i, &x)| x * self.factor(i))
            .collect()
    }

    fn tensor(&self, shape: &Shape, device: &candle_core::Device) -> Result<Tensor> {
        let f: Vec<f32> = (0..shape.elem_count()).map(|i| self.factor(i)).collect();
        Tensor::from_vec(f, shape, device)
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expected f32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: expected a contiguous tensor")
    };
    Ok(&v[a..b])
}

fn data_of(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// `dst[m, n] = beta · lhs[m, k] · rhs[k, n] (+ dst if accumulate)`; each operand is given as
/// (data, row stride, column stride).
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    beta: f32,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    assert!(dst.len() >= m * n);
    // SAFETY: the extents are checked by the callers' shapes; the strides describe them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        )
    }
}

struct LoraDown {
    mask: Option<Mask>,
}

impl CustomOp2 for LoraDown {
    fn name(&self) -> &'static str {
        "tuneshop-lora-down"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "lora input")?;
        let a = contiguous_f32(a, al, "lora A")?;
        let (r, k) = al.shape().dims2()?;
        let rows = x.len() / k;
        let masked;
        let x = match &self.mask {
            Some(m) => {
                masked = m.apply(x);
                &masked[..]
            }
            None => x,
        };
        let mut out = vec![0f32; rows * r];
        matmul((rows, r, k), &mut out, false, 1.0, (x, k, 1), (a, 1, k));
        Ok((CpuStorage::F32(out), Shape::from((rows, r))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (r, k) = a.dims2()?;
        let rows = x.elem_count() / k;
        let (xd, ad, g) = (data_of(x)?, data_of(a)?, data_of(grad)?);
        // dL/dx = (g · A) ⊙ mask
        let mut gx = vec![0f32; rows * k];
        matmul((rows, k, r), &mut gx, false, 1.0, (&g, r, 1), (&ad, k, 1));
        if let Some(m) = &self.mask {
            for (i, v) in gx.iter_mut().enumerate() {
                *v *= m.factor(i);
            }
        }
        // dL/dA = gᵀ · (x ⊙ mask)
        let xm = match &self.mask {
            Some(m) => m.apply(&xd),
            None => xd,
        };
        let mut ga = vec![0f32; r * k];
        matmul((r, k, rows), &mut ga, false, 1.0, (&g, 1, r), (&xm, k, 1));
        Ok((
            Some(Tensor::from_vec(gx, x.shape(), x.device())?),
            Some(Tensor::from_vec(ga, (r, k), a.device())?),
        ))
    }
}

/// `dropout(x) · Aᵀ` for `x` `[rows, in]` and `A` `[r, in]`; `dropout` is the drop probability
/// and `seed` fixes the mask (the same seed gives the same mask, in any order of calls).
pub fn lora_down(x: &Tensor, a: &Tensor, dropout: f32, seed: u64) -> Result<Tensor> {
    let mask = (dropout > 0.0).then_some(Mask {
        keep: 1.0 - dropout,
        seed,
    });
    let x = x.flatten_to(x.rank().saturating_sub(2))?;
    let on_cpu = x.device().is_cpu() && x.dtype() == DType::F32 && a.dtype() == DType::F32;
    if !on_cpu {
        let x = match &mask {
            Some(m) => (&x * m.tensor(x.shape(), x.device())?.to_dtype(x.dtype())?)?,
            None => x,
        };
        return x.matmul(&a.t()?);
    }
    x.contiguous()?
        .apply_op2(&a.contiguous()?, LoraDown { mask })
}

struct LoraUpAdd {
    scale: f32,
}

/// Row `i` of a 2-D layout with unit column stride: (data, row stride).
fn rows_of<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<(&'a [f32], usize)> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expected f32")
    };
    let (rows, cols) = l.shape().dims2()?;
    let stride = l.stride();
    if stride[1] != 1 {
        candle_core::bail!("{what}: expected unit column stride")
    }
    let start = l.start_offset();
    let end = start + rows.saturating_sub(1) * stride[0] + cols;
    Ok((&v[start..end.max(start)], stride[0]))
}

impl CustomOp3 for LoraUpAdd {
    fn name(&self) -> &'static str {
        "tuneshop-lora-up-add"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        t: &CpuStorage,
        tl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, out_dim) = yl.shape().dims2()?;
        let (ys, y_stride) = rows_of(ys, yl, "projection output")?;
        let t = contiguous_f32(t, tl, "lora t")?;
        let b = contiguous_f32(b, bl, "lora B")?;
        let r = bl.shape().dims2()?.1;
        let mut out = vec![0f32; rows * out_dim];
        for (i, row) in out.chunks_exact_mut(out_dim).enumerate() {
            row.copy_from_slice(&ys[i * y_stride..i * y_stride + out_dim]);
        }
        matmul(
            (rows, out_dim, r),
            &mut out,
            true,
            self.scale,
            (t, r, 1),
            (b, 1, r),
        );
        Ok((CpuStorage::F32(out), Shape::from((rows, out_dim))))
    }

    fn bwd(
        &self,
        _ys: &Tensor,
        t: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out_dim, r) = b.dims2()?;
        let rows = t.dim(0)?;
        let (g, td, bd) = (data_of(grad)?, data_of(t)?, data_of(b)?);
        // dL/dt = scale · g · B
        let mut gt = vec![0f32; rows * r];
        matmul(
            (rows, r, out_dim),
            &mut gt,
            false,
            self.scale,
            (&g, out_dim, 1),
            (&bd, r, 1),
        );
        // dL/dB = scale · gᵀ · t
        let mut gb = vec![0f32; out_dim * r];
        matmul(
            (out_dim, r, rows),
            &mut gb,
            false,
            self.scale,
            (&g, 1, out_dim),
            (&td, r, 1),
        );
        Ok((
            Some(grad.clone()),
            Some(Tensor::from_vec(gt, (rows, r), t.device())?),
            Some(Tensor::from_vec(gb, (out_dim, r), b.device())?),
        ))
    }
}

/// `ys + scale · t · Bᵀ` for `ys` `[rows, out]`, `t` `[rows, r]` and `B` `[out, r]`.
pub fn lora_up_add(ys: &Tensor, t: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let on_cpu = ys.device().is_cpu()
        && ys.dtype() == DType::F32
        && b.dtype() == DType::F32
        && ys.rank() == 2;
    if !on_cpu {
        let delta = (t.matmul(&b.t()?)? * scale)?.to_dtype(ys.dtype())?;
        return ys.broadcast_add(&delta.reshape(ys.shape())?);
    }
    ys.apply_op3(
        &t.contiguous()?,
        &b.contiguous()?,
        LoraUpAdd {
            scale: scale as f32,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    /// The fused ops against the same math composed from candle ops (values and gradients).
    #[test]
    fn fused_ops_match_composed_ops() {
        let x = Var::from_tensor(&randn(&[5, 12])).unwrap();
        let a = Var::from_tensor(&randn(&[3, 12])).unwrap();
        let b = Var::from_tensor(&randn(&[7, 3])).unwrap();
        // A strided `ys`, as a narrowed group output is.
        let group = Var::from_tensor(&randn(&[5, 10])).unwrap();
        let probe = randn(&[5, 7]);
        let mask = Mask { keep: 0.8, seed: 9 };
        let run = |fused: bool| {
            let ys = group.as_tensor().narrow(1, 2, 7).unwrap();
            let y = if fused {
                let t = lora_down(x.as_tensor(), a.as_tensor(), 0.2, 9).unwrap();
                lora_up_add(&ys, &t, b.as_tensor(), 1.5).unwrap()
            } else {
                let m = mask.tensor(x.as_tensor().shape(), &Device::Cpu).unwrap();
                let xm = (x.as_tensor() * m).unwrap();
                let d = xm.matmul(&a.as_tensor().t().unwrap()).unwrap();
                let d = d.matmul(&b.as_tensor().t().unwrap()).unwrap();
                (ys + (d * 1.5).unwrap()).unwrap()
            };
            let loss = (&y * &probe).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut all = flat(&y);
            for v in [&x, &a, &b, &group] {
                all.extend(flat(grads.get(v.as_tensor()).unwrap()));
            }
            all
        };
        let (fused, composed) = (run(true), run(false));
        let diff = fused
            .iter()
            .zip(&composed)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "max difference {diff}");
    }

    #[test]
    fn masks_depend_on_the_seed_only_and_drop_about_p() {
        let m = Mask { keep: 0.9, seed: 3 };
        let dropped = (0..100_000).filter(|&i| m.factor(i) == 0.0).count();
        assert!((9_000..11_000).contains(&dropped), "{dropped}");
        assert_eq!(m.factor(12345), Mask { keep: 0.9, seed: 3 }.factor(12345));
        let other = Mask { keep: 0.9, seed: 4 };
        assert!((0..1000).any(|i| m.factor(i) != other.factor(i)));
    }
}
