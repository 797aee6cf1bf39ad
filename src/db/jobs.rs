//! Jobs: the table is the queue. Jobs are claimed in creation order (`seq`) inside one
//! statement (`FOR UPDATE SKIP LOCKED` on PostgreSQL), the claimer's id goes in `locked_by`,
//! a heartbeat keeps the claim alive, and a job is finished only by the worker holding it.

use super::{now_ms, opt_uuid_col, uuid_col, Backend, Db, DbError};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use uuid::Uuid;

/// A job's status, with OpenAI's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    ValidatingFiles,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        Self::ValidatingFiles,
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ValidatingFiles => "validating_files",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    FineTune,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FineTune => "fine_tune",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "fine_tune" => Some(Self::FineTune),
            _ => None,
        }
    }
}

/// The progress columns, written after every step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobProgress {
    pub step: i64,
    pub total_steps: Option<i64>,
    pub epoch: Option<f64>,
    pub train_loss: Option<f64>,
    pub valid_loss: Option<f64>,
    pub valid_token_accuracy: Option<f64>,
    pub learning_rate: Option<f64>,
    pub tokens_per_second: Option<f64>,
    pub eta_seconds: Option<f64>,
    pub trained_tokens: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub seq: i64,
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub kind: JobKind,
    pub status: JobStatus,
    pub base_model: String,
    pub training_dataset_id: Uuid,
    pub validation_dataset_id: Option<Uuid>,
    pub suffix: Option<String>,
    pub seed: i64,
    /// The resolved hyperparameters, as JSON.
    pub hyperparameters: String,
    pub progress: JobProgress,
    pub adapter_id: Option<Uuid>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub cancel_requested: bool,
    pub attempts: i64,
    pub locked_by: Option<String>,
    pub heartbeat_at: Option<i64>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

const COLUMNS: &str = "seq, id, tenant_id, kind, status, base_model, training_dataset_id, \
    validation_dataset_id, suffix, seed, hyperparameters, total_steps, step, epoch, train_loss, \
    valid_loss, valid_token_accuracy, learning_rate, tokens_per_second, eta_seconds, \
    trained_tokens, adapter_id, error_code, error_message, cancel_requested, attempts, \
    locked_by, heartbeat_at, created_at, started_at, finished_at";

fn job_of(row: &sqlx::any::AnyRow) -> Result<Job, DbError> {
    let corrupt = |detail: String| DbError::Corrupt {
        table: "jobs",
        detail,
    };
    let status: String = row.try_get("status")?;
    let kind: String = row.try_get("kind")?;
    Ok(Job {
        seq: row.try_get("seq")?,
        id: uuid_col(row, "id", "jobs")?,
        tenant_id: uuid_col(row, "tenant_id", "jobs")?,
        kind: JobKind::parse(&kind).ok_or_else(|| corrupt(format!("kind `{kind}`")))?,
        status: JobStatus::parse(&status).ok_or_else(|| corrupt(format!("status `{status}`")))?,
        base_model: row.try_get("base_model")?,
        training_dataset_id: uuid_col(row, "training_dataset_id", "jobs")?,
        validation_dataset_id: opt_uuid_col(row, "validation_dataset_id", "jobs")?,
        suffix: row.try_get("suffix")?,
        seed: row.try_get("seed")?,
        hyperparameters: row.try_get("hyperparameters")?,
        progress: JobProgress {
            step: row.try_get("step")?,
            total_steps: row.try_get("total_steps")?,
            epoch: row.try_get("epoch")?,
            train_loss: row.try_get("train_loss")?,
            valid_loss: row.try_get("valid_loss")?,
            valid_token_accuracy: row.try_get("valid_token_accuracy")?,
            learning_rate: row.try_get("learning_rate")?,
            tokens_per_second: row.try_get("tokens_per_second")?,
            eta_seconds: row.try_get("eta_seconds")?,
            trained_tokens: row.try_get("trained_tokens")?,
        },
        adapter_id: opt_uuid_col(row, "adapter_id", "jobs")?,
        error_code: row.try_get("error_code")?,
        error_message: row.try_get("error_message")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        attempts: row.try_get("attempts")?,
        locked_by: row.try_get("locked_by")?,
        heartbeat_at: row.try_get("heartbeat_at")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

/// A job to create.
pub struct NewJob {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub kind: JobKind,
    pub base_model: String,
    pub training_dataset_id: Uuid,
    pub validation_dataset_id: Option<Uuid>,
    pub suffix: Option<String>,
    pub seed: i64,
    pub hyperparameters: String,
}

/// Inserts a job in `validating_files`.
pub async fn insert(db: &Db, j: &NewJob) -> Result<Job, DbError> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, kind, status, base_model, training_dataset_id, \
         validation_dataset_id, suffix, seed, hyperparameters, created_at, updated_at) \
         VALUES ($1, $2, $3, 'validating_files', $4, $5, $6, $7, $8, $9, $10, $10)",
    )
    .bind(j.id.to_string())
    .bind(j.tenant_id.to_string())
    .bind(j.kind.as_str())
    .bind(&j.base_model)
    .bind(j.training_dataset_id.to_string())
    .bind(j.validation_dataset_id.map(|v| v.to_string()))
    .bind(&j.suffix)
    .bind(j.seed)
    .bind(&j.hyperparameters)
    .bind(now)
    .execute(db.pool())
    .await?;
    get_any(db, j.id)
        .await?
        .ok_or(DbError::Sqlx(sqlx::Error::RowNotFound))
}

