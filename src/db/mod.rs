//! The database: SQLite by default (a file in the data directory), PostgreSQL for scale-out.
//! One pool type (sqlx `Any`) and one set of portable queries serve both; the schema has one
//! migration directory per backend. Ids are UUID text, times are unix milliseconds.

pub mod adapters;
mod checkpoints;
pub mod datasets;
pub mod events;
mod job_claims;
pub mod jobs;
pub mod tenants;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported DATABASE_URL `{0}`: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row in `{table}`: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A connection pool to one of the supported backends.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

impl Db {
    /// Connects and brings the schema up to date.
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(DbError::UnsupportedUrl(url.to_string()));
        };
        let pool = match backend {
            // Writers wait for each other instead of failing; WAL lets readers run meanwhile.
            Backend::Sqlite => {
                AnyPoolOptions::new()
                    .max_connections(8)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute(
                                "PRAGMA busy_timeout = 15000; PRAGMA journal_mode = WAL; \
                             PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect(url)
                    .await?
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await?
            }
        };
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        Ok(Self { pool, backend })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn kind(&self) -> Backend {
        self.backend
    }

    /// A round trip to the server (for readiness).
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    pub async fn close(&self) {
        self.pool.close().await
    }
}

/// Now, in unix milliseconds (the unit of every time column).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Reads a UUID stored as text.
fn uuid_col(row: &AnyRow, col: &str, table: &'static str) -> Result<uuid::Uuid, DbError> {
    use sqlx::Row;
    let text: String = row.try_get(col)?;
    uuid::Uuid::parse_str(&text).map_err(|e| DbError::Corrupt {
        table,
        detail: format!("`{col}` = `{text}`: {e}"),
    })
}

fn opt_uuid_col(
    row: &AnyRow,
    col: &str,
    table: &'static str,
) -> Result<Option<uuid::Uuid>, DbError> {
    use sqlx::Row;
    let text: Option<String> = row.try_get(col)?;
    text.map(|t| {
        uuid::Uuid::parse_str(&t).map_err(|e| DbError::Corrupt {
            table,
            detail: format!("`{col}` = `{t}`: {e}"),
        })
    })
    .transpose()
}
