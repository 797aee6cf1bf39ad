//! Adapter weights and the hook that adds `scale · B·A·x` to the frozen projections.

use super::LoraConfig;
use crate::model::{LinearId, LoraHook};
use candle_core::{Result, Tensor};
use std::collections::BTreeMap;

/// The two matrices of one adapted projection.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
}

/// A LoRA adapter for one base model: its settings and a pair of matrices per adapted projection.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: LoraConfig,
    /// The base model it was trained on (`base_model_name_or_path` in PEFT).
    pub base_model: String,
    pub pairs: BTreeMap<LinearId, LoraPair>,
}

impl Adapter {
    pub fn parameter_count(&self) -> usize {
        self.pairs
            .values()
            .map(|p| p.a.elem_count() + p.b.elem_count())
            .sum()
    }

    /// Applies the adapter to every row (inference and evaluation: no dropout).
    pub fn hook(&self) -> AdapterHook<'_> {
        AdapterHook {
            pairs: &self.pairs,
            scale: self.config.scale(),
        }
    }
}

pub struct AdapterHook<'a> {
    pairs: &'a BTreeMap<LinearId, LoraPair>,
    scale: f64,
}

impl LoraHook for AdapterHook<'_> {
    fn apply(&self, id: LinearId, xs: &Tensor, ys: Tensor) -> Result<Tensor> {
        match self.pairs.get(&id) {
            None => Ok(ys),
            Some(p) => {
                let x = xs.to_dtype(p.a.dtype())?;
                let delta = x.broadcast_matmul(&p.a.t()?)?.broadcast_matmul(&p.b.t()?)?;
                let dtype = ys.dtype();
                ys + (delta * self.scale)?.to_dtype(dtype)?
            }
        }
    }
}
