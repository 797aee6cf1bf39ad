//! The handle to the device thread: one named OS thread owns the compute device and runs all
//! tensor work on the frozen base model (see `device_worker`). It loads the model at start and
//! reports its state through a watch channel (the server answers health checks meanwhile; a
//! failed load is a clean error), then takes [`Command`]s: training runs, which stream their
//! progress back and stop at a step boundary when their [`StopFlag`] is raised, and generation
//! requests for the continuous batcher, which runs between training steps.

use super::device_worker::device_worker;
use super::StopFlag;
use crate::config::ModelArgs;
use crate::infer::{AdapterLease, EngineConfig, GenRequest};
use crate::lora::LoraConfig;
use crate::metrics::InferMetrics;
use crate::model::BaseModel;
use crate::selfinstruct::{self, Provenance, RoundStats, SeedTask, SelfInstructError};
use crate::train::TrainParams;
use crate::train::{DataStats, EvalResult, Progress, TrainError};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use tokio::sync::{oneshot, watch};

/// What the device thread loads and how it serves.
#[derive(Clone)]
pub struct DeviceConfig {
    pub model: ModelArgs,
    pub engine: EngineConfig,
    /// The share of device time inference gets while a training job runs and requests wait,
    /// in [0, 1]: 0 gives inference one batch step between training steps, 1 lets inference
    /// run until it is idle.
    pub inference_share: f64,
    pub metrics: Arc<InferMetrics>,
}

/// What the server reports about the loaded base model.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ModelInfo {
    /// The name clients use for the base model.
    #[schema(example = "smollm2-135m-instruct")]
    pub name: String,
    pub path: String,
    #[schema(example = "llama")]
    pub architecture: String,
    #[schema(example = 134515008)]
    pub parameters: usize,
    /// How the frozen weights are held, e.g. `q4_1+q8_0`, `f32`, `bf16`.
    #[schema(example = "q4_1+q8_0")]
    pub weight_format: String,
    pub weight_bytes: usize,
    #[schema(example = 8192)]
    pub context_length: usize,
    pub vocab_size: usize,
    pub layers: usize,
    #[schema(example = "cpu")]
    pub device: String,
}

impl ModelInfo {
    pub fn of(name: &str, m: &BaseModel) -> Self {
        let cfg = m.llama.config();
        Self {
            name: name.to_string(),
            path: m.path.display().to_string(),
            architecture: "llama".into(),
            parameters: m.llama.parameter_count(),
            weight_format: m.weight_format.clone(),
            weight_bytes: m.llama.weight_bytes(),
            context_length: cfg.max_position_embeddings,
            vocab_size: cfg.vocab_size,
            layers: cfg.num_hidden_layers,
            device: format!("{:?}", m.llama.device().location()).to_lowercase(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelState {
    Loading,
    Ready(ModelInfo),
    Failed(String),
}

/// A fine-tuning run for the device thread.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub params: TrainParams,
    pub lora: LoraConfig,
    pub train_file: PathBuf,
    pub valid_file: Option<PathBuf>,
    /// Checkpoints go to `work_dir/checkpoints`, the finished adapter to `work_dir/adapter`.
    pub work_dir: PathBuf,
    /// A checkpoint of this job to continue from.
    pub resume_from: Option<PathBuf>,
    /// `base_model_name_or_path` in the saved adapter.
    pub base_name: String,
}

/// What a run reports while it goes.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    Started {
        total_steps: usize,
        resumed_at: Option<usize>,
        train: DataStats,
        valid: Option<DataStats>,
    },
    Progress(Progress),
    Checkpoint {
        step: usize,
        path: PathBuf,
        train_loss: f64,
        valid_loss: Option<f64>,
    },
}

/// A finished run: the adapter's PEFT files and the final numbers.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub adapter_dir: PathBuf,
    pub parameters: usize,
    pub steps: usize,
    pub train_loss: f64,
    pub valid: Option<EvalResult>,
    pub tokens_trained: usize,
}

/// A Self-Instruct run for the device thread.
pub struct SelfInstructJob {
    pub seeds: Vec<SeedTask>,
    pub params: selfinstruct::Params,
    /// The adapter that writes (`None`: the base model).
    pub adapter: Option<AdapterLease>,
}

/// What a Self-Instruct run reports while it goes.
pub enum SelfInstructEvent {
    Task(Provenance),
    Round { stats: RoundStats, accepted: usize },
}

pub enum Command {
    /// Generate for one request (its events go back on the request's own channel).
    Generate(Box<GenRequest>),
    SelfInstruct {
        job: Box<SelfInstructJob>,
        events: tokio::sync::mpsc::UnboundedSender<SelfInstructEvent>,
        stop: Arc<StopFlag>,
        reply: oneshot::Sender<Result<selfinstruct::Outcome, SelfInstructError>>,
    },
    Train {
        job: Box<TrainJob>,
        events: tokio::sync::mpsc::UnboundedSender<TrainEvent>,
        stop: Arc<StopFlag>,
        reply: oneshot::Sender<Result<TrainReport, TrainError>>,
    },
    Shutdown,
}

/// Cheap handle to the device thread.
#[derive(Clone)]
pub struct DeviceHandle {
    tx: mpsc::Sender<Command>,
    state: watch::Receiver<ModelState>,
    model: Arc<OnceLock<Arc<BaseModel>>>,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the device thread has stopped")]
pub struct DeviceGone;

impl DeviceHandle {
    /// Starts the device thread; it begins loading `cfg.model` at once.
    pub fn spawn(cfg: DeviceConfig) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let (state_tx, state) = watch::channel(ModelState::Loading);
        let model = Arc::new(OnceLock::new());
        let published = model.clone();
        let thread = std::thread::Builder::new()
            .name("tuneshop-device".into())
            .spawn(move || device_worker(cfg, rx, state_tx, published))?;
        Ok(Self {
            tx,
            state,
            model,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    pub fn state(&self) -> ModelState {
        self.state.borrow().clone()
    }

    /// The loaded model, for work that needs its configuration or tokenizer but no tensor
    /// math (validation, tokenizing); `None` until it is loaded.
    pub fn model(&self) -> Option<Arc<BaseModel>> {
        self.model.get().cloned()
    }

    /// The served base model's name, once loaded.
    pub fn model_name(&self) -> Option<String> {
        match &*self.state.borrow() {
            ModelState::Ready(info) => Some(info.name.clone()),
            _ => None,
        }
    }

    /// Waits until the model is loaded (`Ok`) or failed to load (`Err` with the reason).
    pub async fn wait_ready(&self) -> Result<ModelInfo, String> {
        let mut rx = self.state.clone();
        let state = rx
            .wait_for(|s| !matches!(s, ModelState::Loading))
            .await
            .map_err(|_| "the device thread stopped".to_string())?
            .clone();
        match state {
            ModelState::Ready(info) => Ok(info),
            ModelState::Failed(e) => Err(e),
            ModelState::Loading => Err("still loading".into()),
        }
    }

    pub fn send(&self, cmd: Command) -> Result<(), DeviceGone> {
        self.tx.send(cmd).map_err(|_| DeviceGone)
    }

    /// Whether the thread is still running.
    pub fn is_alive(&self) -> bool {
        self.thread
            .lock()
            .map(|t| t.as_ref().is_some_and(|t| !t.is_finished()))
            .unwrap_or(false)
    }

    /// Asks the thread to stop and waits for it (off the async runtime).
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}
