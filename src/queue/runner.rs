//! The job runner: claims the oldest queued job, fetches its files and latest checkpoint from
//! the store, runs it on the device thread, and writes what happens back to the database:
//! progress and metrics every step, checkpoints as they are written, and the ending (an
//! adapter registered together with `succeeded`, or `failed` / `cancelled`). A heartbeat keeps
//! the claim; a claim another process took over, a cancel request or a shutdown stops the
//! run at its next step boundary.

use super::device::{Command, DeviceHandle, TrainEvent, TrainJob, TrainReport};
use super::{JobQueue, StopFlag, StopReason};
use crate::db::adapters::AdapterRow;
use crate::db::events::{EventType, Level};
use crate::db::jobs::{CheckpointRow, Claim, Finish, Job, JobKind, JobProgress};
use crate::db::{self, datasets, now_ms, Db};
use crate::lora::peft;
use crate::metrics::Metrics;
use crate::store::{keys, ArtifactStore};
use crate::train::{checkpoint, TrainError, TrainParams};
use futures_util::future::BoxFuture;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

/// Everything the background tasks use.
#[derive(Clone)]
pub struct Worker {
    pub db: Db,
    pub store: Arc<dyn ArtifactStore>,
    pub device: DeviceHandle,
    /// Adapters resident for serving (a Self-Instruct job may write with one).
    pub adapters: Arc<crate::infer::AdapterCache>,
    pub queue: JobQueue,
    pub metrics: Arc<Metrics>,
    /// This process's identity in `locked_by`.
    pub worker_id: String,
    /// Scratch space for running jobs (datasets and checkpoints fetched from the store).
    pub work_dir: PathBuf,
    pub heartbeat: Duration,
    /// A running job whose heartbeat is older than this is taken over.
    pub stale_after: Duration,
    pub poll_interval: Duration,
}

impl Worker {
    /// Records an event; a failure to record is logged, never fatal to the job.
    pub async fn event(
        &self,
        job: Uuid,
        level: Level,
        kind: EventType,
        message: &str,
        data: Option<&serde_json::Value>,
    ) {
        if let Err(e) = db::events::insert(&self.db, job, level, kind, message, data).await {
            tracing::warn!(job_id = %job, error = %e, "recording a job event failed");
        }
        self.queue.events.notify_waiters();
    }
}

/// Claims and runs jobs one at a time, in creation order, until shutdown.
pub async fn runner_task(w: Worker, mut shutdown: watch::Receiver<bool>) {
    if w.device.wait_ready().await.is_err() {
        return;
    }
    loop {
        if *shutdown.borrow() {
            return;
        }
        let stale_before = now_ms() - w.stale_after.as_millis() as i64;
        match db::jobs::requeue_stale(&w.db, Some(stale_before)).await {
            Ok(ids) => {
                for id in ids {
                    tracing::warn!(job_id = %id, "a worker stopped beating; job back in the queue");
                    w.event(
                        id,
                        Level::Warn,
                        EventType::Message,
                        "Its worker stopped responding; back in the queue, to resume from the last checkpoint",
                        None,
                    )
                    .await;
                }
            }
            Err(e) => tracing::error!(error = %e, "re-queueing stale jobs failed"),
        }
        match db::jobs::claim_next(&w.db, &w.worker_id).await {
            Ok(Some(job)) => {
                let id = job.id;
                let flag = Arc::new(StopFlag::default());
                w.queue.register(id, flag.clone());
                if let Err(e) = run_job(&w, job, flag, &mut shutdown).await {
                    tracing::error!(job_id = %id, error = %e, "job failed with an internal error");
                    let message = "internal error while running the job; see the server log";
                    let how = Finish::Failed {
                        code: "internal_error",
                        message,
                    };
                    if matches!(
                        db::jobs::finish(&w.db, id, &w.worker_id, how).await,
                        Ok(true)
                    ) {
                        w.event(id, Level::Error, EventType::Message, message, None)
                            .await;
                    }
                }
                w.queue.unregister(id);
                w.metrics.set_training_tokens_per_second(0.0);
                let _ = tokio::fs::remove_dir_all(w.work_dir.join(id.to_string())).await;
            }
            Ok(None) => {
                tokio::select! {
                    _ = w.queue.run.notified() => {}
                    _ = tokio::time::sleep(w.poll_interval) => {}
                    _ = shutdown.changed() => {}
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "claiming a job failed");
                tokio::time::sleep(w.poll_interval).await;
            }
        }
    }
}

