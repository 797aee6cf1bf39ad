//! LoRA training on a frozen, shared base model: data → examples, the trainable variables,
//! the optimizer and schedule, the loop, checkpoints.

pub mod checkpoint;
mod cross_entropy;
pub mod data;
pub mod lora_ops;
pub mod lora_vars;
pub mod optim;
mod params;
mod trainer;

pub use data::{DataError, DataFormat, DataStats, Example, LineError};
pub use optim::LrSchedule;
pub use params::{ParamError, TrainParams};
pub use trainer::{
    loss_of, supervised_nll, EvalResult, Progress, Silent, TrainObserver, TrainOutcome, Trainer,
};

use crate::lora::LoraError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Params(#[from] ParamError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("training diverged: the {what} became NaN or infinite at step {step}; lower `learning_rate` or check the data")]
    NonFinite { step: usize, what: &'static str },
    #[error("cancelled after step {step}")]
    Cancelled { step: usize },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}
