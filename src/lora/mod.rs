//! LoRA adapters: configuration, weights, how they hook into the model's projections, and the
//! Hugging Face PEFT file format (save, load, validate on import), plus merging into a dense copy.

mod adapter;
mod config;
pub mod merge;
pub mod peft;

pub use adapter::{Adapter, AdapterHook, LoraPair};
pub use config::{
    parse_targets, LoraConfig, LoraConfigError, DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_R, MAX_R,
};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(transparent)]
    Config(#[from] LoraConfigError),
    #[error("cannot read or write `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not a valid adapter_config.json: {detail}")]
    BadConfig { path: PathBuf, detail: String },
    #[error("unsupported adapter: {0}")]
    Unsupported(String),
    #[error("adapter tensor `{key}`: {detail}")]
    Tensor { key: String, detail: String },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}
