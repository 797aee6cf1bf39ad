//! Inference: sampling, streaming text, and the generation loop. (The continuous batcher and
//! the adapter cache of the server arrive with the inference API.)

mod generate;
pub mod sampling;
pub mod text;

pub use generate::{FinishReason, GenerateParams, Generation};
pub use sampling::SamplingParams;

use crate::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("the prompt is empty: give at least one character of text")]
    EmptyPrompt,
    #[error(
        "the prompt has {prompt_tokens} tokens and `max_tokens` is {max_tokens}, but the model's \
         context is {context} tokens: shorten the prompt or lower `max_tokens`"
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
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}
