//! LoRA settings, as in PEFT's `LoraConfig`, validated against a base model.

use crate::model::{Config, Proj};
use serde::{Deserialize, Serialize};

pub const DEFAULT_R: usize = 8;
pub const DEFAULT_ALPHA: f64 = 16.0;
pub const DEFAULT_DROPOUT: f64 = 0.05;
/// The largest rank tuneshop trains or serves.
pub const MAX_R: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LoraConfigError {
    #[error("`lora_r` must be between 1 and {max} (at most the model's hidden size), got {got}")]
    Rank { got: usize, max: usize },
    #[error("`lora_alpha` must be positive, got {0}")]
    Alpha(f64),
    #[error("`lora_dropout` must be in [0, 1), got {0}")]
    Dropout(f64),
    #[error("`target_modules`: unknown module `{0}`; use q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear")]
    UnknownModule(String),
    #[error("`target_modules` is empty")]
    NoModules,
}

/// Which projections carry LoRA matrices and how they are scaled.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Sorted, without duplicates.
    pub targets: Vec<Proj>,
    /// Scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: DEFAULT_R,
            alpha: DEFAULT_ALPHA,
            dropout: DEFAULT_DROPOUT,
            targets: vec![Proj::Q, Proj::V],
            use_rslora: false,
        }
    }
}

/// Parses PEFT-style module names (`q_proj`, …, or `all-linear`).
pub fn parse_targets<S: AsRef<str>>(names: &[S]) -> Result<Vec<Proj>, LoraConfigError> {
    let mut out = Vec::new();
    for name in names {
        let name = name.as_ref().trim();
        if name == "all-linear" {
            out.extend(Proj::ALL);
            continue;
        }
        out.push(
            Proj::from_hf_name(name)
                .ok_or_else(|| LoraConfigError::UnknownModule(name.to_string()))?,
        );
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(LoraConfigError::NoModules);
    }
    Ok(out)
}

impl LoraConfig {
    /// The factor applied to `B·A·x`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn validate(&self, base: &Config) -> Result<(), LoraConfigError> {
        let max = MAX_R.min(base.hidden_size);
        if self.r == 0 || self.r > max {
            return Err(LoraConfigError::Rank { got: self.r, max });
        }
        if self.alpha.is_nan() || self.alpha <= 0.0 {
            return Err(LoraConfigError::Alpha(self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraConfigError::Dropout(self.dropout));
        }
        if self.targets.is_empty() {
            return Err(LoraConfigError::NoModules);
        }
        Ok(())
    }

    /// `[out, in]` of projection `p` in a model with config `c`.
    pub fn shape_of(p: Proj, c: &Config) -> (usize, usize) {
        let h = c.hidden_size;
        match p {
            Proj::Q => (c.q_dim(), h),
            Proj::K | Proj::V => (c.kv_dim(), h),
            Proj::O => (h, c.q_dim()),
            Proj::Gate | Proj::Up => (c.intermediate_size, h),
            Proj::Down => (h, c.intermediate_size),
        }
    }

    /// Trainable parameters over all layers.
    pub fn parameter_count(&self, c: &Config) -> usize {
        let per_layer: usize = self
            .targets
            .iter()
            .map(|&p| {
                let (out, inp) = Self::shape_of(p, c);
                self.r * (out + inp)
            })
            .sum();
        per_layer * c.num_hidden_layers
    }
}

/// PEFT's `adapter_config.json` (the fields tuneshop writes; unknown fields are kept on import
/// only as far as validation needs them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: serde_json::Value,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    pub rank_pattern: Option<serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: Option<serde_json::Value>,
}

fn bias_none() -> String {
    "none".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets_and_all_linear() {
        assert_eq!(
            parse_targets(&["v_proj", "q_proj", "q_proj"]).unwrap(),
            vec![Proj::Q, Proj::V]
        );
        assert_eq!(parse_targets(&["all-linear"]).unwrap().len(), 7);
        assert_eq!(
            parse_targets(&["lm_head"]),
            Err(LoraConfigError::UnknownModule("lm_head".into()))
        );
        let empty: [&str; 0] = [];
        assert_eq!(parse_targets(&empty), Err(LoraConfigError::NoModules));
    }

    #[test]
    fn scale_follows_peft() {
        let mut c = LoraConfig::default();
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert!((c.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    }
}
