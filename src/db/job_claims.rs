//! The worker side of the queue: claim the oldest queued job, keep the claim with heartbeats and
//! progress writes, end the job only while holding it, and put the jobs of workers that stopped
//! beating back in the queue.

use super::jobs::{job_of, Job, JobProgress, COLUMNS};
use super::{now_ms, uuid_col, Backend, Db, DbError};
use sqlx::Row;
use uuid::Uuid;

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

/// What a succeeded job produced.
#[derive(Debug, Clone, Copy)]
pub enum JobResult {
    /// A training job's adapter.
    Adapter(Uuid),
    /// A Self-Instruct job's dataset.
    Dataset(Uuid),
}

/// Marks the job succeeded with its result, in the transaction that registers that result.
pub async fn succeed(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: Uuid,
    worker: &str,
    result: JobResult,
) -> Result<bool, DbError> {
    let (column, result) = match result {
        JobResult::Adapter(id) => ("adapter_id", id),
        JobResult::Dataset(id) => ("result_dataset_id", id),
    };
    let n = sqlx::query(&format!(
        "UPDATE jobs SET status = 'succeeded', {column} = $1, finished_at = $2, updated_at = $2, \
         locked_by = NULL, eta_seconds = 0 WHERE id = $3 AND locked_by = $4 AND status = 'running'"
    ))
    .bind(result.to_string())
    .bind(now_ms())
    .bind(id.to_string())
    .bind(worker)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n > 0)
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