/// One job of `tenant`.
pub async fn get(db: &Db, tenant: Uuid, id: Uuid) -> Result<Option<Job>, DbError> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM jobs WHERE id = $1 AND tenant_id = $2"
    ))
    .bind(id.to_string())
    .bind(tenant.to_string())
    .fetch_optional(db.pool())
    .await?
    .as_ref()
    .map(job_of)
    .transpose()
}

pub async fn get_any(db: &Db, id: Uuid) -> Result<Option<Job>, DbError> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM jobs WHERE id = $1"))
        .bind(id.to_string())
        .fetch_optional(db.pool())
        .await?
        .as_ref()
        .map(job_of)
        .transpose()
}

/// A page of `tenant`'s jobs, newest first, after the job `after` (exclusive).
pub async fn list(
    db: &Db,
    tenant: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Job>, DbError> {
    let rows = match after {
        None => {
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM jobs WHERE tenant_id = $1 ORDER BY seq DESC LIMIT $2"
            ))
            .bind(tenant.to_string())
            .bind(limit)
            .fetch_all(db.pool())
            .await?
        }
        Some(after) => {
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM jobs WHERE tenant_id = $1 \
                 AND seq < (SELECT seq FROM jobs WHERE id = $2 AND tenant_id = $1) \
                 ORDER BY seq DESC LIMIT $3"
            ))
            .bind(tenant.to_string())
            .bind(after.to_string())
            .bind(limit)
            .fetch_all(db.pool())
            .await?
        }
    };
    rows.iter().map(job_of).collect()
}

/// How many jobs will start before this one (0: it is next), over every tenant: they share the
/// device.
pub async fn queue_position(db: &Db, seq: i64) -> Result<i64, DbError> {
    Ok(sqlx::query(
        "SELECT COUNT(*) AS n FROM jobs WHERE status IN ('validating_files', 'queued') AND seq < $1",
    )
    .bind(seq)
    .fetch_one(db.pool())
    .await?
    .try_get("n")?)
}

/// Jobs waiting for their files to be checked, oldest first.
pub async fn validating(db: &Db, limit: i64) -> Result<Vec<Job>, DbError> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM jobs WHERE status = 'validating_files' ORDER BY seq LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(db.pool())
    .await?
    .iter()
    .map(job_of)
    .collect()
}

