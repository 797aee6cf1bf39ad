//! The LLaMA runtime: configuration, weights (dense or quantized), forward pass, KV cache,
//! loaders, tokenizer and chat template. Pure computation: no I/O beyond reading model files,
//! no async, no HTTP.

mod attention;
mod bf16_gemm;
mod cache;
mod chat_template;
mod config;
pub mod default_model;
pub mod gguf;
mod grad_ops;
mod linear;
mod llama;
mod loader;
pub mod quant;
mod swiglu;
pub mod tiny;
mod tokenizer;
pub(crate) mod vmath;

/// Helpers shared by the unit tests of the model and the trainer.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::Tensor;

    /// The largest absolute elementwise difference of two tensors of one shape.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}

pub use bf16_gemm::available as bf16_available;
pub use cache::KvCache;
pub use chat_template::{ChatTemplate, Message};
pub use config::{Config, Llama3RopeScaling};
pub use gguf::GgufError;
pub use linear::{ComputeDtype, Linear, LinearId, LoraHook, Mode, NoLora, Proj, Weight};
pub use llama::{last_logits, LayerWeights, Llama, SeqInput};
pub use loader::{load, BaseModel, LoadOptions};
pub use tokenizer::Tokenizer;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model not found at `{0}`: give a .gguf file or a Hugging Face model directory")]
    NotFound(PathBuf),
    #[error("`{0}` is neither a .gguf file nor a directory with config.json")]
    UnrecognizedFormat(PathBuf),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{origin}: invalid model configuration: {detail}")]
    Config { origin: String, detail: String },
    #[error("{origin}: architecture `{architecture}` is not supported; tuneshop serves LLaMA-family models")]
    UnsupportedArchitecture {
        origin: String,
        architecture: String,
    },
    #[error("{origin}: tokenizer: {detail}")]
    Tokenizer { origin: String, detail: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("{origin}: weights: {detail}")]
    Weights { origin: String, detail: String },
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}
