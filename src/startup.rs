//! Builds and runs the server: data directory, database and migrations, the artifact store,
//! the first tenant, the device thread, the validator and job runner, the router, and graceful
//! shutdown (stop taking requests, checkpoint the running job and put it back in the queue).

use crate::api::{self, AppState};
use crate::config::Settings;
use crate::db::{self, Backend, Db, DbError};
use crate::infer::AdapterCache;
use crate::metrics::Metrics;
use crate::queue::device::{DeviceConfig, DeviceHandle};
use crate::queue::runner::{runner_task, Worker};
use crate::queue::validator::validator_task;
use crate::queue::{JobQueue, StopReason};
use crate::store::StoreError;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The name of the tenant created on first start.
pub const FIRST_TENANT: &str = "default";
/// Where the first tenant's key is written (in the data directory).
pub const INITIAL_KEY_FILE: &str = "initial-api-key";

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot create the data directory `{path}`: {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another tuneshop server uses the data directory `{0}` (SQLite allows one process; use PostgreSQL to run several)")]
    DataDirInUse(std::path::PathBuf),
    #[error("cannot listen on `{addr}`: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("artifact store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot write the initial API key to `{path}`: {source}")]
    InitialKey {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the device thread: {0}")]
    DeviceThread(std::io::Error),
    #[error("the base model failed to load: {0}")]
    Model(String),
    #[error("server error: {0}")]
    Serve(std::io::Error),
    #[error("TUNESHOP_TRUSTED_PROXIES: {0}")]
    TrustedProxies(String),
}

pub struct Application {
    listener: TcpListener,
    port: u16,
    state: AppState,
    worker: Worker,
    shutdown_tx: watch::Sender<bool>,
    /// Held for the life of the server (SQLite: one process per data directory).
    _lock: Option<std::fs::File>,
}

/// Takes the data directory's lock file, so two servers never share one SQLite database.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, StartupError> {
    let path = dir.join("tuneshop.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StartupError::DataDir {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(StartupError::DataDirInUse(dir.to_path_buf()))
        }
        Err(std::fs::TryLockError::Error(source)) => Err(StartupError::DataDir { path, source }),
    }
}

/// Creates the first tenant on an empty database and hands its key over once.
async fn bootstrap_tenant(db: &Db, data_dir: &std::path::Path) -> Result<(), StartupError> {
    let Some((tenant, key)) = db::tenants::bootstrap(db, FIRST_TENANT).await? else {
        return Ok(());
    };
    let path = data_dir.join(INITIAL_KEY_FILE);
    write_secret(&path, &format!("{}\n", key.key)).map_err(|source| StartupError::InitialKey {
        path: path.clone(),
        source,
    })?;
    eprintln!(
        "Created tenant `{}` ({}). Its API key, shown once (also in {}):\n\n    {}\n",
        tenant.name,
        tenant.id,
        path.display(),
        key.key
    );
    Ok(())
}