/// `validating_files` → `queued`; false if the job moved on meanwhile (cancelled, or another
/// process validated it).
pub async fn mark_queued(db: &Db, id: Uuid, total_steps: i64) -> Result<bool, DbError> {
    let n = sqlx::query(
        "UPDATE jobs SET status = 'queued', total_steps = $1, updated_at = $2 \
         WHERE id = $3 AND status = 'validating_files'",
    )
    .bind(total_steps)
    .bind(now_ms())
    .bind(id.to_string())
    .execute(db.pool())
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// `validating_files` → `failed`.
pub async fn fail_validation(
    db: &Db,
    id: Uuid,
    code: &str,
    message: &str,
) -> Result<bool, DbError> {
    let now = now_ms();
    let n = sqlx::query(
        "UPDATE jobs SET status = 'failed', error_code = $1, error_message = $2, finished_at = $3, \
         updated_at = $3 WHERE id = $4 AND status = 'validating_files'",
    )
    .bind(code)
    .bind(message)
    .bind(now)
    .bind(id.to_string())
    .execute(db.pool())
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// Claims the oldest queued job for `worker`, or `None` when the queue is empty.
pub async fn claim_next(db: &Db, worker: &str) -> Result<Option<Job>, DbError> {
    let pick = match db.kind() {
        Backend::Postgres => {
            "SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED"
        }
        // SQLite runs one writer at a time, so the statement is atomic as it is.
        Backend::Sqlite => "SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1",
    };
    let now = now_ms();
    let row = sqlx::query(&format!(
        "UPDATE jobs SET status = 'running', locked_by = $1, heartbeat_at = $2, \
         attempts = attempts + 1, started_at = COALESCE(started_at, $2), updated_at = $2 \
         WHERE status = 'queued' AND id = ({pick}) RETURNING {COLUMNS}"
    ))
    .bind(worker)
    .bind(now)
    .fetch_optional(db.pool())
    .await?;
    row.as_ref().map(job_of).transpose()
}

/// What a worker learns when it touches its job: whether it still holds it and whether a
/// cancel was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Held { cancel_requested: bool },
    Lost,
}

fn claim_of(row: Option<sqlx::any::AnyRow>) -> Result<Claim, DbError> {
    Ok(match row {
        None => Claim::Lost,
        Some(r) => Claim::Held {
            cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
        },
    })
}

pub async fn heartbeat(db: &Db, id: Uuid, worker: &str) -> Result<Claim, DbError> {
    let now = now_ms();
    let row = sqlx::query(
        "UPDATE jobs SET heartbeat_at = $1 WHERE id = $2 AND locked_by = $3 AND status = 'running' \
         RETURNING cancel_requested",
    )
    .bind(now)
    .bind(id.to_string())
    .bind(worker)
    .fetch_optional(db.pool())
    .await?;
    claim_of(row)
}

/// Writes progress (and beats the heart) while the worker holds the job.
pub async fn update_progress(
    db: &Db,
    id: Uuid,
    worker: &str,
    p: &JobProgress,
) -> Result<Claim, DbError> {
    let now = now_ms();
    let row = sqlx::query(
        "UPDATE jobs SET step = $1, total_steps = COALESCE($2, total_steps), epoch = $3, \
         train_loss = $4, valid_loss = COALESCE($5, valid_loss), \
         valid_token_accuracy = COALESCE($6, valid_token_accuracy), learning_rate = $7, \
         tokens_per_second = $8, eta_seconds = $9, trained_tokens = $10, heartbeat_at = $11, \
         updated_at = $11 WHERE id = $12 AND locked_by = $13 AND status = 'running' \
         RETURNING cancel_requested",
    )
    // sqlx 0.8's Any driver binds a NULL f64 as a PostgreSQL float4: a statement cached after
    // such a bind then rejects real f64 values. Re-preparing each time avoids that.
    .persistent(false)
    .bind(p.step)
    .bind(p.total_steps)
    .bind(p.epoch)
    .bind(p.train_loss)
    .bind(p.valid_loss)
    .bind(p.valid_token_accuracy)
    .bind(p.learning_rate)
    .bind(p.tokens_per_second)
    .bind(p.eta_seconds)
    .bind(p.trained_tokens)
    .bind(now)
    .bind(id.to_string())
    .bind(worker)
    .fetch_optional(db.pool())
    .await?;
    claim_of(row)
}

/// How a running job ended (other than success, which registers an adapter).
pub enum Finish<'a> {
    Failed {
        code: &'a str,
        message: &'a str,
    },
    Cancelled,
    /// Back to the queue (graceful shutdown): another claim resumes it from its checkpoint.
    Requeued,
}

