//! Artifacts as files under one directory (which several servers may share as a volume):
//! writes go to a temporary file, are synced, then renamed into place.

use super::{check_key, ArtifactStore, StoreError};
use async_trait::async_trait;
use std::path::{Path, PathBuf};

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
        check_key(key)?;
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
