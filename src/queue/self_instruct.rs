//! Runs a claimed Self-Instruct job: its seed tasks (a dataset of the tenant, or the built-in
//! ones) and its writer (the base model or one of the tenant's adapters) go to the device
//! thread, whose batcher generates beside the requests it serves. Rounds become progress and
//! metrics events, each accepted instruction an event with its provenance; the rows become a new
//! dataset of the tenant, registered together with the job's success.

use super::device::{Command, SelfInstructEvent, SelfInstructJob};
use super::runner::{fail, stopped, supervise, DeviceRun, Worker};
use super::{StopFlag, StopReason};
use crate::db::datasets::Dataset;
use crate::db::events::{EventType, Level};
use crate::db::jobs::{Claim, Job, JobProgress};
use crate::db::{self, adapters, datasets, now_ms};
use crate::selfinstruct::{self, SeedTask, SelfInstructError, SelfInstructSpec};
use crate::store::keys;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

/// The seed tasks of `job`: the built-in ones for the nil id.
pub async fn load_seeds(w: &Worker, seeds: Uuid) -> anyhow::Result<Result<Vec<SeedTask>, String>> {
    if seeds.is_nil() {
        return Ok(Ok(selfinstruct::builtin_seeds()));
    }
    let Some(d) = datasets::get_any(&w.db, seeds).await? else {
        return Ok(Err(format!("the seed dataset `{seeds}` was deleted")));
    };
    let bytes = w.store.read(&d.store_key).await?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let parsed = tokio::task::spawn_blocking(move || selfinstruct::parse_seeds(&text)).await?;
    Ok(parsed.map_err(|e| format!("seed dataset: {e}")))
}

#[tracing::instrument(skip_all, fields(job_id = %job.id))]
pub async fn run(
    w: &Worker,
    job: Job,
    flag: Arc<StopFlag>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let spec: SelfInstructSpec = serde_json::from_str(&job.hyperparameters)?;
    let seeds = match load_seeds(w, job.training_dataset_id).await? {
        Ok(s) => s,
        Err(message) => return fail(w, &job, "invalid_seed_dataset", &message).await,
    };
    let base = w
        .device
        .model()
        .ok_or_else(|| anyhow::anyhow!("the base model is not loaded"))?;
    let adapter = if spec.model == job.base_model {
        None
    } else {
        let Some(row) = adapters::resolve(&w.db, job.tenant_id, &spec.model).await? else {
            let msg = format!(
                "the adapter `{}` that was to write no longer exists",
                spec.model
            );
            return fail(w, &job, "model_not_found", &msg).await;
        };
        Some(w.adapters.lease(&row, w.store.as_ref(), &base).await?)
    };
    let target = spec.params.num_instructions;
    w.event(
        job.id,
        Level::Info,
        EventType::Message,
        &format!(
            "Started on worker {}: {target} instructions from {} seed tasks, written by `{}`",
            w.worker_id,
            seeds.len(),
            spec.model
        ),
        None,
    )
    .await;
    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    let (reply_tx, reply) = oneshot::channel();
    w.device.send(Command::SelfInstruct {
        job: Box::new(SelfInstructJob {
            seeds,
            params: spec.params.clone(),
            adapter,
        }),
        events: events_tx,
        stop: flag.clone(),
        reply: reply_tx,
    })?;
    let mut progress = JobProgress {
        total_steps: Some(target as i64),
        ..JobProgress::default()
    };
    let run = DeviceRun { events, reply };
    let result = supervise(
        w,
        &job,
        &flag,
        shutdown,
        &mut progress,
        run,
        |w, j, f, p, e| Box::pin(on_event(w, j, f, p, e)),
    )
    .await?;
    match result {
        Ok(outcome) => register(w, &job, outcome).await,
        Err(SelfInstructError::Cancelled { accepted }) => {
            let after = format!("after {accepted} instructions");
            stopped(w, &job, flag.reason(), &after, "", "to start over").await
        }
        Err(e @ SelfInstructError::NothingUsable { .. }) => {
            fail(w, &job, "nothing_usable", &e.to_string()).await
        }
        Err(e) => fail(w, &job, "self_instruct_failed", &e.to_string()).await,
    }
}

