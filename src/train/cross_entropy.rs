//! Summed cross-entropy of logits against target ids as one op with its own backward.
//!
//! The LM head's logits are the largest tensor of a training step (rows × vocabulary, 100 MB for
//! 512 supervised tokens of a 49k vocabulary). Composed candle ops (log-softmax, gather, sum)
//! walk and allocate that size several times forwards and again backwards; this op reads the
//! logits once forwards (a log-sum-exp per row) and writes their gradient in one pass backwards:
//! `(softmax(x) − onehot(target)) · g`.

use crate::model::vmath::{exp, wide};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows handled by one task.
const ROWS_PER_TASK: usize = 8;

struct CrossEntropy;

fn logits_of<'a>(s: &'a CpuStorage, l: &Layout) -> Result<(&'a [f32], usize, usize)> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("cross entropy: logits must be f32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cross entropy: logits must be contiguous")
    };
    let (rows, vocab) = l.shape().dims2()?;
    Ok((&v[a..b], rows, vocab))
}

fn targets_of(s: &CpuStorage, l: &Layout, rows: usize, vocab: usize) -> Result<Vec<usize>> {
    let CpuStorage::U32(v) = s else {
        candle_core::bail!("cross entropy: targets must be u32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cross entropy: targets must be contiguous")
    };
    let t: Vec<usize> = v[a..b].iter().map(|&t| t as usize).collect();
    if t.len() != rows || t.iter().any(|&t| t >= vocab) {
        candle_core::bail!("cross entropy: need one target below {vocab} per row")
    }
    Ok(t)
}

/// `(max, log Σ exp(x − max))` of a row.
fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    wide(|| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Eight partial sums: a single running sum would keep the loop scalar.
        let mut sums = [0f32; 8];
        for chunk in row.chunks(8) {
            for (s, &x) in sums.iter_mut().zip(chunk) {
                *s += exp(x - max);
            }
        }
        (max, sums.iter().sum::<f32>().ln())
    })
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "tuneshop-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, rows, vocab) = logits_of(ls, ll)?;
        let t = targets_of(ts, tl, rows, vocab)?;
        let loss: f64 = x
            .par_chunks(vocab)
            .zip(t.par_iter())
            .map(|(row, &t)| {
                let (max, lse) = log_sum_exp(row);
                (max + lse - row[t]) as f64
            })
            .sum();
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_scalar::<f32>()?;
        let d = logits.apply_op2_no_bwd(targets, &CrossEntropyGrad(g))?;
        Ok((Some(d), None))
    }
}

/// `(softmax(x) − onehot(target)) · g`, row by row.
struct CrossEntropyGrad(f32);

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "tuneshop-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, rows, vocab) = logits_of(ls, ll)?;
        let t = targets_of(ts, tl, rows, vocab)?;
        let g = self.0;
        let mut out = vec![0f32; rows * vocab];
        out.par_chunks_mut(ROWS_PER_TASK * vocab)
            .enumerate()
            .for_each(|(chunk, out)| {
                for (k, o) in out.chunks_exact_mut(vocab).enumerate() {
                    let r = chunk * ROWS_PER_TASK + k;
                    let row = &x[r * vocab..(r + 1) * vocab];
                    let (max, lse) = log_sum_exp(row);
                    let shift = max + lse;
                    wide(|| {
                        for (o, &v) in o.iter_mut().zip(row) {
                            *o = exp(v - shift) * g;
                        }
                    });
                    o[t[r]] -= g;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((rows, vocab))))
    }
}

/// `Σᵢ −log softmax(logits[i])[targets[i]]` (a scalar), differentiable in `logits`
/// (`[rows, vocab]` f32) on the CPU.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::max_abs_diff;
    use candle_core::{Device, Var, D};

    #[test]
    fn matches_log_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (21, 37), &dev).unwrap())).unwrap();
        let targets = Tensor::new(
            (0..21u32)
                .map(|i| (i * 7) % 37)
                .collect::<Vec<_>>()
                .as_slice(),
            &dev,
        )
        .unwrap();
        let fused = cross_entropy_sum(x.as_tensor(), &targets).unwrap();
        let composed = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1)
            .unwrap()
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .neg()
            .unwrap()
            .sum_all()
            .unwrap();
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            composed.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-3 * b.abs(), "{a} vs {b}");
        let ga = (fused * 0.5)
            .unwrap()
            .backward()
            .unwrap()
            .get(&x)
            .unwrap()
            .clone();
        let gb = (composed * 0.5)
            .unwrap()
            .backward()
            .unwrap()
            .get(&x)
            .unwrap()
            .clone();
        let diff = max_abs_diff(&ga, &gb);
        assert!(diff < 1e-5, "{diff}");
    }
}
