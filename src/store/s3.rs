//! Artifacts in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2, …) through `object_store`, so
//! every replica reads what any replica wrote. Credentials, region and endpoint come from the
//! usual variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`,
//! `AWS_ALLOW_HTTP` for a plain-HTTP endpoint). An object PUT is atomic; large files go up in
//! parts and appear only when the upload completes.

use super::{check_key, ArtifactStore, StoreError};
use async_trait::async_trait;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Files up to this size go up in one PUT; larger ones in parts of this size.
const PART_BYTES: usize = 8 << 20;

pub struct S3Store {
    s3: Box<dyn ObjectStore>,
    bucket: String,
    /// Prepended to every key (no leading or trailing `/`).
    prefix: String,
}

fn remote(key: &str, e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound(key.to_string()),
        e => StoreError::Remote {
            key: key.to_string(),
            detail: e.to_string(),
        },
    }
}

fn io(key: &str) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        key: key.to_string(),
        source,
    }
}

impl S3Store {
    /// A store in `bucket` under `prefix`, configured from the environment.
    pub fn from_env(bucket: &str, prefix: &str) -> Result<Self, StoreError> {
        Self::with_options(bucket, prefix, &[])
    }

    /// [`S3Store::from_env`] with `options` on top (`object_store` configuration keys such as
    /// `aws_endpoint`, `aws_allow_http`, `aws_access_key_id`).
    pub fn with_options(
        bucket: &str,
        prefix: &str,
        options: &[(String, String)],
    ) -> Result<Self, StoreError> {
        let failed = |detail: String| StoreError::Remote {
            key: format!("s3://{bucket}"),
            detail,
        };
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        for (k, v) in options {
            let key: AmazonS3ConfigKey = k
                .parse()
                .map_err(|e: object_store::Error| failed(e.to_string()))?;
            builder = builder.with_config(key, v);
        }
        let s3 = builder.build().map_err(|e| failed(e.to_string()))?;
        Ok(Self {
            s3: Box::new(s3),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }

    fn path_of(&self, key: &str) -> Result<ObjectPath, StoreError> {
        check_key(key)?;
        let key = key.trim_end_matches('/');
        Ok(if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        })
    }
}

#[async_trait]
impl ArtifactStore for S3Store {
    async fn put_file(&self, key: &str, src: &Path) -> Result<u64, StoreError> {
        let path = self.path_of(key)?;
        let mut file = tokio::fs::File::open(src).await.map_err(io(key))?;
        let size = file.metadata().await.map_err(io(key))?.len();
        if size as usize <= PART_BYTES {
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes).await.map_err(io(key))?;
            self.s3
                .put(&path, PutPayload::from(bytes))
                .await
                .map_err(|e| remote(key, e))?;
            return Ok(size);
        }
        let upload = self
            .s3
            .put_multipart(&path)
            .await
            .map_err(|e| remote(key, e))?;
        let mut parts = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; PART_BYTES];
        loop {
            let n = file.read(&mut buf).await.map_err(io(key))?;
            if n == 0 {
                break;
            }
            parts
                .wait_for_capacity(4)
                .await
                .map_err(|e| remote(key, e))?;
            parts.write(&buf[..n]);
        }
        parts.finish().await.map_err(|e| remote(key, e))?;
        Ok(size)
    }

    async fn get_file(&self, key: &str, dest: &Path) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        let got = self.s3.get(&path).await.map_err(|e| remote(key, e))?;
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io(key))?;
        }
        // Written beside the destination and renamed, so a reader never sees half a file.
        let tmp = dest.with_extension(format!("part-{}", uuid::Uuid::new_v4().simple()));
        let mut out = tokio::fs::File::create(&tmp).await.map_err(io(key))?;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| remote(key, e))?;
            out.write_all(&chunk).await.map_err(io(key))?;
        }
        out.flush().await.map_err(io(key))?;
        drop(out);
        tokio::fs::rename(&tmp, dest).await.map_err(io(key))
    }

    async fn read(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path_of(key)?;
        let got = self.s3.get(&path).await.map_err(|e| remote(key, e))?;
        Ok(got.bytes().await.map_err(|e| remote(key, e))?.to_vec())
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path_of(key)?;
        match self.s3.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(remote(key, e)),
        }
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let path = self.path_of(prefix)?;
        if !prefix.ends_with('/') {
            return match self.s3.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(remote(prefix, e)),
            };
        }
        let mut listing = self.s3.list(Some(&path));
        let mut keys = Vec::new();
        while let Some(meta) = listing.next().await {
            keys.push(meta.map_err(|e| remote(prefix, e))?.location);
        }
        for k in keys {
            match self.s3.delete(&k).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(remote(prefix, e)),
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}
