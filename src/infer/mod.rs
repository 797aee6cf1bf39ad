//! Inference: sampling, streaming text, sequences, the continuous batcher that serves many
//! sequences (and many adapters) in one batch, per-row LoRA, and the adapter cache.

pub mod adapter_cache;
pub mod engine;
mod generate;
pub mod lora_batch;
pub mod sampling;
pub mod sequence;
pub mod text;

pub use adapter_cache::AdapterCache;
pub use engine::{Engine, EngineConfig};
pub use generate::{generate_many, BatchPrompt, FinishReason, GenerateParams, Generation};
pub use lora_batch::{AdapterLease, BatchLora, ServedAdapter};
pub use sampling::SamplingParams;
pub use sequence::{GenEvent, GenRequest, StepError, TokenLogprob};

use crate::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("the prompt is empty: give at least one character of text")]
    EmptyPrompt,
    #[error(
        "this model's maximum context length is {context} tokens, but {} were requested \
         ({prompt_tokens} in the prompt, {max_tokens} for the completion): shorten the prompt \
         or lower `max_tokens`",
        prompt_tokens + max_tokens
    )]
    ContextExceeded {
        prompt_tokens: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("`{param}` {message}")]
    InvalidParam {
        param: &'static str,
        message: String,
    },
    #[error("this model has no chat template; send a plain prompt instead")]
    NoChatTemplate,
    #[error("the model `{0}` does not exist: use the base model's name or one of your adapters (GET /v1/models)")]
    UnknownModel(String),
    #[error("the adapter `{id}` cannot be loaded: {detail}")]
    AdapterLoad { id: String, detail: String },
    #[error("the server is at its limit of {0} requests in progress; retry shortly")]
    Overloaded(usize),
    #[error("the request needs {need} bytes of KV cache but the server has {budget} in all; lower `max_tokens` or `n`, or raise TUNESHOP_KV_CACHE_MB")]
    TooLargeForCache { need: usize, budget: usize },
    #[error(transparent)]
    Step(#[from] StepError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}
