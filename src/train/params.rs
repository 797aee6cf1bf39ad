//! Hyperparameters of a fine-tuning run, with their defaults and limits. Validation names the
//! field and the limit, and yields the LoRA configuration.

use super::optim::LrSchedule;
use crate::lora::{parse_targets, LoraConfig, DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_R};
use crate::model::{ComputeDtype, Config};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("`{param}` {message}")]
pub struct ParamError {
    pub param: &'static str,
    pub message: String,
}

fn err(param: &'static str, message: impl Into<String>) -> ParamError {
    ParamError {
        param,
        message: message.into(),
    }
}

/// Everything that shapes a run; absent fields take the defaults shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TrainParams {
    /// Passes over the training set.
    #[schema(example = 3)]
    pub n_epochs: usize,
    /// Examples per micro-batch.
    #[schema(example = 4)]
    pub batch_size: usize,
    /// Peak learning rate.
    #[schema(example = 0.0002)]
    pub learning_rate: f64,
    #[schema(example = 8)]
    pub lora_r: usize,
    #[schema(example = 16.0)]
    pub lora_alpha: f64,
    #[schema(example = 0.05)]
    pub lora_dropout: f64,
    /// Projections to adapt: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or
    /// all-linear.
    pub target_modules: Vec<String>,
    /// Scale by `lora_alpha / sqrt(r)` (rank-stabilized LoRA).
    pub use_rslora: bool,
    /// Longer examples are cut to this many tokens.
    #[schema(example = 512)]
    pub max_seq_len: usize,
    /// Optimizer steps of linear learning-rate warm-up.
    pub warmup_steps: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Evaluate on the validation set every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value.
    pub max_grad_norm: f64,
    pub lr_scheduler: LrSchedule,
    /// Recompute each layer's activations in the backward pass instead of keeping them: much
    /// less memory for about a third more compute.
    pub gradient_checkpointing: bool,
    /// Arithmetic of the frozen base's matmuls: `f32`, or `bf16` (inputs rounded to bf16, sums
    /// in f32, as QLoRA's compute dtype; 1.2–1.4x faster steps on CPUs with AVX512-BF16,
    /// f32 elsewhere).
    pub compute_dtype: ComputeDtype,
    /// Seeds initialization, shuffling and dropout: the same seed and data give the same adapter.
    pub seed: u64,
}

impl Default for TrainParams {
    fn default() -> Self {
        Self {
            n_epochs: 3,
            batch_size: 4,
            learning_rate: 2e-4,
            lora_r: DEFAULT_R,
            lora_alpha: DEFAULT_ALPHA,
            lora_dropout: DEFAULT_DROPOUT,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            use_rslora: false,
            max_seq_len: 512,
            warmup_steps: 0,
            gradient_accumulation_steps: 1,
            eval_every: 0,
            checkpoint_every: 50,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            lr_scheduler: LrSchedule::Cosine,
            gradient_checkpointing: false,
            compute_dtype: ComputeDtype::F32,
            seed: 0,
        }
    }
}

impl TrainParams {
    /// Checks every field against its limits and the base model; returns the LoRA config.
    pub fn validate(&self, base: &Config) -> Result<LoraConfig, ParamError> {
        let in_range = |param, v: usize, lo: usize, hi: usize| {
            if v < lo || v > hi {
                Err(err(
                    param,
                    format!("must be between {lo} and {hi}, got {v}"),
                ))
            } else {
                Ok(())
            }
        };
        in_range("n_epochs", self.n_epochs, 1, 100)?;
        in_range("batch_size", self.batch_size, 1, 256)?;
        in_range(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            1,
            1024,
        )?;
        in_range(
            "max_seq_len",
            self.max_seq_len,
            8,
            base.max_position_embeddings,
        )?;
        in_range("warmup_steps", self.warmup_steps, 0, 100_000)?;
        if self.learning_rate.is_nan() || self.learning_rate <= 0.0 || self.learning_rate > 1.0 {
            return Err(err(
                "learning_rate",
                format!("must be in (0, 1], got {}", self.learning_rate),
            ));
        }
        if !(0.0..=1.0).contains(&self.weight_decay) {
            return Err(err(
                "weight_decay",
                format!("must be in [0, 1], got {}", self.weight_decay),
            ));
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm <= 0.0 {
            return Err(err(
                "max_grad_norm",
                format!("must be positive, got {}", self.max_grad_norm),
            ));
        }
        let targets = parse_targets(&self.target_modules)
            .map_err(|e| err("target_modules", strip_field(&e.to_string())))?;
        let config = LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
            use_rslora: self.use_rslora,
        };
        config.validate(base).map_err(|e| {
            use crate::lora::LoraConfigError as E;
            let param = match e {
                E::Rank { .. } => "lora_r",
                E::Alpha(_) => "lora_alpha",
                E::Dropout(_) => "lora_dropout",
                E::UnknownModule(_) | E::NoModules => "target_modules",
            };
            err(param, strip_field(&e.to_string()))
        })?;
        Ok(config)
    }
}

impl TrainParams {
    /// Optimizer steps of a run over `examples` training examples.
    pub fn total_steps(&self, examples: usize) -> usize {
        let per_step = self.batch_size * self.gradient_accumulation_steps;
        self.n_epochs * examples.div_ceil(per_step.max(1))
    }
}

/// "`x` must be …" → "must be …" (the field is named by [`ParamError`]).
fn strip_field(msg: &str) -> String {
    match msg.strip_prefix('`').and_then(|m| m.split_once("` ")) {
        Some((_, rest)) => rest.to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config::from_hf_json(
            r#"{"model_type":"llama","vocab_size":100,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"max_position_embeddings":2048}"#,
            "x",
        )
        .unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        let c = TrainParams::default().validate(&base()).unwrap();
        assert_eq!((c.r, c.targets.len()), (8, 2));
    }

    #[test]
    fn errors_name_the_field_and_limit() {
        let cases: Vec<(TrainParams, &str, &str)> = vec![
            (
                TrainParams {
                    lora_r: 0,
                    ..Default::default()
                },
                "lora_r",
                "between 1 and 64",
            ),
            (
                TrainParams {
                    lora_r: 65,
                    ..Default::default()
                },
                "lora_r",
                "between 1 and 64",
            ),
            (
                TrainParams {
                    target_modules: vec!["qkv".into()],
                    ..Default::default()
                },
                "target_modules",
                "qkv",
            ),
            (
                TrainParams {
                    learning_rate: 0.0,
                    ..Default::default()
                },
                "learning_rate",
                "(0, 1]",
            ),
            (
                TrainParams {
                    max_seq_len: 100_000,
                    ..Default::default()
                },
                "max_seq_len",
                "2048",
            ),
            (
                TrainParams {
                    lora_dropout: 1.0,
                    ..Default::default()
                },
                "lora_dropout",
                "[0, 1)",
            ),
        ];
        for (p, field, text) in cases {
            let e = p.validate(&base()).unwrap_err();
            assert_eq!(e.param, field);
            assert!(e.to_string().contains(text), "{e}");
        }
    }
}
