//! Uploads streamed to a scratch file: size-limited as they arrive (413 past the limit, without
//! reading the rest), hashed on the way, removed when dropped.

use crate::error::ApiError;
use axum::body::Body;
use axum::extract::multipart::Field;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// A file being received; deleted when dropped (the store keeps its own copy).
pub struct Upload {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Sink {
    upload: Upload,
    file: tokio::fs::File,
    hasher: Sha256,
    limit: u64,
}

impl Sink {
    async fn create(dir: &Path, limit: u64) -> Result<Self, ApiError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(ApiError::internal)?;
        let path = dir.join(format!("upload-{}", uuid::Uuid::new_v4().simple()));
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(ApiError::internal)?;
        Ok(Self {
            upload: Upload {
                path,
                bytes: 0,
                sha256: String::new(),
            },
            file,
            hasher: Sha256::new(),
            limit,
        })
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), ApiError> {
        self.upload.bytes += chunk.len() as u64;
        if self.upload.bytes > self.limit {
            return Err(ApiError::TooLarge { limit: self.limit });
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk).await.map_err(ApiError::internal)
    }

    async fn finish(mut self) -> Result<Upload, ApiError> {
        self.file.flush().await.map_err(ApiError::internal)?;
        self.file.sync_all().await.map_err(ApiError::internal)?;
        self.upload.sha256 = hex::encode(std::mem::take(&mut self.hasher).finalize());
        Ok(self.upload)
    }
}

fn read_error(e: impl std::fmt::Display) -> ApiError {
    let text = e.to_string();
    // axum reports a body over its own limit as a length error.
    if text.contains("length limit") {
        return ApiError::TooLarge { limit: 0 };
    }
    ApiError::BadRequest {
        code: "upload_interrupted",
        message: format!("reading the upload failed: {text}"),
        param: None,
    }
}

/// Streams a raw request body into a scratch file under `dir`.
pub async fn body_to_file(body: Body, dir: &Path, limit: u64) -> Result<Upload, ApiError> {
    let mut sink = Sink::create(dir, limit).await?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(read_error)?;
        sink.write(&chunk).await?;
    }
    sink.finish().await
}

/// Streams one multipart field into a scratch file under `dir`.
pub async fn field_to_file(
    mut field: Field<'_>,
    dir: &Path,
    limit: u64,
) -> Result<Upload, ApiError> {
    let mut sink = Sink::create(dir, limit).await?;
    while let Some(chunk) = field.chunk().await.map_err(read_error)? {
        sink.write(&chunk).await?;
    }
    sink.finish().await
}

/// The essence of a Content-Type header (`multipart/form-data`), lower-cased.
pub fn content_type(headers: &axum::http::HeaderMap) -> (String, String) {
    let full = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let essence = full
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    (essence, full)
}
