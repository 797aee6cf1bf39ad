//! The adapter registry: metadata here, the PEFT files in the artifact store. A name, when
//! given, is unique within the tenant and works wherever an id does.

use super::{now_ms, opt_uuid_col, uuid_col, Db, DbError};
use sqlx::Row;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq)]
pub struct AdapterRow {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: Option<String>,
    /// `job` (trained here) or `import`.
    pub source: String,
    pub job_id: Option<Uuid>,
    pub base_model: String,
    pub lora_r: i64,
    pub lora_alpha: f64,
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    pub parameters: i64,
    pub bytes: i64,
    /// Directory prefix in the store holding `adapter_config.json` and the weights.
    pub store_key: String,
    pub created_at: i64,
}

const COLUMNS: &str = "id, tenant_id, name, source, job_id, base_model, lora_r, lora_alpha, \
    target_modules, use_rslora, parameters, bytes, store_key, created_at";

fn adapter_of(row: &sqlx::any::AnyRow) -> Result<AdapterRow, DbError> {
    let targets: String = row.try_get("target_modules")?;
    Ok(AdapterRow {
        id: uuid_col(row, "id", "adapters")?,
        tenant_id: uuid_col(row, "tenant_id", "adapters")?,
        name: row.try_get("name")?,
        source: row.try_get("source")?,
        job_id: opt_uuid_col(row, "job_id", "adapters")?,
        base_model: row.try_get("base_model")?,
        lora_r: row.try_get("lora_r")?,
        lora_alpha: row.try_get("lora_alpha")?,
        target_modules: serde_json::from_str(&targets).map_err(|e| DbError::Corrupt {
            table: "adapters",
            detail: format!("target_modules: {e}"),
        })?,
        use_rslora: row.try_get::<i64, _>("use_rslora")? != 0,
        parameters: row.try_get("parameters")?,
        bytes: row.try_get("bytes")?,
        store_key: row.try_get("store_key")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Inserts within `tx` (registration happens together with the job's success).
pub async fn insert(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    a: &AdapterRow,
) -> Result<(), DbError> {
    sqlx::query(&format!(
        "INSERT INTO adapters ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
    ))
    .bind(a.id.to_string())
    .bind(a.tenant_id.to_string())
    .bind(&a.name)
    .bind(&a.source)
    .bind(a.job_id.map(|j| j.to_string()))
    .bind(&a.base_model)
    .bind(a.lora_r)
    .bind(a.lora_alpha)
    .bind(serde_json::to_string(&a.target_modules).unwrap_or_else(|_| "[]".into()))
    .bind(i64::from(a.use_rslora))
    .bind(a.parameters)
    .bind(a.bytes)
    .bind(&a.store_key)
    .bind(if a.created_at == 0 { now_ms() } else { a.created_at })
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// `tenant`'s adapter by id or by name.
pub async fn resolve(
    db: &Db,
    tenant: Uuid,
    id_or_name: &str,
) -> Result<Option<AdapterRow>, DbError> {
    let row = match Uuid::parse_str(id_or_name) {
        Ok(id) => {
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM adapters WHERE tenant_id = $1 AND (id = $2 OR name = $3)"
            ))
            .bind(tenant.to_string())
            .bind(id.to_string())
            .bind(id_or_name)
            .fetch_optional(db.pool())
            .await?
        }
        Err(_) => {
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM adapters WHERE tenant_id = $1 AND name = $2"
            ))
            .bind(tenant.to_string())
            .bind(id_or_name)
            .fetch_optional(db.pool())
            .await?
        }
    };
    row.as_ref().map(adapter_of).transpose()
}

pub async fn name_taken(db: &Db, tenant: Uuid, name: &str) -> Result<bool, DbError> {
    let row = sqlx::query("SELECT COUNT(*) AS n FROM adapters WHERE tenant_id = $1 AND name = $2")
        .bind(tenant.to_string())
        .bind(name)
        .fetch_one(db.pool())
        .await?;
    Ok(row.try_get::<i64, _>("n")? > 0)
}

/// Newest first.
pub async fn list(db: &Db, tenant: Uuid) -> Result<Vec<AdapterRow>, DbError> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM adapters WHERE tenant_id = $1 ORDER BY created_at DESC, id"
    ))
    .bind(tenant.to_string())
    .fetch_all(db.pool())
    .await?
    .iter()
    .map(adapter_of)
    .collect()
}

/// The adapters' store prefixes of a tenant (to clean the store when the tenant goes).
pub async fn store_keys_of_tenant(db: &Db, tenant: Uuid) -> Result<Vec<String>, DbError> {
    let rows = sqlx::query("SELECT store_key FROM adapters WHERE tenant_id = $1")
        .bind(tenant.to_string())
        .fetch_all(db.pool())
        .await?;
    rows.iter()
        .map(|r| r.try_get("store_key").map_err(DbError::from))
        .collect()
}

pub async fn delete(db: &Db, tenant: Uuid, id: Uuid) -> Result<bool, DbError> {
    let n = sqlx::query("DELETE FROM adapters WHERE id = $1 AND tenant_id = $2")
        .bind(id.to_string())
        .bind(tenant.to_string())
        .execute(db.pool())
        .await?
        .rows_affected();
    Ok(n > 0)
}
