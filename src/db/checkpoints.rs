//! The checkpoints table: what a job wrote, by step (the files are in the artifact store).

use super::{uuid_col, Db, DbError};
use sqlx::Row;
use uuid::Uuid;

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
