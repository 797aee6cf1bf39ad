//! Helpers for the service tests: the real app on port 0 with the tiny model, on a fresh SQLite
//! file or a fresh PostgreSQL database, in this process or as a child process; typed calls.

use crate::helpers::tiny;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tuneshop::config::Settings;
use tuneshop::startup::{Application, StartupError, INITIAL_KEY_FILE};

pub const ADMIN_TOKEN: &str = "test-admin-token";

/// How long a test waits for something that should happen (a liveness bound, not a timing
/// assertion: the shared machine is slow at times).
pub const PATIENCE: Duration = Duration::from_secs(180);

/// The PostgreSQL server the tests use (CI runs one locally).
fn postgres_admin_url() -> String {
    std::env::var("TUNESHOP_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh, empty PostgreSQL database for one test; dropped when this is.
pub struct PgDatabase {
    pub url: String,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> Self {
        use sqlx::Connection;
        let admin = postgres_admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!("PostgreSQL is needed for these tests at `{admin}` (set TUNESHOP_TEST_POSTGRES): {e}")
        });
        let name = format!("tuneshop_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        Self {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = postgres_admin_url();
        // Best effort, on a thread of its own: Drop cannot await.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&admin).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

pub fn settings(data: &Path, database_url: Option<String>) -> Settings {
    let mut s = Settings::with_defaults(
        data.to_path_buf(),
        tiny().gguf_quantized.display().to_string(),
    );
    s.database_url = database_url;
    s.admin_token = Some(ADMIN_TOKEN.into());
    s.heartbeat_ms = 200;
    s
}

/// A client for one server.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
}

impl Client {
    pub fn new(base: String) -> Self {
        Self {
            base,
            http: reqwest::Client::new(),
        }
    }

    /// Any request; the body must be JSON (every answer of ours is, errors too).
    pub async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("status {status}: the body is not JSON: {text}"));
        if status >= 400 {
            assert!(
                body["error"]["code"].is_string() && body["error"]["message"].is_string(),
                "error body without code and message: {body}"
            );
        }
        (status, body)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, key: &str, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(path)).bearer_auth(key))
            .await
    }

    pub async fn post(&self, key: &str, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.http.post(self.url(path)).bearer_auth(key).json(body))
            .await
    }

    pub async fn delete(&self, key: &str, path: &str) -> (u16, Value) {
        self.send(self.http.delete(self.url(path)).bearer_auth(key))
            .await
    }

    /// The Prometheus page.
    pub async fn metrics(&self) -> String {
        let resp = self.http.get(self.url("/metrics")).send().await.unwrap();
        resp.text().await.unwrap()
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Ok(r) = self.http.get(self.url("/readyz")).send().await {
                if r.status().as_u16() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server at {} never became ready", self.base);
    }

    /// A new tenant (admin API); returns its API key.
    pub async fn tenant(&self, name: &str) -> String {
        let (status, body) = self
            .post(ADMIN_TOKEN, "/tenants", &json!({ "name": name }))
            .await;
        assert_eq!(status, 201, "{body}");
        body["api_key"].as_str().unwrap().to_string()
    }

    /// Uploads JSONL rows; returns the dataset id.
    pub async fn upload(&self, key: &str, rows: &[Value]) -> String {
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        let (status, body) = self
            .send(
                self.http
                    .post(self.url("/datasets?filename=train.jsonl"))
                    .bearer_auth(key)
                    .header("content-type", "application/jsonl")
                    .body(text),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    pub async fn create_job(&self, key: &str, body: &Value) -> Value {
        let (status, job) = self.post(key, "/jobs", body).await;
        assert_eq!(status, 201, "{job}");
        job
    }

    pub async fn job(&self, key: &str, id: &str) -> Value {
        let (status, job) = self.get(key, &format!("/jobs/{id}")).await;
        assert_eq!(status, 200, "{job}");
        job
    }

    /// Polls until the job satisfies `done`.
    pub async fn wait_job(&self, key: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let job = self.job(key, id).await;
            if done(&job) {
                return job;
            }
            assert!(Instant::now() < deadline, "job never got there: {job}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_finished(&self, key: &str, id: &str) -> Value {
        self.wait_job(key, id, |j| {
            ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or(""))
        })
        .await
    }

    pub async fn events(&self, key: &str, id: &str) -> Vec<Value> {
        let (status, body) = self
            .get(key, &format!("/jobs/{id}/events?limit=1000"))
            .await;
        assert_eq!(status, 200, "{body}");
        body["data"].as_array().unwrap().clone()
    }
}

/// A few prompt/completion rows the tiny model can learn.
pub fn rows(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({ "prompt": format!("count {i} to"), "completion": format!(" {} {}", i + 1, i + 2) }))
        .collect()
}

/// A quick job's body.
pub fn quick_job(dataset: &str) -> Value {
    json!({
        "training_dataset": dataset,
        "hyperparameters": { "n_epochs": 2, "batch_size": 2, "learning_rate": 0.01, "max_seq_len": 64 }
    })
}

/// The app, in this process.
pub struct TestApp {
    pub client: Client,
    pub data: tempfile::TempDir,
    /// The first tenant's key (from `initial-api-key`).
    pub key: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<Result<(), StartupError>>>,
    _pg: Option<PgDatabase>,
}

impl TestApp {
    pub async fn sqlite() -> Self {
        Self::spawn(|_| {}, false).await
    }

    pub async fn postgres() -> Self {
        Self::spawn(|_| {}, true).await
    }

    pub async fn spawn(tweak: impl FnOnce(&mut Settings), postgres: bool) -> Self {
        if std::env::var_os("RUST_LOG").is_some() {
            tuneshop::telemetry::init();
        }
        let data = tempfile::tempdir().unwrap();
        let pg = if postgres {
            Some(PgDatabase::create().await)
        } else {
            None
        };
        let mut s = settings(data.path(), pg.as_ref().map(|p| p.url.clone()));
        tweak(&mut s);
        let key_file = s.model.data_dir.join(INITIAL_KEY_FILE);
        let app = Application::build(s).await.expect("build app");
        let client = Client::new(format!("http://127.0.0.1:{}", app.port()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(app.run_until(async {
            let _ = rx.await;
        }));
        client.wait_ready().await;
        let key = std::fs::read_to_string(&key_file)
            .expect("initial API key written")
            .trim()
            .to_string();
        Self {
            client,
            data,
            key,
            stop: Some(tx),
            handle: Some(handle),
            _pg: pg,
        }
    }

    /// Graceful shutdown; returns the data directory (and database) for a restart.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}

impl std::ops::Deref for TestApp {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// The `tuneshop serve` binary as a child process (killed when dropped).
pub struct ChildApp {
    pub client: Client,
    child: std::process::Child,
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ChildApp {
    pub async fn start(data: &Path, envs: &[(&str, String)]) -> Self {
        let port = free_port();
        let log = std::fs::File::create(data.join(format!("server-{port}.log"))).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tuneshop"))
            .arg("serve")
            .env("TUNESHOP_DATA_DIR", data)
            .env("TUNESHOP_ADDR", format!("127.0.0.1:{port}"))
            .env(
                "TUNESHOP_BASE_MODEL",
                tiny().gguf_quantized.display().to_string(),
            )
            .env("TUNESHOP_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("TUNESHOP_HEARTBEAT_MS", "200")
            .env("RUST_LOG", "info")
            .envs(envs.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tuneshop serve");
        let client = Client::new(format!("http://127.0.0.1:{port}"));
        client.wait_ready().await;
        Self { client, child }
    }

    /// SIGKILL: no shutdown, no last checkpoint.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ChildApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::ops::Deref for ChildApp {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// The initial key a server wrote into its data directory.
pub fn initial_key(data: &Path) -> String {
    std::fs::read_to_string(data.join(INITIAL_KEY_FILE))
        .unwrap()
        .trim()
        .to_string()
}

/// Unzips an adapter download into a directory.
pub fn unzip(bytes: &[u8], dir: &Path) -> PathBuf {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let mut out = std::fs::File::create(dir.join(f.name())).unwrap();
        std::io::copy(&mut f, &mut out).unwrap();
    }
    dir.to_path_buf()
}
