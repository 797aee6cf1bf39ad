//! The LLaMA MLP's gate, `silu(gate) ⊙ up`, as one op with its own backward for training.
//!
//! Composed candle ops spend a dozen elementwise passes (each allocating a tokens × intermediate
//! tensor) on the forward and the backward of this product, every layer, every step; this op
//! reads its inputs once forwards and computes each gradient in one pass backwards:
//! `d gate = dy ⊙ up ⊙ σ(g) ⊙ (1 + g ⊙ (1 − σ(g)))`, `d up = dy ⊙ silu(g)`.

use super::vmath::{sigmoid, wide};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements handled by one task.
const CHUNK: usize = 1 << 14;

fn data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("swiglu: {what} must be f32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("swiglu: {what} must be contiguous")
    };
    Ok(&v[a..b])
}

/// `out[i] = f(a[i], b[i], c[i])` in parallel chunks, each a plain loop over slices (so it
/// vectorizes) compiled wide where the CPU allows.
fn map3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, o)| {
        let r = k * CHUNK..k * CHUNK + o.len();
        let (a, b, c) = (&a[r.clone()], &b[r.clone()], &c[r]);
        wide(|| {
            for (((o, &a), &b), &c) in o.iter_mut().zip(a).zip(b).zip(c) {
                *o = f(a, b, c);
            }
        })
    });
    out
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "tuneshop-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (data(gs, gl, "gate")?, data(us, ul, "up")?);
        if g.len() != u.len() {
            candle_core::bail!("swiglu: gate and up differ in size")
        }
        let out = map3(g, u, u, |g, u, _| g * sigmoid(g) * u);
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dg = gate.apply_op3_no_bwd(up, &grad, &SwiGluGrad::Gate)?;
        let du = gate.apply_op3_no_bwd(up, &grad, &SwiGluGrad::Up)?;
        Ok((Some(dg), Some(du)))
    }
}

/// One of the two gradients of [`SwiGlu`].
enum SwiGluGrad {
    Gate,
    Up,
}

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "tuneshop-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u, dy) = (
            data(gs, gl, "gate")?,
            data(us, ul, "up")?,
            data(ds, dl, "grad")?,
        );
        if u.len() != g.len() || dy.len() != g.len() {
            candle_core::bail!("swiglu grad: gate, up and grad differ in size")
        }
        let out = match self {
            Self::Gate => map3(g, u, dy, |g, u, dy| {
                let s = sigmoid(g);
                dy * u * s * (1.0 + g * (1.0 - s))
            }),
            Self::Up => map3(g, u, dy, |g, _, dy| dy * g * sigmoid(g)),
        };
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// `silu(gate) ⊙ up`, differentiable in both; fused on the CPU for f32, composed elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let fused = gate.device().is_cpu() && gate.dtype() == DType::F32 && up.dtype() == DType::F32;
    if fused && gate.shape() == up.shape() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    gate.silu()? * up
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::max_abs_diff;
    use candle_core::{Device, Var};

    #[test]
    fn value_and_gradients_match_composed_ops() {
        let dev = Device::Cpu;
        let g = Var::from_tensor(&Tensor::randn(0f32, 2.0, (37, 1000), &dev).unwrap()).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (37, 1000), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (37, 1000), &dev).unwrap();
        let fused = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
        let composed = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-5);
        let gf = (fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (composed * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&g, &u] {
            let d = max_abs_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(d < 1e-4, "{d}");
        }
    }
}
