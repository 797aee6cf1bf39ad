//! AdamW with decoupled weight decay, gradient-norm clipping and the learning-rate schedule.

use candle_core::{backprop::GradStore, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// How the learning rate moves after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    #[default]
    Cosine,
    Linear,
    Constant,
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warm-up, then the decay.
pub fn learning_rate(
    schedule: LrSchedule,
    peak: f64,
    step: usize,
    warmup: usize,
    total: usize,
) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        LrSchedule::Constant => peak,
        LrSchedule::Linear => peak * (1.0 - progress),
        LrSchedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW state for a fixed list of variables.
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<Var>,
    /// First and second moments, one pair per variable.
    pub moments: Vec<(Tensor, Tensor)>,
    /// Updates applied so far (for bias correction).
    pub steps: usize,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|v| Ok((v.as_tensor().zeros_like()?, v.as_tensor().zeros_like()?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            vars,
            moments,
            steps: 0,
        })
    }

    /// One update with learning rate `lr` from the gradients `grads` (one per variable, in
    /// order).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let p = self.params;
        self.steps += 1;
        let t = self.steps as i32;
        let (c1, c2) = (1.0 - p.beta1.powi(t), 1.0 - p.beta2.powi(t));
        for ((var, (m, v)), g) in self.vars.iter().zip(self.moments.iter_mut()).zip(grads) {
            *m = ((&*m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            *v = ((&*v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + p.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// Collects one gradient per variable from `grads` (an error names a variable that got none:
/// an op without a backward would otherwise stop learning silently).
pub fn gradients_of(vars: &[(String, &Var)], grads: &GradStore) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|(name, v)| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => candle_core::bail!("no gradient reached `{name}`"),
        })
        .collect()
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        let lr = |s| learning_rate(LrSchedule::Cosine, 1.0, s, 10, 110);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(60) - 0.5).abs() < 1e-12);
        assert!(lr(109) < 0.01);
        assert_eq!(learning_rate(LrSchedule::Linear, 2.0, 60, 10, 110), 1.0);
        assert_eq!(learning_rate(LrSchedule::Constant, 2.0, 100, 0, 110), 2.0);
    }

    #[test]
    fn adamw_minimizes_a_quadratic() {
        let x = Var::new(&[3f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![x.clone()], AdamWParams::default()).unwrap();
        for _ in 0..300 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let g = grads.get(x.as_tensor()).unwrap().clone();
            opt.step(&[g], 0.05).unwrap();
        }
        let v: Vec<f32> = x.as_tensor().to_vec1().unwrap();
        assert!(v.iter().all(|v| v.abs() < 0.05), "{v:?}");
    }

    #[test]
    fn clipping_caps_the_global_norm() {
        let mut g = vec![
            Tensor::new(&[3f32, 0.0], &Device::Cpu).unwrap(),
            Tensor::new(&[4f32], &Device::Cpu).unwrap(),
        ];
        assert!((clip_grad_norm(&mut g, 1.0).unwrap() - 5.0).abs() < 1e-6);
        let after: f32 = g
            .iter()
            .map(|t| {
                t.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .sum();
        assert!((after.sqrt() - 1.0).abs() < 1e-4);
    }
}
