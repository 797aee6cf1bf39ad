//! The Hugging Face PEFT adapter format: `adapter_config.json` and `adapter_model.safetensors`
//! with keys like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (A is
//! `[r, in]`, B is `[out, r]`). Loading validates everything against the base model, so an
//! adapter that cannot be served is rejected here, with the reason.

use super::config::{parse_targets, PeftConfig};
use super::{Adapter, LoraConfig, LoraError, LoraPair};
use crate::model::{Config, LinearId, Proj};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The PEFT key of one LoRA matrix (`which` is 'A' or 'B').
pub fn key(id: LinearId, which: char) -> String {
    format!(
        "base_model.model.model.layers.{}.{}.{}.lora_{which}.weight",
        id.layer,
        id.proj.hf_parent(),
        id.proj.hf_name()
    )
}

/// Parses a PEFT key into (projection, 'A' or 'B'); accepts the adapter-name infix PEFT uses
/// in memory (`lora_A.default.weight`).
fn parse_key(key: &str) -> Option<(LinearId, char)> {
    let rest = key.strip_prefix("base_model.model.model.layers.")?;
    let mut parts = rest.split('.');
    let layer = parts.next()?.parse().ok()?;
    let parent = parts.next()?;
    let proj = Proj::from_hf_name(parts.next()?)?;
    let which = match parts.next()? {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return None,
    };
    let tail: Vec<&str> = parts.collect();
    if !(tail == ["weight"] || tail == ["default", "weight"]) || parent != proj.hf_parent() {
        return None;
    }
    Some((LinearId { layer, proj }, which))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LoraError + '_ {
    move |source| LoraError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `adapter` into `dir` (created if needed); each file goes through a temporary name and
/// a rename, so a reader never sees half a file.
pub fn save(adapter: &Adapter, dir: &Path) -> Result<(), LoraError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let c = &adapter.config;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": c.r,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": c.targets.iter().map(|p| p.hf_name()).collect::<Vec<_>>(),
        "use_rslora": c.use_rslora,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "base_model_name_or_path": adapter.base_model,
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| LoraError::BadConfig {
        path: dir.join(CONFIG_FILE),
        detail: e.to_string(),
    })?;
    write_atomic(&dir.join(CONFIG_FILE), |p| {
        std::fs::write(p, &text).map_err(io(p))
    })?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (&id, pair) in &adapter.pairs {
        tensors.insert(key(id, 'A'), pair.a.to_dtype(DType::F32)?.contiguous()?);
        tensors.insert(key(id, 'B'), pair.b.to_dtype(DType::F32)?.contiguous()?);
    }
    write_atomic(&dir.join(WEIGHTS_FILE), |p| {
        candle_core::safetensors::save(&tensors, p).map_err(LoraError::from)
    })
}

fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), LoraError>,
) -> Result<(), LoraError> {
    let tmp = path.with_extension("tmp");
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Reads and validates the PEFT adapter in `dir` for a base model with config `base`.
pub fn load(dir: &Path, base: &Config, device: &Device) -> Result<Adapter, LoraError> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        return Err(LoraError::Unsupported(format!(
            "`{WEIGHTS_FILE}` is missing (PyTorch .bin adapters are not read; save with safetensors)"
        )));
    }
    let weights = std::fs::read(&weights_path).map_err(io(&weights_path))?;
    from_bytes(&config_path, &text, &weights, base, device)
}