fn write_secret(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).write(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

impl Application {
    /// Opens everything the server needs; the model loads in the background.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let data_dir = settings.model.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|source| StartupError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        crate::api::client_ip::TrustedProxies::parse(&settings.trusted_proxies)
            .map_err(StartupError::TrustedProxies)?;
        let db = Db::connect(&settings.database_url()).await?;
        let lock = match db.kind() {
            Backend::Sqlite => Some(lock_data_dir(&data_dir)?),
            Backend::Postgres => None,
        };
        // Jobs left running by a process that is gone resume from their last checkpoint. With
        // SQLite this process is the only one, so every such job is ours; with PostgreSQL only
        // those whose worker stopped beating are taken over.
        let requeued = match db.kind() {
            Backend::Sqlite => db::jobs::requeue_stale(&db, None).await?,
            Backend::Postgres => {
                let before = db::now_ms() - settings.stale_after_ms as i64;
                db::jobs::requeue_stale(&db, Some(before)).await?
            }
        };
        for id in &requeued {
            tracing::warn!(job_id = %id, "job was left running by a stopped server; back in the queue");
            let _ = db::events::insert(
                &db,
                *id,
                db::events::Level::Warn,
                db::events::EventType::Message,
                "The server running it stopped; back in the queue, to resume from the last checkpoint",
                None,
            )
            .await;
        }
        bootstrap_tenant(&db, &data_dir).await?;
        let store = crate::store::open(&settings.store_location())?;
        let work_dir = settings.work_dir();
        let _ = std::fs::remove_dir_all(&work_dir);
        std::fs::create_dir_all(&work_dir).map_err(|source| StartupError::DataDir {
            path: work_dir.clone(),
            source,
        })?;
        let listener =
            TcpListener::bind(&settings.addr)
                .await
                .map_err(|source| StartupError::Bind {
                    addr: settings.addr.clone(),
                    source,
                })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartupError::Bind {
                addr: settings.addr.clone(),
                source,
            })?
            .port();
        let metrics = Arc::new(Metrics::default());
        let device = DeviceHandle::spawn(DeviceConfig {
            model: settings.model.clone(),
            engine: settings.engine(),
            inference_share: settings.inference_share,
            metrics: metrics.infer.clone(),
        })
        .map_err(StartupError::DeviceThread)?;
        let adapters = Arc::new(AdapterCache::new(
            settings.max_adapters,
            settings.adapter_cache_mb.saturating_mul(1 << 20),
            metrics.infer.clone(),
        ));
        let admission = Arc::new(tokio::sync::Semaphore::new(
            settings.max_pending_requests.max(1),
        ));
        let worker_id: Arc<str> = settings.worker_id().into();
        let queue = JobQueue::default();
        let (shutdown_tx, shutdown) = watch::channel(false);
        let worker = Worker {
            db: db.clone(),
            store: store.clone(),
            device: device.clone(),
            adapters: adapters.clone(),
            queue: queue.clone(),
            metrics: metrics.clone(),
            worker_id: worker_id.to_string(),
            work_dir,
            heartbeat: Duration::from_millis(settings.heartbeat_ms.max(50)),
            stale_after: Duration::from_millis(settings.stale_after_ms.max(100)),
            poll_interval: Duration::from_millis(1000),
        };
        let state = AppState {
            db,
            device,
            queue,
            store,
            metrics,
            adapters,
            admission,
            settings: Arc::new(settings),
            worker_id,
            shutdown,
        };
        Ok(Self {
            listener,
            port,
            state,
            worker,
            shutdown_tx,
            _lock: lock,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until Ctrl-C or SIGTERM.
    pub async fn run_until_stopped(self) -> Result<(), StartupError> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `stop` completes, or fails if the base model cannot be loaded (a server that
    /// can never become ready should not linger).
    pub async fn run_until(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartupError> {
        let state = self.state.clone();
        let app = api::router(self.state.clone());
        tracing::info!(
            port = self.port,
            database = state.db.backend(),
            store = %state.store.describe(),
            worker = %state.worker_id,
            "listening"
        );
        let runner = tokio::spawn(runner_task(self.worker.clone(), state.shutdown.clone()));
        let validator = tokio::spawn(validator_task(self.worker.clone(), state.shutdown.clone()));
        let device = state.device.clone();
        let load_failed = async move {
            match device.wait_ready().await {
                Ok(_) => std::future::pending::<String>().await,
                Err(e) => e,
            }
        };
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
        let shutdown_tx = self.shutdown_tx;
        let queue = state.queue.clone();
        let shutdown = async move {
            tokio::select! {
                _ = stop => {}
                e = load_failed => { let _ = failed_tx.send(e); }
            }
            // Live streams end and the running job stops at its next step.
            let _ = shutdown_tx.send(true);
            queue.stop_all(StopReason::Shutdown);
        };
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        // The runner puts its job back in the queue after the checkpoint; wait for that.
        let _ = runner.await;
        let _ = validator.await;
        state.device.shutdown().await;
        state.db.close().await;
        served.map_err(StartupError::Serve)?;
        match failed_rx.await {
            Ok(e) => Err(StartupError::Model(e)),
            Err(_) => Ok(()),
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown signal received");
}
