//! The artifact store: dataset files, checkpoints and adapters, addressed by keys that the
//! server builds from ids (never from user-supplied names). A local directory by default; the
//! trait lets an S3-compatible store follow. Every write is atomic: readers see a whole file or
//! none.

use async_trait::async_trait;
use std::path::{Path, PathBuf};

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
    /// A human description for logs and readiness (`dir:/data/store`).
    fn describe(&self) -> String;
}

/// Artifacts as files under one directory.
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root.join(".tmp")).map_err(|source| StoreError::Io {
            key: root.display().to_string(),
            source,
        })?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        let ok = !key.is_empty()
            && !key.starts_with('/')
            && key.split('/').all(|part| {
                !part.is_empty() && part != "." && part != ".." && !part.starts_with(".tmp")
            })
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !ok {
            return Err(StoreError::BadKey(key.to_string()));
        }
        Ok(self.root.join(key))
    }

    fn tmp_path(&self) -> PathBuf {
        self.root
            .join(".tmp")
            .join(uuid::Uuid::new_v4().simple().to_string())
    }
}

fn io_err(key: &str) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            StoreError::NotFound(key.to_string())
        } else {
            StoreError::Io {
                key: key.to_string(),
                source,
            }
        }
    }
}

#[async_trait]
impl ArtifactStore for LocalStore {
    async fn put_file(&self, key: &str, src: &Path) -> Result<u64, StoreError> {
        let dest = self.path_of(key)?;
        let tmp = self.tmp_path();
        let src = src.to_path_buf();
        let key_owned = key.to_string();
        tokio::task::spawn_blocking(move || -> Result<u64, StoreError> {
            let key = key_owned.as_str();
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(key))?;
            }
            let bytes = std::fs::copy(&src, &tmp).map_err(io_err(key))?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io_err(key))?;
            std::fs::rename(&tmp, &dest).map_err(io_err(key))?;
            Ok(bytes)
        })
        .await
        .map_err(|e| StoreError::Io {
            key: key.to_string(),
            source: std::io::Error::other(e),
        })?
    }

    async fn get_file(&self, key: &str, dest: &Path) -> Result<(), StoreError> {
        let src = self.path_of(key)?;
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io_err(key))?;
        }
        tokio::fs::copy(&src, dest).await.map_err(io_err(key))?;
        Ok(())
    }

    async fn read(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path_of(key)?;
        tokio::fs::read(&path).await.map_err(io_err(key))
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path_of(key)?;
        Ok(tokio::fs::try_exists(&path).await.unwrap_or(false))
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let path = self.path_of(prefix.trim_end_matches('/'))?;
        let result = if prefix.ends_with('/') {
            tokio::fs::remove_dir_all(&path).await
        } else {
            tokio::fs::remove_file(&path).await
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                key: prefix.to_string(),
                source,
            }),
        }
    }

    fn describe(&self) -> String {
        format!("dir:{}", self.root.display())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_are_whole_and_keys_are_confined() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let src = dir.path().join("src.txt");
        std::fs::write(&src, b"hello").unwrap();
        assert_eq!(store.put_file("a/b.txt", &src).await.unwrap(), 5);
        assert_eq!(store.read("a/b.txt").await.unwrap(), b"hello");
        assert!(store.exists("a/b.txt").await.unwrap());
        for bad in ["../x", "/etc/passwd", "a//b", "a/../b", ".tmp/x", "a b", ""] {
            assert!(
                matches!(store.read(bad).await, Err(StoreError::BadKey(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            store.read("a/missing").await,
            Err(StoreError::NotFound(_))
        ));
        store.delete_prefix("a/").await.unwrap();
        assert!(!store.exists("a/b.txt").await.unwrap());
        // Nothing half-written is left behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join(".tmp")).unwrap().count(),
            0
        );
    }
}
