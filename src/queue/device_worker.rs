//! The device thread's loop. It owns the loaded base model and the continuous batcher, and takes
//! [`Command`]s: generation requests join the batcher; a training run goes to the trainer, which
//! hands the device back between micro-batches so that inference keeps being served while a job
//! runs (the share each side gets is the [`DeviceConfig::inference_share`] policy); a
//! Self-Instruct run puts its prompts into the batcher beside the requests being served.

use super::device::{
    Command, DeviceConfig, ModelInfo, ModelState, SelfInstructEvent, SelfInstructJob, TrainEvent,
    TrainJob, TrainReport,
};
use super::StopFlag;
use crate::config::ModelArgs;
use crate::infer::Engine;
use crate::lora::peft;
use crate::model::{self, BaseModel};
use crate::selfinstruct::{self, EngineGenerator, SelfInstructError};
use crate::train::data::examples_from_jsonl;
use crate::train::{Progress, TrainError, TrainObserver, Trainer};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub(super) fn device_worker(
    cfg: DeviceConfig,
    rx: mpsc::Receiver<Command>,
    state: watch::Sender<ModelState>,
    published: Arc<OnceLock<Arc<BaseModel>>>,
) {
    let model = match load(&cfg.model) {
        Ok(model) => {
            let info = ModelInfo::of(&cfg.model.display_name(), &model);
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
    let mut serving = Serving {
        engine: Engine::new(&model, cfg.engine.clone(), Some(cfg.metrics.clone())),
        rx,
        deferred: VecDeque::new(),
        inference_share: cfg.inference_share.clamp(0.0, 1.0),
        disconnected: false,
    };
    loop {
        let idle = !serving.engine.has_work() && serving.deferred.is_empty();
        if idle && serving.disconnected {
            break;
        }
        serving.pump(idle);
        match serving.deferred.pop_front() {
            Some(Command::Train {
                job,
                events,
                stop,
                reply,
            }) => {
                let result = run_training(&model, &job, &events, &stop, &mut serving);
                let _ = reply.send(result);
            }
            Some(Command::SelfInstruct {
                job,
                events,
                stop,
                reply,
            }) => {
                let result = run_self_instruct(&model, &job, &events, &stop, &mut serving);
                let _ = reply.send(result);
            }
            Some(Command::Shutdown) => break,
            Some(Command::Generate(req)) => serving.engine.submit(*req),
            None => {}
        }
        if serving.engine.has_work() {
            serving.engine.step();
        }
    }
}

/// The batcher and the command channel, shared between the loop and a running training job.
struct Serving<'m> {
    engine: Engine<'m>,
    rx: mpsc::Receiver<Command>,
    /// Commands that are not generation requests, in arrival order.
    deferred: VecDeque<Command>,
    inference_share: f64,
    /// Every handle is gone: finish what is in flight, then stop.
    disconnected: bool,
}

/// Takes every waiting command (waiting for one first when `block`): generation requests join
/// the batcher at once, so requests that arrive together are batched together; the others wait
/// in `deferred`.
fn take_commands(
    rx: &mpsc::Receiver<Command>,
    engine: &mut Engine<'_>,
    deferred: &mut VecDeque<Command>,
    disconnected: &mut bool,
    block: bool,
) {
    let mut take = |cmd| match cmd {
        Command::Generate(req) => engine.submit(*req),
        other => deferred.push_back(other),
    };
    if block && !*disconnected {
        match rx.recv() {
            Ok(cmd) => take(cmd),
            Err(_) => *disconnected = true,
        }
    }
    loop {
        match rx.try_recv() {
            Ok(cmd) => take(cmd),
            Err(mpsc::TryRecvError::Empty) => break,
            Err(mpsc::TryRecvError::Disconnected) => {
                *disconnected = true;
                break;
            }
        }
    }
}

impl Serving<'_> {
    fn pump(&mut self, block: bool) {
        take_commands(
            &self.rx,
            &mut self.engine,
            &mut self.deferred,
            &mut self.disconnected,
            block,
        );
    }

    /// Serves inference after `trained` of training work: at least one batch step when there is
    /// work, then more until the batcher is idle or inference has had its share of the time.
    fn between_training(&mut self, trained: Duration) {
        self.pump(false);
        if !self.engine.has_work() {
            return;
        }
        let share = self.inference_share;
        let budget = if share >= 1.0 {
            Duration::MAX
        } else {
            trained.mul_f64(share / (1.0 - share))
        };
        let start = Instant::now();
        loop {
            self.engine.step();
            self.pump(false);
            if !self.engine.has_work() || start.elapsed() >= budget {
                break;
            }
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

/// Reports progress and checkpoints on a channel, stops when the flag is raised, and serves
/// inference between pieces of training work.
struct ChannelObserver<'a, 'm> {
    events: &'a tokio::sync::mpsc::UnboundedSender<TrainEvent>,
    stop: &'a StopFlag,
    last_loss: f64,
    last_valid: Option<f64>,
    serving: &'a mut Serving<'m>,
    /// When training last got the device back.
    resumed: Instant,
}

impl TrainObserver for ChannelObserver<'_, '_> {
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

    fn interleave(&mut self) {
        self.serving.between_training(self.resumed.elapsed());
        self.resumed = Instant::now();
    }
}

fn run_training(
    model: &BaseModel,
    job: &TrainJob,
    events: &tokio::sync::mpsc::UnboundedSender<TrainEvent>,
    stop: &StopFlag,
    serving: &mut Serving<'_>,
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
        serving,
        resumed: Instant::now(),
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

/// Reports a Self-Instruct run's rounds and accepted tasks on a channel; stops on the flag.
struct SelfInstructObserver<'a> {
    events: &'a tokio::sync::mpsc::UnboundedSender<SelfInstructEvent>,
    stop: &'a StopFlag,
}

impl selfinstruct::Observer for SelfInstructObserver<'_> {
    fn on_task(&mut self, p: &selfinstruct::Provenance) {
        let _ = self.events.send(SelfInstructEvent::Task(p.clone()));
    }

    fn on_round(&mut self, stats: &selfinstruct::RoundStats, accepted: usize) {
        let _ = self.events.send(SelfInstructEvent::Round {
            stats: stats.clone(),
            accepted,
        });
    }

    fn should_stop(&self) -> bool {
        self.stop.is_raised()
    }
}

/// Runs the pipeline on the batcher: its prompts share batches with the requests being served,
/// and new requests are taken between steps.
fn run_self_instruct<'m>(
    model: &'m BaseModel,
    job: &SelfInstructJob,
    events: &tokio::sync::mpsc::UnboundedSender<SelfInstructEvent>,
    stop: &StopFlag,
    serving: &mut Serving<'m>,
) -> Result<selfinstruct::Outcome, SelfInstructError> {
    let Serving {
        engine,
        rx,
        deferred,
        disconnected,
        ..
    } = serving;
    let mut between = |e: &mut Engine<'m>| take_commands(rx, e, deferred, disconnected, false);
    let is_stopped = || stop.is_raised();
    let mut gen = EngineGenerator {
        model,
        engine,
        adapter: job.adapter.clone(),
        between_steps: &mut between,
        stop: &is_stopped,
    };
    let mut observer = SelfInstructObserver { events, stop };
    selfinstruct::run(&job.seeds, &job.params, &mut gen, &mut observer)
}
