//! The resolved LLaMA configuration, from a Hugging Face `config.json` or from GGUF metadata.
//!
//! Both sources are validated here (architecture, head counts, shapes) so that the model code
//! can trust every field.

use super::gguf::GgufFile;
use super::ModelError;
use serde::Deserialize;

/// Llama 3.x frequency-dependent RoPE scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// Everything the forward pass needs to know about the architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

impl Config {
    fn validate(self, source: &str) -> Result<Self, ModelError> {
        let bad = |detail: String| ModelError::Config {
            origin: source.to_string(),
            detail,
        };
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(bad(format!("`{name}` must be positive")));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(bad(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head dimension {} must be even and positive",
                self.head_dim
            )));
        }
        // Written so that NaN fails too.
        if self.rope_theta.is_nan()
            || self.rope_theta <= 0.0
            || self.rms_norm_eps.is_nan()
            || self.rms_norm_eps <= 0.0
        {
            return Err(bad(
                "`rope_theta` and `rms_norm_eps` must be positive".into()
            ));
        }
        Ok(self)
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Inverse RoPE frequencies, one per pair of head dimensions.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f32 / d as f32))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return base;
        };
        // Long wavelengths are slowed by `factor`, short ones kept, and the band between them
        // interpolated (Llama 3.1's published scheme).
        let old = s.original_max_position_embeddings as f32;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }

    /// The Hugging Face `config.json` of this configuration.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if let Some(s) = &self.rope_scaling {
            v["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        v
    }

    /// Reads the `llama.*` keys of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let source = file.path.display().to_string();
        let arch = file.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture {
                origin: source,
                architecture: arch.to_string(),
            });
        }
        let key = |k: &str| format!("llama.{k}");
        let hidden = file.get_u64(&key("embedding_length"))? as usize;
        let heads = file.get_u64(&key("attention.head_count"))? as usize;
        let kv_heads = file
            .opt_u64(&key("attention.head_count_kv"))?
            .map_or(heads, |v| v as usize);
        let head_dim = match file.opt_u64(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None => hidden.checked_div(heads).unwrap_or(0),
        };
        let vocab_size = match file.opt_u64(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => file.string_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_scaling = match file.get("llama.rope.scaling.type").and_then(|v| v.as_str()) {
            None | Some("none") => None,
            Some(other) => {
                return Err(ModelError::Config {
                    origin: source,
                    detail: format!("RoPE scaling `{other}` is not supported"),
                })
            }
        };
        Config {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: file.get_u64(&key("feed_forward_length"))? as usize,
            num_hidden_layers: file.get_u64(&key("block_count"))? as usize,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: file
                .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: file.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0) as f32,
            rope_scaling,
            max_position_embeddings: file.opt_u64(&key("context_length"))?.unwrap_or(2048) as usize,
            tie_word_embeddings: file.tensor("output.weight").is_none(),
        }
        .validate(&source)
    }

    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str, source: &str) -> Result<Self, ModelError> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| ModelError::Config {
            origin: source.to_string(),
            detail: e.to_string(),
        })?;
        let arch_ok = match raw.model_type.as_deref() {
            Some("llama") => true,
            // Mistral without a sliding window is the LLaMA architecture.
            Some("mistral") => raw.sliding_window.is_none(),
            _ => false,
        };
        if !arch_ok {
            return Err(ModelError::UnsupportedArchitecture {
                origin: source.to_string(),
                architecture: raw.model_type.unwrap_or_else(|| "unknown".into()),
            });
        }
        let rope_scaling = match raw.rope_scaling {
            None => None,
            Some(s) if s.rope_type.as_deref() == Some("llama3") => Some(Llama3RopeScaling {
                factor: s.factor.unwrap_or(1.0),
                low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: s
                    .original_max_position_embeddings
                    .unwrap_or(8192),
            }),
            Some(s) => {
                return Err(ModelError::Config {
                    origin: source.to_string(),
                    detail: format!(
                        "RoPE scaling `{}` is not supported",
                        s.rope_type.unwrap_or_default()
                    ),
                })
            }
        };
        let heads = raw.num_attention_heads;
        Config {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(heads),
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size.checked_div(heads).unwrap_or(0)),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        }
        .validate(source)
    }
}

#[derive(Deserialize)]
struct HfRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

/// The subset of `config.json` that LLaMA models use.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    sliding_window: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = r#"{"model_type":"llama","vocab_size":49152,"hidden_size":576,
        "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
        "num_key_value_heads":3,"rms_norm_eps":1e-5,"rope_theta":100000,
        "max_position_embeddings":8192,"tie_word_embeddings":true}"#;

    #[test]
    fn parses_hf_config() {
        let c = Config::from_hf_json(SMOL, "config.json").unwrap();
        assert_eq!(
            (c.head_dim, c.num_key_value_heads, c.kv_dim()),
            (64, 3, 192)
        );
        assert!(c.tie_word_embeddings);
        assert_eq!(c.inv_freq().len(), 32);
    }

    #[test]
    fn rejects_other_architectures_and_bad_heads() {
        let gpt = SMOL.replace("\"llama\"", "\"gpt2\"");
        assert!(matches!(
            Config::from_hf_json(&gpt, "x"),
            Err(ModelError::UnsupportedArchitecture { .. })
        ));
        let bad = SMOL.replace("\"num_key_value_heads\":3", "\"num_key_value_heads\":4");
        assert!(matches!(
            Config::from_hf_json(&bad, "x"),
            Err(ModelError::Config { .. })
        ));
    }

    #[test]
    fn llama3_scaling_keeps_high_and_slows_low_frequencies() {
        let mut c = Config::from_hf_json(SMOL, "x").unwrap();
        let plain = c.inv_freq();
        c.rope_scaling = Some(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let scaled = c.inv_freq();
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[31] - plain[31] / 8.0).abs() < 1e-12);
    }
}
