//! The device thread: one named OS thread owns the compute device and runs all tensor work on
//! the frozen base model. It loads the model at start and reports its state through a watch
//! channel (the server answers health checks meanwhile; a failed load is a clean error), then
//! takes [`Command`]s: a training run streams its progress back and stops at a step boundary
//! when its [`StopFlag`] is raised.

use super::StopFlag;
use crate::config::ModelArgs;
use crate::lora::{peft, LoraConfig};
use crate::model::{self, BaseModel};
use crate::train::data::examples_from_jsonl;
use crate::train::{DataStats, EvalResult, Progress, TrainError, TrainObserver};
use crate::train::{TrainParams, Trainer};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use tokio::sync::{oneshot, watch};

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

pub enum Command {
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
    /// Starts the device thread; it begins loading `args.model` at once.
    pub fn spawn(args: ModelArgs) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let (state_tx, state) = watch::channel(ModelState::Loading);
        let model = Arc::new(OnceLock::new());
        let published = model.clone();
        let thread = std::thread::Builder::new()
            .name("tuneshop-device".into())
            .spawn(move || device_worker(args, rx, state_tx, published))?;
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

fn device_worker(
    args: ModelArgs,
    rx: mpsc::Receiver<Command>,
    state: watch::Sender<ModelState>,
    published: Arc<OnceLock<Arc<BaseModel>>>,
) {
    let model = match load(&args) {
        Ok(model) => {
            let info = ModelInfo::of(&args.display_name(), &model);
            tracing::info!(
                model = %info.name,
                format = %info.weight_format,
                parameters = info.parameters,
                "base model loaded"
            );
            let model = Arc::new(model);
            let _ = published.set(model.clone());
            state.send_replace(ModelState::Ready(info));
            model
        }
        Err(e) => {
            tracing::error!(error = %e, "loading the base model failed");
            state.send_replace(ModelState::Failed(e));
            return;
        }
    };
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Command::Train {
                job,
                events,
                stop,
                reply,
            } => {
                let result = run_training(&model, &job, &events, &stop);
                let _ = reply.send(result);
            }
            Command::Shutdown => break,
        }
    }
}

fn load(args: &ModelArgs) -> Result<BaseModel, String> {
    let opts = args.load_options().map_err(|e| e.to_string())?;
    let path = args.resolve_path().map_err(|e| e.to_string())?;
    model::load(&path, &opts).map_err(|e| e.to_string())
}

fn read_text(path: &Path) -> Result<String, TrainError> {
    std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reports progress and checkpoints on a channel and stops when the flag is raised.
struct ChannelObserver<'a> {
    events: &'a tokio::sync::mpsc::UnboundedSender<TrainEvent>,
    stop: &'a StopFlag,
    last_loss: f64,
    last_valid: Option<f64>,
}

impl TrainObserver for ChannelObserver<'_> {
    fn on_progress(&mut self, p: &Progress) {
        self.last_loss = p.train_loss;
        if let Some(v) = p.valid {
            self.last_valid = Some(v.loss);
        }
        let _ = self.events.send(TrainEvent::Progress(p.clone()));
    }

    fn on_checkpoint(&mut self, step: usize, path: &Path) {
        let _ = self.events.send(TrainEvent::Checkpoint {
            step,
            path: path.to_path_buf(),
            train_loss: self.last_loss,
            valid_loss: self.last_valid,
        });
    }

    fn should_stop(&self) -> bool {
        self.stop.is_raised()
    }
}

fn run_training(
    model: &BaseModel,
    job: &TrainJob,
    events: &tokio::sync::mpsc::UnboundedSender<TrainEvent>,
    stop: &StopFlag,
) -> Result<TrainReport, TrainError> {
    let max_len = job.params.max_seq_len;
    let (train, train_stats) = examples_from_jsonl(model, &read_text(&job.train_file)?, max_len)?;
    let (valid, valid_stats) = match &job.valid_file {
        Some(p) => {
            let (v, s) = examples_from_jsonl(model, &read_text(p)?, max_len)?;
            (v, Some(s))
        }
        None => (Vec::new(), None),
    };
    let mut trainer = Trainer::new(
        model,
        job.params.clone(),
        job.lora.clone(),
        train,
        valid,
        &job.base_name,
    )?
    .with_checkpoints(job.work_dir.join("checkpoints"));
    let mut resumed_at = None;
    if let Some(path) = &job.resume_from {
        trainer.resume(path)?;
        resumed_at = Some(trainer.step());
    }
    let _ = events.send(TrainEvent::Started {
        total_steps: trainer.total_steps(),
        resumed_at,
        train: train_stats,
        valid: valid_stats,
    });
    let mut observer = ChannelObserver {
        events,
        stop,
        last_loss: f64::NAN,
        last_valid: None,
    };
    let outcome = trainer.run(&mut observer)?;
    let adapter_dir = job.work_dir.join("adapter");
    peft::save(&outcome.adapter, &adapter_dir)?;
    Ok(TrainReport {
        adapter_dir,
        parameters: outcome.adapter.parameter_count(),
        steps: outcome.steps,
        train_loss: outcome.train_loss,
        valid: outcome.valid,
        tokens_trained: outcome.tokens_trained,
    })
}
