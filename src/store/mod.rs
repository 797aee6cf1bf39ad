//! The artifact store: dataset files, checkpoints and adapters, addressed by keys that the
//! server builds from ids (never from user-supplied names). A local directory by default
//! (`local.rs`), or an S3-compatible bucket (`s3.rs`) that many replicas share. Every write is
//! atomic: readers see a whole file or none.

mod local;
mod s3;

pub use local::LocalStore;
pub use s3::S3Store;

use async_trait::async_trait;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("artifact `{0}` does not exist")]
    NotFound(String),
    #[error("invalid artifact key `{0}`")]
    BadKey(String),
    #[error("artifact store I/O on `{key}`: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("object store on `{key}`: {detail}")]
    Remote { key: String, detail: String },
    #[error("invalid store location `{0}`: use a directory or s3://bucket[/prefix]")]
    BadLocation(String),
}

/// Where artifacts live. Keys are `/`-separated relative paths such as
/// `datasets/<id>.jsonl` or `adapters/<id>/adapter_model.safetensors`.
#[async_trait]
pub trait ArtifactStore: Send + Sync {
    /// Stores the local file `src` under `key` (replacing any previous one); `src` may be moved.
    async fn put_file(&self, key: &str, src: &Path) -> Result<u64, StoreError>;
    /// Copies the artifact `key` to the local path `dest`.
    async fn get_file(&self, key: &str, dest: &Path) -> Result<(), StoreError>;
    async fn read(&self, key: &str) -> Result<Vec<u8>, StoreError>;
    async fn exists(&self, key: &str) -> Result<bool, StoreError>;
    /// Removes every artifact whose key starts with `prefix` (a key or a `dir/` prefix).
    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError>;
    /// A human description for logs and readiness (`dir:/data/store`, `s3://bucket/prefix`).
    fn describe(&self) -> String;
}

/// Checks a key's shape: relative, `/`-separated, plain characters, no `.`/`..` parts and
/// nothing in the temporary area. A prefix may end with `/`.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let body = key.strip_suffix('/').unwrap_or(key);
    let ok = !body.is_empty()
        && !body.starts_with('/')
        && body.split('/').all(|part| {
            !part.is_empty() && part != "." && part != ".." && !part.starts_with(".tmp")
        })
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadKey(key.to_string()))
    }
}

/// Opens the store at `location`: `s3://bucket[/prefix]` (credentials and endpoint from the
/// usual `AWS_*` variables), or a directory.
pub fn open(location: &str) -> Result<Arc<dyn ArtifactStore>, StoreError> {
    match location.strip_prefix("s3://") {
        Some(rest) => {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StoreError::BadLocation(location.to_string()));
            }
            Ok(Arc::new(S3Store::from_env(bucket, prefix)?))
        }
        None => Ok(Arc::new(LocalStore::open(Path::new(location))?)),
    }
}

/// Store keys, built in one place from ids.
pub mod keys {
    use uuid::Uuid;

    pub fn dataset(id: Uuid) -> String {
        format!("datasets/{id}.jsonl")
    }

    pub fn adapter_dir(id: Uuid) -> String {
        format!("adapters/{id}/")
    }

    pub fn adapter_file(id: Uuid, file: &str) -> String {
        format!("adapters/{id}/{file}")
    }

    pub fn checkpoint_dir(job: Uuid, step: usize) -> String {
        format!("jobs/{job}/checkpoints/step-{step:08}/")
    }

    pub fn job_dir(job: Uuid) -> String {
        format!("jobs/{job}/")
    }
}
