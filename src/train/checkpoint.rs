//! Checkpoints: the adapter (PEFT files), the optimizer moments and the trainer's position,
//! written to a temporary directory and renamed into place, so a crash leaves either a whole
//! checkpoint or none.

use super::TrainError;
use crate::lora::{peft, Adapter};
use crate::model::Config;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";
const PREFIX: &str = "checkpoint-";

/// The files of one checkpoint directory.
pub const FILES: [&str; 4] = [
    peft::CONFIG_FILE,
    peft::WEIGHTS_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
];

/// Where training stood when the checkpoint was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    pub train_loss: f64,
    pub valid_loss: Option<f64>,
    pub tokens_trained: usize,
    /// The run's seed (data order and dropout derive from it and the step).
    pub seed: u64,
}

/// A checkpoint read back from disk.
pub struct Checkpoint {
    pub adapter: Adapter,
    /// First and second moments by variable name.
    pub moments: HashMap<String, (Tensor, Tensor)>,
    pub state: TrainerState,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Checkpoint(format!("`{}`: {e}", path.display()))
}

pub fn path_for(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("{PREFIX}{step}"))
}

/// Writes checkpoint `state.step` under `dir`.
pub fn save(
    dir: &Path,
    adapter: &Adapter,
    moments: &[(String, Tensor, Tensor)],
    state: &TrainerState,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let final_path = path_for(dir, state.step);
    let tmp = dir.join(format!(".tmp-{PREFIX}{}", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    peft::save(adapter, &tmp)?;
    let mut tensors = HashMap::new();
    for (name, m, v) in moments {
        tensors.insert(format!("m.{name}"), m.contiguous()?);
        tensors.insert(format!("v.{name}"), v.contiguous()?);
    }
    candle_core::safetensors::save(&tensors, tmp.join(OPTIMIZER_FILE))?;
    let json =
        serde_json::to_string_pretty(state).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    std::fs::write(tmp.join(STATE_FILE), json).map_err(io(&tmp))?;
    if final_path.exists() {
        std::fs::remove_dir_all(&final_path).map_err(io(&final_path))?;
    }
    std::fs::rename(&tmp, &final_path).map_err(io(&final_path))?;
    Ok(final_path)
}

/// Reads a checkpoint written by [`save`].
pub fn load(path: &Path, base: &Config) -> Result<Checkpoint, TrainError> {
    let adapter = peft::load(path, base, &Device::Cpu)?;
    let raw = candle_core::safetensors::load(path.join(OPTIMIZER_FILE), &Device::Cpu)?;
    let mut m = HashMap::new();
    let mut v = HashMap::new();
    for (key, t) in raw {
        if let Some(name) = key.strip_prefix("m.") {
            m.insert(name.to_string(), t);
        } else if let Some(name) = key.strip_prefix("v.") {
            v.insert(name.to_string(), t);
        }
    }
    let moments = m
        .into_iter()
        .filter_map(|(name, mt)| v.remove(&name).map(|vt| (name, (mt, vt))))
        .collect();
    let text = std::fs::read_to_string(path.join(STATE_FILE)).map_err(io(path))?;
    let state = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    Ok(Checkpoint {
        adapter,
        moments,
        state,
    })
}

/// The complete checkpoints in `dir`, by step.
pub fn list(dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix(PREFIX)?.parse().ok()?;
            Some((step, e.path()))
        })
        .filter(|(_, p)| p.join(STATE_FILE).is_file())
        .collect();
    out.sort();
    out
}

/// The most recent complete checkpoint in `dir`.
pub fn latest(dir: &Path) -> Option<PathBuf> {
    list(dir).pop().map(|(_, p)| p)
}