/// Ends the job held by `worker`; false if the worker no longer held it.
pub async fn finish(db: &Db, id: Uuid, worker: &str, how: Finish<'_>) -> Result<bool, DbError> {
    let now = now_ms();
    let q = match how {
        Finish::Failed { code, message } => sqlx::query(
            "UPDATE jobs SET status = 'failed', error_code = $1, error_message = $2, \
             finished_at = $3, updated_at = $3, locked_by = NULL, eta_seconds = NULL \
             WHERE id = $4 AND locked_by = $5 AND status = 'running'",
        )
        .bind(code)
        .bind(message),
        Finish::Cancelled => sqlx::query(
            "UPDATE jobs SET status = 'cancelled', error_code = NULL, error_message = NULL, \
             finished_at = $1, updated_at = $1, locked_by = NULL, eta_seconds = NULL \
             WHERE id = $2 AND locked_by = $3 AND status = 'running'",
        ),
        Finish::Requeued => sqlx::query(
            "UPDATE jobs SET status = 'queued', updated_at = $1, locked_by = NULL, \
             heartbeat_at = NULL WHERE id = $2 AND locked_by = $3 AND status = 'running'",
        ),
    };
    let n = q
        .bind(now)
        .bind(id.to_string())
        .bind(worker)
        .execute(db.pool())
        .await?
        .rows_affected();
    Ok(n > 0)
}

/// Marks the job succeeded with its adapter, in the transaction that registers the adapter.
pub async fn succeed(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: Uuid,
    worker: &str,
    adapter: Uuid,
) -> Result<bool, DbError> {
    let now = now_ms();
    let n = sqlx::query(
        "UPDATE jobs SET status = 'succeeded', adapter_id = $1, finished_at = $2, updated_at = $2, \
         locked_by = NULL, eta_seconds = 0 WHERE id = $3 AND locked_by = $4 AND status = 'running'",
    )
    .bind(adapter.to_string())
    .bind(now)
    .bind(id.to_string())
    .bind(worker)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// What a cancel request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It had not started: cancelled at once.
    Cancelled,
    /// It is running: its worker stops it within a step.
    Requested,
    /// It had already ended with this status.
    AlreadyFinished(JobStatus),
    NotFound,
}

pub async fn request_cancel(db: &Db, tenant: Uuid, id: Uuid) -> Result<CancelOutcome, DbError> {
    let now = now_ms();
    let n = sqlx::query(
        "UPDATE jobs SET status = 'cancelled', finished_at = $1, updated_at = $1 \
         WHERE id = $2 AND tenant_id = $3 AND status IN ('validating_files', 'queued')",
    )
    .bind(now)
    .bind(id.to_string())
    .bind(tenant.to_string())
    .execute(db.pool())
    .await?
    .rows_affected();
    if n > 0 {
        return Ok(CancelOutcome::Cancelled);
    }
    let n = sqlx::query(
        "UPDATE jobs SET cancel_requested = 1, updated_at = $1 \
         WHERE id = $2 AND tenant_id = $3 AND status = 'running'",
    )
    .bind(now)
    .bind(id.to_string())
    .bind(tenant.to_string())
    .execute(db.pool())
    .await?
    .rows_affected();
    if n > 0 {
        return Ok(CancelOutcome::Requested);
    }
    Ok(match get(db, tenant, id).await? {
        Some(job) if job.status.is_terminal() => CancelOutcome::AlreadyFinished(job.status),
        // It moved between the statements (e.g. queued → running): ask again.
        Some(_) => Box::pin(request_cancel(db, tenant, id)).await?,
        None => CancelOutcome::NotFound,
    })
}

/// Puts running jobs whose worker stopped beating (or, with `None`, every running job) back in
/// the queue; they resume from their last checkpoint. Returns their ids.
pub async fn requeue_stale(db: &Db, heartbeat_before: Option<i64>) -> Result<Vec<Uuid>, DbError> {
    let now = now_ms();
    let rows = match heartbeat_before {
        Some(before) => {
            sqlx::query(
                "UPDATE jobs SET status = 'queued', locked_by = NULL, heartbeat_at = NULL, \
                 updated_at = $1 WHERE status = 'running' \
                 AND (heartbeat_at IS NULL OR heartbeat_at < $2) RETURNING id",
            )
            .bind(now)
            .bind(before)
            .fetch_all(db.pool())
            .await?
        }
        None => {
            sqlx::query(
                "UPDATE jobs SET status = 'queued', locked_by = NULL, heartbeat_at = NULL, \
                 updated_at = $1 WHERE status = 'running' RETURNING id",
            )
            .bind(now)
            .fetch_all(db.pool())
            .await?
        }
    };
    rows.iter().map(|r| uuid_col(r, "id", "jobs")).collect()
}

