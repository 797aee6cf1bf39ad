//! The artifact store's contract, on a local directory and on a real S3-compatible server (moto's
//! S3 server from PyPI, started by the test): whole writes, reads, copies to files, multipart
//! uploads, prefix deletion, not-found and bad keys.

use crate::helpers::{importable, pip_package};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tuneshop::store::{self, ArtifactStore, StoreError};

const MOTO_VERSION: &str = "5.2.5";

/// An S3-compatible server on a local port, killed when dropped.
pub struct S3Server {
    pub endpoint: String,
    child: Child,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_package() -> PathBuf {
    pip_package(&format!("moto[server]=={MOTO_VERSION}"), |d| {
        importable(d, "moto.server, flask, werkzeug")
    })
}

impl S3Server {
    /// Starts moto's S3 server and creates `buckets`.
    pub async fn start(buckets: &[&str]) -> Self {
        let package = tokio::task::spawn_blocking(moto_package).await.unwrap();
        let port = crate::api::free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("PYTHONPATH", &package)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the S3 server");
        let server = Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(&server.endpoint).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the S3 server never answered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for b in buckets {
            let r = http
                .put(format!("{}/{b}", server.endpoint))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "create bucket {b}: {}", r.status());
        }
        server
    }

    /// The environment a tuneshop process needs to use this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

async fn keeps_the_contract(store: &dyn ArtifactStore, scratch: &Path) {
    let small = scratch.join("small.txt");
    std::fs::write(&small, b"hello").unwrap();
    assert_eq!(store.put_file("datasets/a.jsonl", &small).await.unwrap(), 5);
    assert_eq!(store.read("datasets/a.jsonl").await.unwrap(), b"hello");
    assert!(store.exists("datasets/a.jsonl").await.unwrap());
    // Replacing is whole.
    std::fs::write(&small, b"hello again").unwrap();
    store.put_file("datasets/a.jsonl", &small).await.unwrap();
    assert_eq!(
        store.read("datasets/a.jsonl").await.unwrap(),
        b"hello again"
    );

    // Larger than one upload part: goes up in parts and comes back the same.
    let big: Vec<u8> = (0..(9 << 20)).map(|i| (i % 251) as u8).collect();
    let big_file = scratch.join("big.bin");
    std::fs::write(&big_file, &big).unwrap();
    let key = "jobs/j1/checkpoints/step-00000005/optimizer.safetensors";
    assert_eq!(
        store.put_file(key, &big_file).await.unwrap(),
        big.len() as u64
    );
    let back = scratch.join("copy/back.bin");
    store.get_file(key, &back).await.unwrap();
    assert!(std::fs::read(&back).unwrap() == big, "the copy differs");
    std::fs::write(&small, b"x").unwrap();
    store
        .put_file("jobs/j1/checkpoints/step-00000005/state.json", &small)
        .await
        .unwrap();
    store.put_file("jobs/j2/state.json", &small).await.unwrap();

    // Deleting a prefix removes what is under it, and only that.
    store.delete_prefix("jobs/j1/").await.unwrap();
    assert!(!store.exists(key).await.unwrap());
    assert!(store.exists("jobs/j2/state.json").await.unwrap());
    store.delete_prefix("datasets/a.jsonl").await.unwrap();
    store.delete_prefix("datasets/a.jsonl").await.unwrap(); // already gone: fine
    assert!(matches!(
        store.read("datasets/a.jsonl").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.get_file("datasets/none", &back).await,
        Err(StoreError::NotFound(_))
    ));
    for bad in ["../x", "/etc/passwd", "a//b", "a/../b", ".tmp/x", "a b", ""] {
        assert!(
            matches!(store.read(bad).await, Err(StoreError::BadKey(_))),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn a_local_directory_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = store::open(&dir.path().join("store").display().to_string()).unwrap();
    assert!(store.describe().starts_with("dir:"));
    keeps_the_contract(store.as_ref(), dir.path()).await;
}

#[tokio::test]
async fn an_s3_bucket_keeps_the_store_contract() {
    let server = S3Server::start(&["artifacts"]).await;
    let options: Vec<(String, String)> = server
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_lowercase(), v))
        .collect();
    let store = tuneshop::store::S3Store::with_options("artifacts", "team/a", &options).unwrap();
    assert_eq!(store.describe(), "s3://artifacts/team/a");
    let dir = tempfile::tempdir().unwrap();
    keeps_the_contract(&store, dir.path()).await;
    // A bucket that does not exist is an error, not a hang or a panic.
    let missing = tuneshop::store::S3Store::with_options("no-such-bucket", "", &options).unwrap();
    assert!(missing.read("datasets/a.jsonl").await.is_err());
}
