//! Uploaded datasets: metadata here, the file itself in the artifact store.

use super::{uuid_col, Db, DbError};
use sqlx::Row;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub id: Uuid,
    pub tenant_id: Uuid,
    /// The name the client gave (display only; never used as a path).
    pub filename: String,
    /// `instruction`, `messages` or `prompt_completion`.
    pub format: String,
    pub rows: i64,
    pub bytes: i64,
    pub sha256: String,
    pub store_key: String,
    pub created_at: i64,
}

const COLUMNS: &str =
    "id, tenant_id, filename, format, row_count, bytes, sha256, store_key, created_at";

fn dataset_of(row: &sqlx::any::AnyRow) -> Result<Dataset, DbError> {
    Ok(Dataset {
        id: uuid_col(row, "id", "datasets")?,
        tenant_id: uuid_col(row, "tenant_id", "datasets")?,
        filename: row.try_get("filename")?,
        format: row.try_get("format")?,
        rows: row.try_get("row_count")?,
        bytes: row.try_get("bytes")?,
        sha256: row.try_get("sha256")?,
        store_key: row.try_get("store_key")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Inserts with `exec` (the pool, or a transaction that registers it together with a job's end).
pub async fn insert<'c, E>(exec: E, d: &Dataset) -> Result<(), DbError>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    sqlx::query(&format!(
        "INSERT INTO datasets ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    ))
    .bind(d.id.to_string())
    .bind(d.tenant_id.to_string())
    .bind(&d.filename)
    .bind(&d.format)
    .bind(d.rows)
    .bind(d.bytes)
    .bind(&d.sha256)
    .bind(&d.store_key)
    .bind(d.created_at)
    .execute(exec)
    .await?;
    Ok(())
}

/// One dataset of `tenant` (another tenant's id is as good as unknown).
pub async fn get(db: &Db, tenant: Uuid, id: Uuid) -> Result<Option<Dataset>, DbError> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM datasets WHERE id = $1 AND tenant_id = $2"
    ))
    .bind(id.to_string())
    .bind(tenant.to_string())
    .fetch_optional(db.pool())
    .await?
    .as_ref()
    .map(dataset_of)
    .transpose()
}

/// Any tenant's dataset, for the job runner.
pub async fn get_any(db: &Db, id: Uuid) -> Result<Option<Dataset>, DbError> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM datasets WHERE id = $1"))
        .bind(id.to_string())
        .fetch_optional(db.pool())
        .await?
        .as_ref()
        .map(dataset_of)
        .transpose()
}

/// Newest first.
pub async fn list(db: &Db, tenant: Uuid) -> Result<Vec<Dataset>, DbError> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM datasets WHERE tenant_id = $1 ORDER BY created_at DESC, id"
    ))
    .bind(tenant.to_string())
    .fetch_all(db.pool())
    .await?
    .iter()
    .map(dataset_of)
    .collect()
}

pub async fn list_all_keys(db: &Db, tenant: Uuid) -> Result<Vec<String>, DbError> {
    let rows = sqlx::query("SELECT store_key FROM datasets WHERE tenant_id = $1")
        .bind(tenant.to_string())
        .fetch_all(db.pool())
        .await?;
    rows.iter()
        .map(|r| r.try_get("store_key").map_err(DbError::from))
        .collect()
}

/// Why a delete did not happen.
#[derive(Debug, PartialEq)]
pub enum DeleteOutcome {
    Deleted(Dataset),
    NotFound,
    /// A job that has not finished uses it.
    InUse(Uuid),
}

/// Deletes unless a job still waiting or running uses the dataset; the check and the delete
/// happen in one statement, so a job created meanwhile cannot slip between them.
pub async fn delete(db: &Db, tenant: Uuid, id: Uuid) -> Result<DeleteOutcome, DbError> {
    let Some(d) = get(db, tenant, id).await? else {
        return Ok(DeleteOutcome::NotFound);
    };
    let n = sqlx::query(
        "DELETE FROM datasets WHERE id = $1 AND tenant_id = $2 AND NOT EXISTS (\
           SELECT 1 FROM jobs WHERE status IN ('validating_files', 'queued', 'running') \
           AND (training_dataset_id = $1 OR validation_dataset_id = $1))",
    )
    .bind(id.to_string())
    .bind(tenant.to_string())
    .execute(db.pool())
    .await?
    .rows_affected();
    if n > 0 {
        return Ok(DeleteOutcome::Deleted(d));
    }
    let job = sqlx::query(
        "SELECT id FROM jobs WHERE status IN ('validating_files', 'queued', 'running') \
         AND (training_dataset_id = $1 OR validation_dataset_id = $1) ORDER BY seq LIMIT 1",
    )
    .bind(id.to_string())
    .fetch_optional(db.pool())
    .await?;
    Ok(match job {
        Some(row) => DeleteOutcome::InUse(uuid_col(&row, "id", "jobs")?),
        // Deleted by a concurrent request.
        None => DeleteOutcome::NotFound,
    })
}
