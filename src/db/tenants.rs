//! Tenants and their API keys. Keys are stored as SHA-256 hashes (they are long random
//! strings, so a fast hash is enough); the plain key exists only in the reply that creates it.

use super::{now_ms, uuid_col, Db, DbError};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::Row;
use uuid::Uuid;

/// What every API key starts with (so a leaked one is recognizable).
pub const KEY_PREFIX: &str = "ts-";

#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub id: Uuid,
    pub name: String,
    pub created_at: i64,
}

/// A freshly created key: the only time the plain text exists.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: Uuid,
    pub key: String,
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn generate_key() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

fn tenant_of(row: &sqlx::any::AnyRow) -> Result<Tenant, DbError> {
    Ok(Tenant {
        id: uuid_col(row, "id", "tenants")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
    })
}

pub async fn create(db: &Db, name: &str) -> Result<(Tenant, NewKey), DbError> {
    let tenant = Tenant {
        id: Uuid::new_v4(),
        name: name.to_string(),
        created_at: now_ms(),
    };
    let mut tx = db.pool().begin().await?;
    sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
        .bind(tenant.id.to_string())
        .bind(&tenant.name)
        .bind(tenant.created_at)
        .execute(&mut *tx)
        .await?;
    let key = insert_key(&mut tx, tenant.id).await?;
    tx.commit().await?;
    Ok((tenant, key))
}

async fn insert_key(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    tenant: Uuid,
) -> Result<NewKey, DbError> {
    let key = generate_key();
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id.to_string())
    .bind(tenant.to_string())
    .bind(hash_key(&key))
    .bind(key[..KEY_PREFIX.len() + 6].to_string())
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(NewKey { id, key })
}

/// Creates the first tenant exactly once across every process sharing the database; `None`
/// when it was done before.
pub async fn bootstrap(db: &Db, name: &str) -> Result<Option<(Tenant, NewKey)>, DbError> {
    let claimed = sqlx::query(
        "INSERT INTO bootstrap (key, created_at) VALUES ('first_tenant', $1) ON CONFLICT (key) DO NOTHING",
    )
    .bind(now_ms())
    .execute(db.pool())
    .await?
    .rows_affected();
    if claimed == 0 {
        return Ok(None);
    }
    let existing: i64 = sqlx::query("SELECT COUNT(*) AS n FROM tenants")
        .fetch_one(db.pool())
        .await?
        .try_get("n")?;
    if existing > 0 {
        return Ok(None);
    }
    create(db, name).await.map(Some)
}

pub async fn list(db: &Db) -> Result<Vec<Tenant>, DbError> {
    sqlx::query("SELECT id, name, created_at FROM tenants ORDER BY created_at, id")
        .fetch_all(db.pool())
        .await?
        .iter()
        .map(tenant_of)
        .collect()
}

pub async fn get(db: &Db, id: Uuid) -> Result<Option<Tenant>, DbError> {
    sqlx::query("SELECT id, name, created_at FROM tenants WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(db.pool())
        .await?
        .as_ref()
        .map(tenant_of)
        .transpose()
}

/// Deletes the tenant and (by cascade) its keys, datasets, jobs and adapters rows.
pub async fn delete(db: &Db, id: Uuid) -> Result<bool, DbError> {
    let n = sqlx::query("DELETE FROM tenants WHERE id = $1")
        .bind(id.to_string())
        .execute(db.pool())
        .await?
        .rows_affected();
    Ok(n > 0)
}

/// Issues a new key; with `revoke_existing`, every older key stops working at once.
pub async fn rotate_key(db: &Db, tenant: Uuid, revoke_existing: bool) -> Result<NewKey, DbError> {
    let mut tx = db.pool().begin().await?;
    if revoke_existing {
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE tenant_id = $2 AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(tenant.to_string())
        .execute(&mut *tx)
        .await?;
    }
    let key = insert_key(&mut tx, tenant).await?;
    tx.commit().await?;
    Ok(key)
}

/// The tenant a plain API key belongs to, if the key is valid and not revoked.
pub async fn by_key(db: &Db, key: &str) -> Result<Option<Tenant>, DbError> {
    sqlx::query(
        "SELECT t.id, t.name, t.created_at FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
         WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
    )
    .bind(hash_key(key))
    .fetch_optional(db.pool())
    .await?
    .as_ref()
    .map(tenant_of)
    .transpose()
}