/// Fetches the artifact directory `prefix` (the named files) into `dest`.
async fn fetch_dir(
    store: &dyn ArtifactStore,
    prefix: &str,
    files: &[&str],
    dest: &Path,
) -> anyhow::Result<()> {
    for f in files {
        store
            .get_file(&format!("{prefix}{f}"), &dest.join(f))
            .await?;
    }
    Ok(())
}

/// Uploads the named files of `src` under the store prefix; returns the bytes written.
async fn put_dir(
    store: &dyn ArtifactStore,
    prefix: &str,
    files: &[&str],
    src: &Path,
) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for f in files {
        bytes += store
            .put_file(&format!("{prefix}{f}"), &src.join(f))
            .await?;
    }
    Ok(bytes)
}

const ADAPTER_FILES: [&str; 2] = [peft::CONFIG_FILE, peft::WEIGHTS_FILE];

/// Runs a claimed job of either kind to its end.
async fn run_job(
    w: &Worker,
    job: Job,
    flag: Arc<StopFlag>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    match job.kind {
        JobKind::FineTune => run_fine_tune(w, job, flag, shutdown).await,
        JobKind::SelfInstruct => super::self_instruct::run(w, job, flag, shutdown).await,
    }
}

#[tracing::instrument(skip_all, fields(job_id = %job.id))]
async fn run_fine_tune(
    w: &Worker,
    job: Job,
    flag: Arc<StopFlag>,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let model = w
        .device
        .model()
        .ok_or_else(|| anyhow::anyhow!("the base model is not loaded"))?;
    w.event(
        job.id,
        Level::Info,
        EventType::Message,
        &format!(
            "Started on worker {} (attempt {})",
            w.worker_id, job.attempts
        ),
        None,
    )
    .await;
    let params: TrainParams = serde_json::from_str(&job.hyperparameters)?;
    let lora = match params.validate(model.llama.config()) {
        Ok(l) => l,
        Err(e) => return fail(w, &job, "invalid_hyperparameters", &e.to_string()).await,
    };
    let work = w.work_dir.join(job.id.to_string());
    let _ = tokio::fs::remove_dir_all(&work).await;
    tokio::fs::create_dir_all(&work).await?;

    let mut files = Vec::new();
    let sets = [
        (Some(job.training_dataset_id), "training", "train.jsonl"),
        (job.validation_dataset_id, "validation", "valid.jsonl"),
    ];
    for (id, which, name) in sets {
        let Some(id) = id else {
            files.push(None);
            continue;
        };
        let Some(d) = datasets::get_any(&w.db, id).await? else {
            let msg = format!("the {which} dataset `{id}` was deleted");
            return fail(w, &job, "dataset_not_found", &msg).await;
        };
        let path = work.join(name);
        w.store.get_file(&d.store_key, &path).await?;
        files.push(Some(path));
    }

    let resume_from = match db::jobs::checkpoints(&w.db, job.id).await?.pop() {
        None => None,
        Some(c) => {
            let dest = checkpoint::path_for(&work.join("resume"), c.step as usize);
            fetch_dir(w.store.as_ref(), &c.store_key, &checkpoint::FILES, &dest).await?;
            Some(dest)
        }
    };

    let train_job = TrainJob {
        params,
        lora,
        train_file: files[0].clone().unwrap_or_default(),
        valid_file: files[1].clone(),
        work_dir: work.clone(),
        resume_from,
        base_name: job.base_model.clone(),
    };
    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    let (reply_tx, reply) = oneshot::channel();
    w.device.send(Command::Train {
        job: Box::new(train_job),
        events: events_tx,
        stop: flag.clone(),
        reply: reply_tx,
    })?;

    let mut progress = JobProgress::default();
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
        Ok(report) => register(w, &job, report).await,
        Err(TrainError::Cancelled { step }) => {
            let after = format!("after step {step}");
            let note = "; its checkpoints are kept";
            let resume = "to resume from its last checkpoint";
            stopped(w, &job, flag.reason(), &after, note, resume).await
        }
        Err(e) => {
            let code = match &e {
                TrainError::NonFinite { .. } => "training_diverged",
                TrainError::Data(_) => "invalid_training_file",
                TrainError::Params(_) => "invalid_hyperparameters",
                _ => "training_failed",
            };
            fail(w, &job, code, &e.to_string()).await
        }
    }
}

/// Records one event of a run on the device thread (progress, a checkpoint, a provenance).
pub(super) type OnEvent<E> = for<'a> fn(
    &'a Worker,
    &'a Job,
    &'a StopFlag,
    &'a mut JobProgress,
    E,
) -> BoxFuture<'a, anyhow::Result<()>>;

/// A run on the device thread as the runner sees it: what it reports, and its answer.
pub(super) struct DeviceRun<E, R> {
    pub events: tokio::sync::mpsc::UnboundedReceiver<E>,
    pub reply: oneshot::Receiver<R>,
}

