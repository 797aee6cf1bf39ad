//! Settings from flags and environment variables, with their documented defaults.

use crate::infer::adapter_cache::DEFAULT_MAX_ADAPTERS;
use crate::infer::engine::{DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK};
use crate::infer::EngineConfig;
use crate::model::default_model::{self, DEFAULT_MODEL};
use crate::model::LoadOptions;
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown device `{0}`: use `cpu`, `cuda` or `cuda:N`")]
    UnknownDevice(String),
    #[error("device `{0}` needs a build with CUDA support: cargo build --release --features cuda")]
    NoCuda(String),
    #[error("cannot open device `{device}`: {source}")]
    Device {
        device: String,
        #[source]
        source: candle_core::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// Which base model to load and how.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Base model: `smollm2-135m-instruct` (fetched on first use) or a path to a .gguf file or
    /// a Hugging Face model directory.
    #[arg(long = "model", env = "TUNESHOP_BASE_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Data directory: database, fetched models, datasets and adapters.
    #[arg(long, env = "TUNESHOP_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Compute device: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "TUNESHOP_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Dtype of Hugging Face weights (GGUF models compute in f32 over their quantized weights).
    #[arg(long, value_enum, env = "TUNESHOP_DTYPE", default_value = "f32")]
    pub dtype: DTypeArg,
    /// Expand quantized GGUF weights to f32 at load (faster prefill, 4-8x the memory).
    #[arg(long, env = "TUNESHOP_DEQUANTIZE")]
    pub dequantize: bool,
}

impl ModelArgs {
    /// The model's path, fetching the default model into the data directory when needed.
    pub fn resolve_path(&self) -> Result<PathBuf, default_model::FetchError> {
        default_model::resolve(&self.model, &self.data_dir)
    }

    /// A short display name: the default model's name, else the file or directory name.
    pub fn display_name(&self) -> String {
        if self.model == DEFAULT_MODEL {
            return DEFAULT_MODEL.to_string();
        }
        PathBuf::from(&self.model)
            .file_stem()
            .map_or_else(|| self.model.clone(), |s| s.to_string_lossy().into_owned())
    }

    pub fn load_options(&self) -> Result<LoadOptions, ConfigError> {
        Ok(LoadOptions {
            device: parse_device(&self.device)?,
            dtype: self.dtype.into(),
            dequantize: self.dequantize,
        })
    }
}

fn parse_device(spec: &str) -> Result<Device, ConfigError> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        s => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => n,
            None => return Err(ConfigError::UnknownDevice(spec.to_string())),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(ConfigError::NoCuda(spec.to_string()));
    }
    Device::new_cuda(ordinal).map_err(|source| ConfigError::Device {
        device: spec.to_string(),
        source,
    })
}

