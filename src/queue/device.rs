//! The device thread: one named OS thread owns the compute device and the frozen base model.
//! It fetches and loads the model at start and reports its state through a watch channel, so the
//! server answers health checks while the model loads and a failed load is a clean error.
//! Later work (training steps, inference batches) reaches it as [`Command`]s.

use crate::config::ModelArgs;
use crate::model::{self, BaseModel};
use serde::Serialize;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::watch;

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

pub enum Command {
    Shutdown,
}

/// Cheap handle to the device thread.
#[derive(Clone)]
pub struct DeviceHandle {
    tx: mpsc::Sender<Command>,
    state: watch::Receiver<ModelState>,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl DeviceHandle {
    /// Starts the device thread; it begins loading `args.model` at once.
    pub fn spawn(args: ModelArgs) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let (state_tx, state) = watch::channel(ModelState::Loading);
        let thread = std::thread::Builder::new()
            .name("tuneshop-device".into())
            .spawn(move || device_worker(args, rx, state_tx))?;
        Ok(Self {
            tx,
            state,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    pub fn state(&self) -> ModelState {
        self.state.borrow().clone()
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

    /// Asks the thread to stop and waits for it (off the async runtime).
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

fn device_worker(args: ModelArgs, rx: mpsc::Receiver<Command>, state: watch::Sender<ModelState>) {
    let loaded = load(&args);
    let _model = match loaded {
        Ok(model) => {
            let info = ModelInfo::of(&args.display_name(), &model);
            tracing::info!(
                model = %info.name,
                format = %info.weight_format,
                parameters = info.parameters,
                "base model loaded"
            );
            state.send_replace(ModelState::Ready(info));
            model
        }
        Err(e) => {
            tracing::error!(error = %e, "loading the base model failed");
            state.send_replace(ModelState::Failed(e));
            return;
        }
    };
    // The model stays loaded until the server says stop (or drops its handle).
    match rx.recv() {
        Ok(Command::Shutdown) | Err(_) => {}
    }
}

fn load(args: &ModelArgs) -> Result<BaseModel, String> {
    let opts = args.load_options().map_err(|e| e.to_string())?;
    let path = args.resolve_path().map_err(|e| e.to_string())?;
    model::load(&path, &opts).map_err(|e| e.to_string())
}