/// Waits for a run on the device thread to reply, recording its events as they come, beating
/// the job's heart, and raising the stop flag on a lost claim, a cancel request or a shutdown.
pub(super) async fn supervise<E, R>(
    w: &Worker,
    job: &Job,
    flag: &StopFlag,
    shutdown: &mut watch::Receiver<bool>,
    progress: &mut JobProgress,
    run: DeviceRun<E, R>,
    on_event: OnEvent<E>,
) -> anyhow::Result<R> {
    let DeviceRun {
        mut events,
        mut reply,
    } = run;
    let mut beat = tokio::time::interval(w.heartbeat);
    loop {
        tokio::select! {
            Some(ev) = events.recv() => on_event(w, job, flag, progress, ev).await?,
            r = &mut reply => {
                // Everything the run sent before replying is in the channel: record it first.
                while let Ok(ev) = events.try_recv() {
                    on_event(w, job, flag, progress, ev).await?;
                }
                return r.map_err(|_| anyhow::anyhow!("the device thread stopped"));
            }
            _ = beat.tick() => match db::jobs::heartbeat(&w.db, job.id, &w.worker_id).await {
                Ok(Claim::Lost) => flag.raise(StopReason::LostClaim),
                Ok(Claim::Held { cancel_requested: true }) => flag.raise(StopReason::Cancel),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            },
            _ = shutdown.changed() => flag.raise(StopReason::Shutdown),
        }
    }
}

pub(super) async fn fail(w: &Worker, job: &Job, code: &str, message: &str) -> anyhow::Result<()> {
    if db::jobs::finish(
        &w.db,
        job.id,
        &w.worker_id,
        Finish::Failed { code, message },
    )
    .await?
    {
        w.event(
            job.id,
            Level::Error,
            EventType::Message,
            &format!("Failed: {message}"),
            None,
        )
        .await;
    }
    Ok(())
}

async fn on_event(
    w: &Worker,
    job: &Job,
    flag: &StopFlag,
    progress: &mut JobProgress,
    ev: TrainEvent,
) -> anyhow::Result<()> {
    match ev {
        TrainEvent::Started {
            total_steps,
            resumed_at,
            train,
            valid,
        } => {
            progress.total_steps = Some(total_steps as i64);
            let message = match resumed_at {
                Some(step) => {
                    format!("Resumed from the checkpoint at step {step} of {total_steps}")
                }
                None => format!(
                    "Training on {} examples ({} tokens){} for {total_steps} steps",
                    train.rows,
                    train.tokens,
                    valid.map_or(String::new(), |v| format!(", validating on {}", v.rows))
                ),
            };
            w.event(job.id, Level::Info, EventType::Message, &message, None)
                .await;
        }
        TrainEvent::Progress(p) => {
            progress.step = p.step as i64;
            progress.total_steps = Some(p.total_steps as i64);
            progress.epoch = Some(p.epoch);
            progress.train_loss = Some(p.train_loss);
            progress.learning_rate = Some(p.learning_rate);
            progress.tokens_per_second = Some(p.tokens_per_second);
            progress.eta_seconds = Some(p.eta_seconds);
            progress.trained_tokens = p.tokens_trained as i64;
            if let Some(v) = p.valid {
                progress.valid_loss = Some(v.loss);
                progress.valid_token_accuracy = Some(v.token_accuracy);
            }
            w.metrics
                .set_training_tokens_per_second(p.tokens_per_second);
            match db::jobs::update_progress(&w.db, job.id, &w.worker_id, progress).await? {
                Claim::Lost => flag.raise(StopReason::LostClaim),
                Claim::Held { cancel_requested } => {
                    if cancel_requested {
                        flag.raise(StopReason::Cancel);
                    }
                }
            }
            let mut data = serde_json::json!({
                "step": p.step,
                "total_steps": p.total_steps,
                "epoch": p.epoch,
                "train_loss": p.train_loss,
                "learning_rate": p.learning_rate,
                "tokens_per_second": p.tokens_per_second,
                "eta_seconds": p.eta_seconds,
            });
            let mut message = format!(
                "Step {}/{}: training loss {:.4}",
                p.step, p.total_steps, p.train_loss
            );
            if let Some(v) = p.valid {
                data["valid_loss"] = v.loss.into();
                data["valid_token_accuracy"] = v.token_accuracy.into();
                message += &format!(", validation loss {:.4}", v.loss);
            }
            w.event(
                job.id,
                Level::Info,
                EventType::Metrics,
                &message,
                Some(&data),
            )
            .await;
        }
        TrainEvent::Checkpoint {
            step,
            path,
            train_loss,
            valid_loss,
        } => {
            let prefix = keys::checkpoint_dir(job.id, step);
            put_dir(w.store.as_ref(), &prefix, &checkpoint::FILES, &path).await?;
            let row = CheckpointRow {
                id: Uuid::new_v4(),
                job_id: job.id,
                step: step as i64,
                train_loss: Some(train_loss).filter(|l| l.is_finite()),
                valid_loss,
                store_key: prefix,
                created_at: now_ms(),
            };
            db::jobs::insert_checkpoint(&w.db, &row).await?;
            w.event(
                job.id,
                Level::Info,
                EventType::Message,
                &format!("Checkpoint saved at step {step}"),
                Some(&serde_json::json!({ "step": step })),
            )
            .await;
        }
    }
    Ok(())
}