async fn on_event(
    w: &Worker,
    job: &Job,
    flag: &StopFlag,
    progress: &mut JobProgress,
    ev: SelfInstructEvent,
) -> anyhow::Result<()> {
    match ev {
        SelfInstructEvent::Task(p) => {
            let data = serde_json::to_value(&p)?;
            let message = format!(
                "Round {}: `{}` ({}, {} instances)",
                p.round,
                p.instruction,
                p.kind(),
                p.instances
            );
            w.event(
                job.id,
                Level::Info,
                EventType::Message,
                &message,
                Some(&data),
            )
            .await;
        }
        SelfInstructEvent::Round { stats, accepted } => {
            progress.step = accepted as i64;
            match db::jobs::update_progress(&w.db, job.id, &w.worker_id, progress).await? {
                Claim::Lost => flag.raise(StopReason::LostClaim),
                Claim::Held {
                    cancel_requested: true,
                } => flag.raise(StopReason::Cancel),
                Claim::Held { .. } => {}
            }
            let mut data = serde_json::to_value(&stats)?;
            data["accepted"] = accepted.into();
            let message = format!(
                "Round {}: {} candidate instructions, {} kept; {accepted}/{} so far",
                stats.round,
                stats.candidates,
                stats.kept,
                progress.total_steps.unwrap_or_default()
            );
            w.event(
                job.id,
                Level::Info,
                EventType::Metrics,
                &message,
                Some(&data),
            )
            .await;
        }
    }
    Ok(())
}

/// Stores the rows as a dataset of the tenant and, in one transaction, registers it and marks
/// the job succeeded.
async fn register(w: &Worker, job: &Job, outcome: selfinstruct::Outcome) -> anyhow::Result<()> {
    let text: String = outcome
        .rows
        .iter()
        .map(|r| serde_json::to_string(r).map(|l| l + "\n"))
        .collect::<Result<_, _>>()?;
    let work = w.work_dir.join(job.id.to_string());
    tokio::fs::create_dir_all(&work).await?;
    let path = work.join("generated.jsonl");
    tokio::fs::write(&path, &text).await?;
    let id = Uuid::new_v4();
    let key = keys::dataset(id);
    let bytes = w.store.put_file(&key, &path).await?;
    let filename = job
        .suffix
        .clone()
        .unwrap_or_else(|| format!("self-instruct-{}", job.id.simple()));
    let d = Dataset {
        id,
        tenant_id: job.tenant_id,
        filename: format!("{filename}.jsonl"),
        format: "instruction".into(),
        rows: outcome.rows.len() as i64,
        bytes: bytes as i64,
        sha256: hex::encode(Sha256::digest(text.as_bytes())),
        store_key: key.clone(),
        created_at: now_ms(),
    };
    let mut tx = w.db.pool().begin().await?;
    datasets::insert(&mut *tx, &d).await?;
    if !db::jobs::succeed(
        &mut tx,
        job.id,
        &w.worker_id,
        db::jobs::JobResult::Dataset(id),
    )
    .await?
    {
        // Another worker holds the job now: it will register its own result.
        tx.rollback().await?;
        let _ = w.store.delete_prefix(&key).await;
        return Ok(());
    }
    tx.commit().await?;
    let msg = format!(
        "Succeeded: {} instructions, {} rows in {} rounds: dataset {id}",
        outcome.instructions,
        outcome.rows.len(),
        outcome.rounds
    );
    w.event(
        job.id,
        Level::Info,
        EventType::Message,
        &msg,
        Some(
            &serde_json::json!({ "result_dataset_id": id.to_string(), "rows": outcome.rows.len() }),
        ),
    )
    .await;
    tracing::info!(job_id = %job.id, dataset_id = %id, "self-instruct job succeeded");
    Ok(())
}
