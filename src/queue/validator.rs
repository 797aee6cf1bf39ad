//! `validating_files` → `queued`: a new job's datasets are rendered and tokenized exactly as
//! training will do (so a response cut off entirely by `max_seq_len` is caught before the job
//! waits in line), or a Self-Instruct job's seed tasks are read, and its step count is fixed. Runs beside the job runner, so a long training
//! run does not delay this feedback.

use super::runner::Worker;
use crate::db::events::{EventType, Level};
use crate::db::jobs::{Job, JobKind};
use crate::db::{self, datasets};
use crate::model::BaseModel;
use crate::selfinstruct::SelfInstructSpec;
use crate::train::data::examples_from_jsonl;
use crate::train::{DataStats, TrainParams};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Checks jobs in `validating_files`, oldest first, until shutdown.
pub async fn validator_task(w: Worker, mut shutdown: watch::Receiver<bool>) {
    if w.device.wait_ready().await.is_err() {
        return;
    }
    let Some(model) = w.device.model() else {
        return;
    };
    loop {
        if *shutdown.borrow() {
            return;
        }
        match db::jobs::validating(&w.db, 16).await {
            Ok(jobs) if !jobs.is_empty() => {
                for job in jobs {
                    if let Err(e) = validate_one(&w, &model, &job).await {
                        tracing::error!(job_id = %job.id, error = %e, "validating a job failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "listing jobs to validate failed"),
        }
        tokio::select! {
            _ = w.queue.validate.notified() => {}
            _ = tokio::time::sleep(w.poll_interval) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Why a job's files cannot be trained on.
struct Invalid {
    code: &'static str,
    message: String,
}

async fn load_dataset(
    w: &Worker,
    id: uuid::Uuid,
    which: &str,
) -> Result<Result<String, Invalid>, anyhow::Error> {
    let Some(d) = datasets::get_any(&w.db, id).await? else {
        return Ok(Err(Invalid {
            code: "dataset_not_found",
            message: format!("the {which} dataset `{id}` no longer exists"),
        }));
    };
    let bytes = w.store.read(&d.store_key).await?;
    Ok(Ok(String::from_utf8_lossy(&bytes).into_owned()))
}

/// A job whose files passed: its step count and what to tell the tenant.
struct Ready {
    total_steps: usize,
    message: String,
    data: serde_json::Value,
}

async fn validate_one(w: &Worker, model: &Arc<BaseModel>, job: &Job) -> anyhow::Result<()> {
    let outcome = match job.kind {
        JobKind::FineTune => check(w, model, job)
            .await?
            .map(|(total_steps, train, valid)| {
                let mut message = format!(
                    "Files validated: {} training examples ({} tokens, {} supervised)",
                    train.rows, train.tokens, train.supervised_tokens
                );
                if train.truncated_rows > 0 {
                    message += &format!(", {} cut to max_seq_len", train.truncated_rows);
                }
                if let Some(v) = &valid {
                    message += &format!("; {} validation examples", v.rows);
                }
                message += &format!("; {total_steps} steps. Queued.");
                let data = serde_json::json!({
                    "total_steps": total_steps,
                    "training_examples": train.rows,
                    "training_tokens": train.tokens,
                    "truncated_rows": train.truncated_rows,
                    "validation_examples": valid.as_ref().map(|v| v.rows),
                });
                Ready {
                    total_steps,
                    message,
                    data,
                }
            }),
        JobKind::SelfInstruct => check_seeds(w, job).await?,
    };
    match outcome {
        Ok(Ready {
            total_steps,
            message,
            data,
        }) => {
            if db::jobs::mark_queued(&w.db, job.id, total_steps as i64).await? {
                w.event(
                    job.id,
                    Level::Info,
                    EventType::Message,
                    &message,
                    Some(&data),
                )
                .await;
                w.queue.run.notify_one();
            }
        }
        Err(invalid) => {
            if db::jobs::fail_validation(&w.db, job.id, invalid.code, &invalid.message).await? {
                w.event(
                    job.id,
                    Level::Error,
                    EventType::Message,
                    &invalid.message,
                    None,
                )
                .await;
            }
        }
    }
    Ok(())
}

/// A Self-Instruct job's seed tasks still parse; its steps are the instructions it generates.
async fn check_seeds(w: &Worker, job: &Job) -> anyhow::Result<Result<Ready, Invalid>> {
    let spec: SelfInstructSpec = serde_json::from_str(&job.hyperparameters)?;
    Ok(
        match super::self_instruct::load_seeds(w, job.training_dataset_id).await? {
            Err(message) => Err(Invalid {
                code: "invalid_seed_dataset",
                message,
            }),
            Ok(seeds) => {
                let n = spec.params.num_instructions;
                let clf = seeds.iter().filter(|s| s.is_classification).count();
                Ok(Ready {
                total_steps: n,
                message: format!(
                    "Seed tasks checked: {} ({clf} classification); {n} instructions to generate. Queued.",
                    seeds.len()
                ),
                data: serde_json::json!({ "seed_tasks": seeds.len(), "classification": clf, "total_steps": n }),
            })
            }
        },
    )
}

type Checked = Result<(usize, DataStats, Option<DataStats>), Invalid>;

async fn check(w: &Worker, model: &Arc<BaseModel>, job: &Job) -> anyhow::Result<Checked> {
    let params: TrainParams = serde_json::from_str(&job.hyperparameters)?;
    let train_text = match load_dataset(w, job.training_dataset_id, "training").await? {
        Ok(t) => t,
        Err(invalid) => return Ok(Err(invalid)),
    };
    let valid_text = match job.validation_dataset_id {
        None => None,
        Some(id) => match load_dataset(w, id, "validation").await? {
            Ok(t) => Some(t),
            Err(invalid) => return Ok(Err(invalid)),
        },
    };
    let model = model.clone();
    let max_len = params.max_seq_len;
    // Tokenizing is CPU work, not tensor math: a blocking thread, off the runtime.
    let checked = tokio::task::spawn_blocking(move || -> Checked {
        let (train, train_stats) =
            examples_from_jsonl(&model, &train_text, max_len).map_err(|e| Invalid {
                code: "invalid_training_file",
                message: format!("training dataset: {e}"),
            })?;
        let valid_stats = match valid_text {
            None => None,
            Some(text) => Some(
                examples_from_jsonl(&model, &text, max_len)
                    .map_err(|e| Invalid {
                        code: "invalid_validation_file",
                        message: format!("validation dataset: {e}"),
                    })?
                    .1,
            ),
        };
        let total_steps = params.total_steps(train.len());
        Ok((total_steps, train_stats, valid_stats))
    })
    .await?;
    Ok(checked)
}
