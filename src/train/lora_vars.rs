//! The trainable side of an adapter: A and B as candle `Var`s (the only tensors that get
//! gradients), their PEFT-style initialization, and the training hook with dropout.

use super::lora_ops::{lora_down, lora_up_add};
use crate::lora::{Adapter, LoraConfig, LoraPair};
use crate::model::{Config, LinearId, LoraHook};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// A and B of every adapted projection, as variables.
pub struct LoraVars {
    pub config: LoraConfig,
    pub vars: BTreeMap<LinearId, (Var, Var)>,
}

impl LoraVars {
    /// PEFT's default initialization: A ~ U(-1/√in, 1/√in) (Kaiming-uniform with a = √5),
    /// B = 0, so a fresh adapter changes nothing.
    pub fn init(config: &LoraConfig, base: &Config, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut vars = BTreeMap::new();
        for layer in 0..base.num_hidden_layers {
            for &proj in &config.targets {
                let (out, inp) = LoraConfig::shape_of(proj, base);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..config.r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (config.r, inp), device)?)?;
                let b = Var::zeros((out, config.r), DType::F32, device)?;
                vars.insert(LinearId { layer, proj }, (a, b));
            }
        }
        Ok(Self {
            config: config.clone(),
            vars,
        })
    }

    /// Every variable with its PEFT key (a stable order for optimizer state and checkpoints).
    pub fn named(&self) -> Vec<(String, &Var)> {
        self.vars
            .iter()
            .flat_map(|(&id, (a, b))| {
                [
                    (crate::lora::peft::key(id, 'A'), a),
                    (crate::lora::peft::key(id, 'B'), b),
                ]
            })
            .collect()
    }

    /// A snapshot of the current values as an [`Adapter`].
    pub fn to_adapter(&self, base_model: &str) -> Result<Adapter> {
        let mut pairs = BTreeMap::new();
        for (&id, (a, b)) in &self.vars {
            pairs.insert(
                id,
                LoraPair {
                    a: a.as_tensor().copy()?,
                    b: b.as_tensor().copy()?,
                },
            );
        }
        Ok(Adapter {
            config: self.config.clone(),
            base_model: base_model.to_string(),
            pairs,
        })
    }

    /// Overwrites the variables with an adapter's values (resuming a checkpoint).
    pub fn load_from(&self, adapter: &Adapter) -> Result<()> {
        for (id, (a, b)) in &self.vars {
            let Some(p) = adapter.pairs.get(id) else {
                candle_core::bail!(
                    "checkpoint lacks the matrices of layer {} {}",
                    id.layer,
                    id.proj.hf_name()
                )
            };
            a.set(&p.a.to_dtype(DType::F32)?)?;
            b.set(&p.b.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }

    /// The current values applied without dropout (evaluation).
    pub fn eval_hook(&self) -> TrainHook<'_> {
        TrainHook {
            vars: &self.vars,
            scale: self.config.scale(),
            dropout: 0.0,
            seed: 0,
        }
    }

    /// The hook for one micro-batch; its dropout masks derive from `seed` and the projection,
    /// so a recomputed forward pass draws the same masks.
    pub fn hook(&self, seed: u64) -> TrainHook<'_> {
        TrainHook {
            vars: &self.vars,
            scale: self.config.scale(),
            dropout: self.config.dropout as f32,
            seed,
        }
    }
}

/// Adds `scale · B·A·dropout(x)` to every adapted projection, through the graph.
pub struct TrainHook<'a> {
    vars: &'a BTreeMap<LinearId, (Var, Var)>,
    scale: f64,
    dropout: f32,
    seed: u64,
}

impl LoraHook for TrainHook<'_> {
    fn apply(&self, id: LinearId, xs: &Tensor, ys: Tensor) -> Result<Tensor> {
        let Some((a, b)) = self.vars.get(&id) else {
            return Ok(ys);
        };
        let mask_seed = self
            .seed
            .wrapping_mul(0x100_0000_01b3)
            .wrapping_add((id.layer as u64) << 8 | id.proj as u64);
        // The adapter trains in f32 whatever the base's dtype.
        let t = lora_down(
            &xs.to_dtype(DType::F32)?,
            a.as_tensor(),
            self.dropout,
            mask_seed,
        )?;
        let dtype = ys.dtype();
        lora_up_add(&ys.to_dtype(DType::F32)?, &t, b.as_tensor(), self.scale)?.to_dtype(dtype)
    }
}