/// Whether a job of `tenant` that has not failed or been cancelled already uses `suffix` as
/// its adapter name.
pub async fn suffix_in_use(db: &Db, tenant: Uuid, suffix: &str) -> Result<bool, DbError> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n FROM jobs WHERE tenant_id = $1 AND suffix = $2 \
         AND status IN ('validating_files', 'queued', 'running')",
    )
    .bind(tenant.to_string())
    .bind(suffix)
    .fetch_one(db.pool())
    .await?;
    Ok(row.try_get::<i64, _>("n")? > 0)
}

/// Job counts by status (every tenant), for metrics.
pub async fn count_by_status(db: &Db) -> Result<Vec<(JobStatus, i64)>, DbError> {
    let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        .fetch_all(db.pool())
        .await?;
    let mut out: Vec<(JobStatus, i64)> = JobStatus::ALL.iter().map(|&s| (s, 0)).collect();
    for r in rows {
        let status: String = r.try_get("status")?;
        let n: i64 = r.try_get("n")?;
        if let Some(slot) = out.iter_mut().find(|(s, _)| s.as_str() == status) {
            slot.1 = n;
        }
    }
    Ok(out)
}

/// A checkpoint a job wrote, stored under `store_key` (a directory prefix).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRow {
    pub id: Uuid,
    pub job_id: Uuid,
    pub step: i64,
    pub train_loss: Option<f64>,
    pub valid_loss: Option<f64>,
    pub store_key: String,
    pub created_at: i64,
}

fn checkpoint_of(row: &sqlx::any::AnyRow) -> Result<CheckpointRow, DbError> {
    Ok(CheckpointRow {
        id: uuid_col(row, "id", "checkpoints")?,
        job_id: uuid_col(row, "job_id", "checkpoints")?,
        step: row.try_get("step")?,
        train_loss: row.try_get("train_loss")?,
        valid_loss: row.try_get("valid_loss")?,
        store_key: row.try_get("store_key")?,
        created_at: row.try_get("created_at")?,
    })
}

pub async fn insert_checkpoint(db: &Db, c: &CheckpointRow) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO checkpoints (id, job_id, step, train_loss, valid_loss, store_key, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (job_id, step) DO UPDATE SET \
         train_loss = excluded.train_loss, valid_loss = excluded.valid_loss, \
         store_key = excluded.store_key, created_at = excluded.created_at",
    )
    // See `update_progress`: optional f64 binds.
    .persistent(false)
    .bind(c.id.to_string())
    .bind(c.job_id.to_string())
    .bind(c.step)
    .bind(c.train_loss)
    .bind(c.valid_loss)
    .bind(&c.store_key)
    .bind(c.created_at)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// A job's checkpoints by step.
pub async fn checkpoints(db: &Db, job: Uuid) -> Result<Vec<CheckpointRow>, DbError> {
    sqlx::query(
        "SELECT id, job_id, step, train_loss, valid_loss, store_key, created_at FROM checkpoints \
         WHERE job_id = $1 ORDER BY step",
    )
    .bind(job.to_string())
    .fetch_all(db.pool())
    .await?
    .iter()
    .map(checkpoint_of)
    .collect()
}

/// Jobs of `tenant` waiting or running.
pub async fn count_active(db: &Db, tenant: Uuid) -> Result<i64, DbError> {
    Ok(sqlx::query(
        "SELECT COUNT(*) AS n FROM jobs WHERE tenant_id = $1 \
         AND status IN ('validating_files', 'queued', 'running')",
    )
    .bind(tenant.to_string())
    .fetch_one(db.pool())
    .await?
    .try_get("n")?)
}