/// Uploads the adapter and, in one transaction, registers it and marks the job succeeded.
async fn register(w: &Worker, job: &Job, report: TrainReport) -> anyhow::Result<()> {
    let params: TrainParams = serde_json::from_str(&job.hyperparameters)?;
    let id = Uuid::new_v4();
    let prefix = keys::adapter_dir(id);
    let bytes = put_dir(
        w.store.as_ref(),
        &prefix,
        &ADAPTER_FILES,
        &report.adapter_dir,
    )
    .await?;
    let mut row = AdapterRow {
        id,
        tenant_id: job.tenant_id,
        name: job.suffix.clone(),
        source: "job".into(),
        job_id: Some(job.id),
        base_model: job.base_model.clone(),
        lora_r: params.lora_r as i64,
        lora_alpha: params.lora_alpha,
        target_modules: params.target_modules.clone(),
        use_rslora: params.use_rslora,
        parameters: report.parameters as i64,
        bytes: bytes as i64,
        store_key: prefix.clone(),
        created_at: now_ms(),
    };
    let mut registered = try_register(w, job, &row).await;
    if registered.is_err() && row.name.is_some() {
        // The name was taken meanwhile (an import): register without it rather than lose the run.
        row.name = None;
        registered = try_register(w, job, &row).await;
        if registered.is_ok() {
            let msg = format!(
                "The adapter name `{}` was taken meanwhile; registered without a name",
                job.suffix.as_deref().unwrap_or_default()
            );
            w.event(job.id, Level::Warn, EventType::Message, &msg, None)
                .await;
        }
    }
    if !registered? {
        // Another worker holds the job now: it will register its own result.
        let _ = w.store.delete_prefix(&prefix).await;
        return Ok(());
    }
    let valid = report.valid.map_or(String::new(), |v| {
        format!(", validation loss {:.4}", v.loss)
    });
    let msg = format!(
        "Succeeded after {} steps (training loss {:.4}{valid}): adapter {id}",
        report.steps, report.train_loss
    );
    let data = serde_json::json!({ "adapter_id": id, "trained_tokens": report.tokens_trained });
    w.event(job.id, Level::Info, EventType::Message, &msg, Some(&data))
        .await;
    Ok(())
}

async fn try_register(w: &Worker, job: &Job, row: &AdapterRow) -> anyhow::Result<bool> {
    let mut tx = w.db.pool().begin().await?;
    db::adapters::insert(&mut tx, row).await?;
    if !db::jobs::succeed(
        &mut tx,
        job.id,
        &w.worker_id,
        db::jobs::JobResult::Adapter(row.id),
    )
    .await?
    {
        tx.rollback().await?;
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// Records how a job that stopped before its end ended: cancelled, or back in the queue after a
/// shutdown. `after` says how far it got ("after step 7"); `note` what a cancel keeps and
/// `resume` how a requeued job continues.
pub(super) async fn stopped(
    w: &Worker,
    job: &Job,
    why: Option<StopReason>,
    after: &str,
    note: &str,
    resume: &str,
) -> anyhow::Result<()> {
    match why {
        Some(StopReason::Cancel) => {
            if db::jobs::finish(&w.db, job.id, &w.worker_id, Finish::Cancelled).await? {
                let msg = format!("Cancelled {after}{note}");
                w.event(job.id, Level::Info, EventType::Message, &msg, None)
                    .await;
            }
        }
        Some(StopReason::Shutdown) => {
            if db::jobs::finish(&w.db, job.id, &w.worker_id, Finish::Requeued).await? {
                let msg = format!(
                    "Interrupted by a server shutdown {after}; back in the queue, {resume}"
                );
                w.event(job.id, Level::Warn, EventType::Message, &msg, None)
                    .await;
            }
        }
        Some(StopReason::LostClaim) | None => {
            tracing::warn!(job_id = %job.id, "another worker took this job over; stopped here");
        }
    }
    Ok(())
}