/// Settings of `tuneshop serve`.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "TUNESHOP_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Database: `sqlite://PATH` or `postgres://…` (default: SQLite file in the data directory).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Token for the tenant-admin endpoints (`/tenants`); they are off without one.
    #[arg(long, env = "TUNESHOP_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Artifact store (datasets, checkpoints, adapters): a directory, or `s3://bucket[/prefix]`
    /// with the usual `AWS_*` variables; processes that share a database share it (default:
    /// `store` in the data directory).
    #[arg(long, env = "TUNESHOP_STORE")]
    pub store: Option<String>,
    /// This process's name in job claims (default: host name, process id and a random tag).
    #[arg(long, env = "TUNESHOP_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Largest dataset or adapter upload, in bytes.
    #[arg(long, env = "TUNESHOP_MAX_UPLOAD_BYTES", default_value_t = DEFAULT_MAX_UPLOAD_BYTES)]
    pub max_upload_bytes: u64,
    /// Jobs a tenant may have waiting or running at once (more are refused with 429).
    #[arg(long, env = "TUNESHOP_MAX_ACTIVE_JOBS", default_value_t = 100)]
    pub max_active_jobs: u64,
    /// Seconds a request may take before it is answered 408 (streams are not cut).
    #[arg(long, env = "TUNESHOP_REQUEST_TIMEOUT_SECS", default_value_t = 300)]
    pub request_timeout_secs: u64,
    /// Milliseconds between heartbeats of a running job.
    #[arg(long, env = "TUNESHOP_HEARTBEAT_MS", default_value_t = 2000)]
    pub heartbeat_ms: u64,
    /// A running job whose heartbeat is older than this (milliseconds) is taken over by another
    /// process (PostgreSQL); with SQLite every job left running is resumed at start.
    #[arg(long, env = "TUNESHOP_STALE_AFTER_MS", default_value_t = 30_000)]
    pub stale_after_ms: u64,
    /// Sequences decoded together in one batch.
    #[arg(long, env = "TUNESHOP_MAX_BATCH_SIZE", default_value_t = DEFAULT_MAX_BATCH)]
    pub max_batch_size: usize,
    /// Inference requests in progress (running or waiting) before new ones get 429 `overloaded`.
    #[arg(long, env = "TUNESHOP_MAX_PENDING_REQUESTS", default_value_t = 256)]
    pub max_pending_requests: usize,
    /// Prompt tokens prefilled per batch step, so long prompts never stall decoding for long.
    #[arg(long, env = "TUNESHOP_PREFILL_CHUNK", default_value_t = DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// Memory for all sequences' KV caches, in MiB; sequences wait for room beyond it.
    #[arg(long, env = "TUNESHOP_KV_CACHE_MB", default_value_t = 2048)]
    pub kv_cache_mb: usize,
    /// Share of device time inference gets while a training job runs, 0 to 1: after each piece
    /// of training work, inference runs for share/(1-share) of its duration (at least one batch
    /// step; 1 = until no request is left).
    #[arg(long, env = "TUNESHOP_INFERENCE_SHARE", default_value_t = 0.5)]
    pub inference_share: f64,
    /// Adapters kept in memory for serving (least recently used out first).
    #[arg(long, env = "TUNESHOP_MAX_ADAPTERS", default_value_t = DEFAULT_MAX_ADAPTERS)]
    pub max_adapters: usize,
    /// Memory for resident adapters, in MiB.
    #[arg(long, env = "TUNESHOP_ADAPTER_CACHE_MB", default_value_t = 1024)]
    pub adapter_cache_mb: usize,
    /// Reverse proxies (comma-separated addresses or CIDR networks) whose X-Forwarded-For names
    /// the client; from anyone else the header is ignored.
    #[arg(long, env = "TUNESHOP_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,
}

pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 100 * 1024 * 1024;

impl Settings {
    /// Settings for a server on `data_dir` with everything else at its default.
    pub fn with_defaults(data_dir: PathBuf, model: String) -> Self {
        Self {
            model: ModelArgs {
                model,
                data_dir,
                device: "cpu".into(),
                dtype: DTypeArg::F32,
                dequantize: false,
            },
            addr: "127.0.0.1:0".into(),
            database_url: None,
            admin_token: None,
            store: None,
            worker_id: None,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            max_active_jobs: 100,
            request_timeout_secs: 300,
            heartbeat_ms: 2000,
            stale_after_ms: 30_000,
            max_batch_size: DEFAULT_MAX_BATCH,
            max_pending_requests: 256,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            kv_cache_mb: 2048,
            inference_share: 0.5,
            max_adapters: DEFAULT_MAX_ADAPTERS,
            adapter_cache_mb: 1024,
            trusted_proxies: String::new(),
        }
    }

    pub fn kv_cache_bytes(&self) -> usize {
        self.kv_cache_mb.saturating_mul(1 << 20)
    }

    /// How the batcher runs.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            max_batch: self.max_batch_size.max(1),
            prefill_chunk: self.prefill_chunk.max(1),
            kv_cache_bytes: self.kv_cache_bytes(),
        }
    }

    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.model.data_dir.join("tuneshop.db").display()
            ),
        }
    }

    /// Where artifacts live: `s3://bucket[/prefix]`, or a directory.
    pub fn store_location(&self) -> String {
        self.store
            .clone()
            .unwrap_or_else(|| self.model.data_dir.join("store").display().to_string())
    }

    /// Scratch space for running jobs and uploads in progress.
    pub fn work_dir(&self) -> PathBuf {
        self.model.data_dir.join("work")
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "host".into());
            let tag = uuid::Uuid::new_v4().simple().to_string();
            format!("{host}-{}-{}", std::process::id(), &tag[..6])
        })
    }
}
