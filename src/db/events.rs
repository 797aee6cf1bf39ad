//! A job's event log: messages and per-step metrics, in order.

use super::{now_ms, uuid_col, Db, DbError};
use sqlx::Row;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "warn" => Self::Warn,
            "error" => Self::Error,
            _ => Self::Info,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// Something happened (started, checkpoint written, finished…).
    Message,
    /// Numbers from one training step (`data` holds them).
    Metrics,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: i64,
    pub job_id: Uuid,
    pub created_at: i64,
    pub level: Level,
    pub kind: EventType,
    pub message: String,
    pub data: Option<serde_json::Value>,
}

pub async fn insert(
    db: &Db,
    job: Uuid,
    level: Level,
    kind: EventType,
    message: &str,
    data: Option<&serde_json::Value>,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO job_events (job_id, created_at, level, event_type, message, data) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(job.to_string())
    .bind(now_ms())
    .bind(level.as_str())
    .bind(match kind {
        EventType::Message => "message",
        EventType::Metrics => "metrics",
    })
    .bind(message)
    .bind(data.map(|d| d.to_string()))
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Up to `limit` events of `job` after `after_seq`, oldest first.
pub async fn list(db: &Db, job: Uuid, after_seq: i64, limit: i64) -> Result<Vec<Event>, DbError> {
    let rows = sqlx::query(
        "SELECT seq, job_id, created_at, level, event_type, message, data FROM job_events \
         WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(job.to_string())
    .bind(after_seq)
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            let kind: String = r.try_get("event_type")?;
            let level: String = r.try_get("level")?;
            let data: Option<String> = r.try_get("data")?;
            Ok(Event {
                seq: r.try_get("seq")?,
                job_id: uuid_col(r, "job_id", "job_events")?,
                created_at: r.try_get("created_at")?,
                level: Level::parse(&level),
                kind: if kind == "metrics" {
                    EventType::Metrics
                } else {
                    EventType::Message
                },
                message: r.try_get("message")?,
                data: data.and_then(|d| serde_json::from_str(&d).ok()),
            })
        })
        .collect()
}
