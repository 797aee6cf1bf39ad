//! Builds and runs the server: data directory, database and migrations, the device thread, the
//! router, and graceful shutdown.

use crate::api::{self, AppState};
use crate::config::Settings;
use crate::db::{Db, DbError};
use crate::queue::device::DeviceHandle;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot create the data directory `{path}`: {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on `{addr}`: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot start the device thread: {0}")]
    DeviceThread(std::io::Error),
    #[error("the base model failed to load: {0}")]
    Model(String),
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

pub struct Application {
    listener: TcpListener,
    port: u16,
    state: AppState,
}

impl Application {
    /// Opens everything the server needs; the model loads in the background.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let data_dir = settings.model.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|source| StartupError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        let db = Db::connect(&settings.database_url()).await?;
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
        let device =
            DeviceHandle::spawn(settings.model.clone()).map_err(StartupError::DeviceThread)?;
        let state = AppState {
            db,
            device,
            settings: Arc::new(settings),
        };
        Ok(Self {
            listener,
            port,
            state,
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
        // Server errors are logged where they happen, with their cause; 503s while the model
        // loads are expected and stay out of the error log.
        let trace =
            TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(Level::DEBUG));
        let app = api::router(self.state.clone()).layer(trace);
        tracing::info!(port = self.port, database = state.db.backend(), "listening");
        let device = state.device.clone();
        let load_failed = async move {
            match device.wait_ready().await {
                Ok(_) => std::future::pending::<String>().await,
                Err(e) => e,
            }
        };
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
        let shutdown = async move {
            tokio::select! {
                _ = stop => {}
                e = load_failed => { let _ = failed_tx.send(e); }
            }
        };
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
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