/// [`load`] from the two files' contents (`origin` names the config in errors).
pub fn from_bytes(
    origin: &Path,
    config_json: &str,
    weights: &[u8],
    base: &Config,
    device: &Device,
) -> Result<Adapter, LoraError> {
    let peft: PeftConfig = serde_json::from_str(config_json).map_err(|e| LoraError::BadConfig {
        path: origin.to_path_buf(),
        detail: e.to_string(),
    })?;
    let config = validate_config(&peft)?;
    config.validate(base)?;
    let raw = candle_core::safetensors::load_buffer(weights, device)?;
    let mut a_and_b: BTreeMap<LinearId, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, tensor) in raw {
        let Some((id, which)) = parse_key(&name) else {
            return Err(LoraError::Tensor {
                key: name,
                detail: "not a LoRA matrix of a LLaMA projection (embeddings, lm_head and \
                         modules_to_save are not supported)"
                    .into(),
            });
        };
        if id.layer >= base.num_hidden_layers {
            return Err(LoraError::Tensor {
                key: name,
                detail: format!(
                    "layer {} does not exist; the base model has {}",
                    id.layer, base.num_hidden_layers
                ),
            });
        }
        if !config.targets.contains(&id.proj) {
            return Err(LoraError::Tensor {
                key: name,
                detail: "its module is not in `target_modules`".into(),
            });
        }
        let (out, inp) = LoraConfig::shape_of(id.proj, base);
        let want = if which == 'A' {
            (config.r, inp)
        } else {
            (out, config.r)
        };
        if tensor.dims2().ok() != Some(want) {
            return Err(LoraError::Tensor {
                key: name,
                detail: format!(
                    "shape {:?} does not fit the base model (expected [{}, {}] for r = {})",
                    tensor.dims(),
                    want.0,
                    want.1,
                    config.r
                ),
            });
        }
        let tensor = tensor.to_dtype(DType::F32)?;
        let slot = a_and_b.entry(id).or_default();
        if which == 'A' {
            slot.0 = Some(tensor);
        } else {
            slot.1 = Some(tensor);
        }
    }
    let mut pairs = BTreeMap::new();
    for (id, slot) in a_and_b {
        match slot {
            (Some(a), Some(b)) => {
                pairs.insert(id, LoraPair { a, b });
            }
            (a, _) => {
                return Err(LoraError::Tensor {
                    key: key(id, if a.is_some() { 'B' } else { 'A' }),
                    detail: "missing (every adapted projection needs both lora_A and lora_B)"
                        .into(),
                })
            }
        }
    }
    if pairs.is_empty() {
        return Err(LoraError::Unsupported(
            "the adapter has no LoRA matrices".into(),
        ));
    }
    Ok(Adapter {
        config,
        base_model: peft.base_model_name_or_path.unwrap_or_default(),
        pairs,
    })
}

/// Turns a PEFT config into ours, rejecting the features tuneshop cannot serve.
fn validate_config(p: &PeftConfig) -> Result<LoraConfig, LoraError> {
    let unsupported = |what: &str| Err(LoraError::Unsupported(what.to_string()));
    if p.peft_type != "LORA" {
        return unsupported(&format!(
            "`peft_type` is `{}`; only LORA adapters are supported",
            p.peft_type
        ));
    }
    if p.use_dora {
        return unsupported("DoRA (`use_dora: true`) is not supported");
    }
    let non_empty = |v: &Option<serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(serde_json::Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    if non_empty(&p.modules_to_save) {
        return unsupported("`modules_to_save` (fully trained extra modules) is not supported");
    }
    if non_empty(&p.rank_pattern) || non_empty(&p.alpha_pattern) {
        return unsupported("per-module `rank_pattern` / `alpha_pattern` are not supported");
    }
    if p.bias != "none" {
        return unsupported(&format!(
            "`bias: {}` is not supported (use \"none\")",
            p.bias
        ));
    }
    if p.fan_in_fan_out {
        return unsupported("`fan_in_fan_out: true` (Conv1D layouts) is not supported");
    }
    let names: Vec<String> = match &p.target_modules {
        serde_json::Value::String(s) if s == "all-linear" => vec![s.clone()],
        serde_json::Value::String(s) => {
            return unsupported(&format!(
                "`target_modules` as a pattern (`{s}`) is not supported; list the modules"
            ))
        }
        serde_json::Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                LoraError::Unsupported("`target_modules` must be a list of names".into())
            })?,
        _ => return unsupported("`target_modules` must be a list of names"),
    };
    Ok(LoraConfig {
        r: p.r,
        alpha: p.lora_alpha,
        dropout: p.lora_dropout,
        targets: parse_targets(&names)?,
        use_rslora: p.use_rslora,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let id = LinearId {
            layer: 3,
            proj: Proj::Down,
        };
        assert_eq!(
            key(id, 'B'),
            "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"
        );
        assert_eq!(parse_key(&key(id, 'B')), Some((id, 'B')));
        assert_eq!(
            parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"),
            Some((
                LinearId {
                    layer: 0,
                    proj: Proj::Q
                },
                'A'
            ))
        );
        assert_eq!(parse_key("base_model.model.lm_head.lora_A.weight"), None);
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight"),
            None
        );
    }
}
