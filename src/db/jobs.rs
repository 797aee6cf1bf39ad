//! Jobs: the table is the queue. Jobs are claimed in creation order (`seq`) inside one
//! statement (`FOR UPDATE SKIP LOCKED` on PostgreSQL), the claimer's id goes in `locked_by`,
//! a heartbeat keeps the claim alive, and a job is finished only by the worker holding it.

use super::{now_ms, opt_uuid_col, uuid_col, Db, DbError};

pub use super::checkpoints::{checkpoints, insert_checkpoint, CheckpointRow};
pub use super::job_claims::{
    claim_next, finish, heartbeat, requeue_stale, succeed, update_progress, Claim, Finish,
    JobResult,
};
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
    /// Trains a LoRA adapter.
    FineTune,
    /// Grows a dataset from seed tasks (`POST /datasets/generate`).
    SelfInstruct,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FineTune => "fine_tune",
            Self::SelfInstruct => "self_instruct",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "fine_tune" => Some(Self::FineTune),
            "self_instruct" => Some(Self::SelfInstruct),
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
    /// The dataset a Self-Instruct job produced.
    pub result_dataset_id: Option<Uuid>,
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

pub(super) const COLUMNS: &str =
    "seq, id, tenant_id, kind, status, base_model, training_dataset_id, \
    validation_dataset_id, suffix, seed, hyperparameters, total_steps, step, epoch, train_loss, \
    valid_loss, valid_token_accuracy, learning_rate, tokens_per_second, eta_seconds, \
    trained_tokens, adapter_id, result_dataset_id, error_code, error_message, cancel_requested, \
    attempts, locked_by, heartbeat_at, created_at, started_at, finished_at";

pub(super) fn job_of(row: &sqlx::any::AnyRow) -> Result<Job, DbError> {
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
        result_dataset_id: opt_uuid_col(row, "result_dataset_id", "jobs")?,
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

/// Whether a job of `tenant` that has not failed or been cancelled already uses `suffix` as
/// its adapter name.
pub async fn suffix_in_use(db: &Db, tenant: Uuid, suffix: &str) -> Result<bool, DbError> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n FROM jobs WHERE tenant_id = $1 AND suffix = $2 AND kind = 'fine_tune' \
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
