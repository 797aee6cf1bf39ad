//! The job object every `/jobs` answer (and `POST /datasets/generate`) returns: status, queue
//! position, progress, result, and what the job was asked to do.

use super::{secs, AppState};
use crate::db::jobs::{self, Job, JobKind, JobStatus};
use crate::error::ApiError;
use crate::selfinstruct::{self, SelfInstructSpec};
use crate::train::TrainParams;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Serialize, ToSchema)]
pub struct JobProgressView {
    pub step: i64,
    pub total_steps: Option<i64>,
    pub epoch: Option<f64>,
    pub train_loss: Option<f64>,
    pub valid_loss: Option<f64>,
    pub valid_token_accuracy: Option<f64>,
    pub learning_rate: Option<f64>,
    pub tokens_per_second: Option<f64>,
    pub eta_seconds: Option<f64>,
}

#[derive(Serialize, ToSchema)]
pub struct JobErrorView {
    #[schema(example = "invalid_training_file")]
    pub code: String,
    pub message: String,
}

/// Which process runs the job, and when it last said so.
#[derive(Serialize, ToSchema)]
pub struct WorkerView {
    pub id: String,
    /// Unix milliseconds of the last heartbeat.
    pub heartbeat_at: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    #[schema(example = "fine_tuning.job")]
    pub object: &'static str,
    pub kind: JobKind,
    pub status: JobStatus,
    pub base_model: String,
    /// Fine-tuning jobs: the training dataset.
    pub training_dataset: Option<String>,
    pub validation_dataset: Option<String>,
    pub suffix: Option<String>,
    pub seed: i64,
    /// Fine-tuning jobs: every hyperparameter, defaults filled in.
    pub hyperparameters: Option<TrainParams>,
    /// Self-Instruct jobs: what they generate from and with.
    pub self_instruct: Option<SelfInstructView>,
    /// Jobs that start before this one (0: next); only while waiting.
    pub queue_position: Option<i64>,
    pub progress: JobProgressView,
    pub trained_tokens: i64,
    /// The registered adapter, once a fine-tuning job succeeded.
    pub adapter_id: Option<String>,
    /// The dataset a Self-Instruct job produced, once it succeeded.
    pub result_dataset_id: Option<String>,
    pub error: Option<JobErrorView>,
    pub cancel_requested: bool,
    /// Claims so far (more than one after a restart or a takeover).
    pub attempts: i64,
    pub worker: Option<WorkerView>,
    /// Unix seconds.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

/// The settings of a Self-Instruct job.
#[derive(Serialize, ToSchema)]
pub struct SelfInstructView {
    /// The seed dataset (`null`: the 175 seed tasks of the paper).
    pub seed_dataset: Option<String>,
    /// The base model or adapter that writes.
    pub model: String,
    pub params: selfinstruct::Params,
}

pub async fn view(state: &AppState, job: Job) -> Result<JobView, ApiError> {
    let queue_position = match job.status {
        JobStatus::Queued | JobStatus::ValidatingFiles => {
            Some(jobs::queue_position(&state.db, job.seq).await?)
        }
        _ => None,
    };
    let (training_dataset, hyperparameters, self_instruct) = match job.kind {
        JobKind::FineTune => (
            Some(job.training_dataset_id.to_string()),
            Some(serde_json::from_str(&job.hyperparameters).map_err(ApiError::internal)?),
            None,
        ),
        JobKind::SelfInstruct => {
            let spec: SelfInstructSpec =
                serde_json::from_str(&job.hyperparameters).map_err(ApiError::internal)?;
            let seeds = job.training_dataset_id;
            let view = SelfInstructView {
                seed_dataset: (!seeds.is_nil()).then(|| seeds.to_string()),
                model: spec.model,
                params: spec.params,
            };
            (None, None, Some(view))
        }
    };
    let p = job.progress;
    Ok(JobView {
        id: job.id.to_string(),
        object: "fine_tuning.job",
        kind: job.kind,
        status: job.status,
        base_model: job.base_model,
        training_dataset,
        validation_dataset: job.validation_dataset_id.map(|v| v.to_string()),
        suffix: job.suffix,
        seed: job.seed,
        hyperparameters,
        self_instruct,
        queue_position,
        progress: JobProgressView {
            step: p.step,
            total_steps: p.total_steps,
            epoch: p.epoch,
            train_loss: p.train_loss,
            valid_loss: p.valid_loss,
            valid_token_accuracy: p.valid_token_accuracy,
            learning_rate: p.learning_rate,
            tokens_per_second: p.tokens_per_second,
            eta_seconds: p.eta_seconds,
        },
        trained_tokens: p.trained_tokens,
        adapter_id: job.adapter_id.map(|a| a.to_string()),
        result_dataset_id: job.result_dataset_id.map(|d| d.to_string()),
        error: job.error_code.map(|code| JobErrorView {
            code,
            message: job.error_message.unwrap_or_default(),
        }),
        cancel_requested: job.cancel_requested,
        attempts: job.attempts,
        worker: job.locked_by.map(|id| WorkerView {
            id,
            heartbeat_at: job.heartbeat_at,
        }),
        created_at: secs(job.created_at),
        started_at: job.started_at.map(secs),
        finished_at: job.finished_at.map(secs),
    })
}
