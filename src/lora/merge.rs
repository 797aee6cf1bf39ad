//! Folds an adapter into a dense copy of the base model and writes it as a Hugging Face model
//! directory (for export to tools that do not load adapters).

use super::{Adapter, LoraError};
use crate::model::{BaseModel, LinearId};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Every weight of `base` in Hugging Face naming and layout as f32, with `scale · B·A` added to
/// the adapted projections.
pub fn merged_tensors(
    base: &BaseModel,
    adapter: Option<&Adapter>,
) -> Result<HashMap<String, Tensor>, LoraError> {
    let mut out = HashMap::new();
    for (name, id, tensor) in base.llama.hf_tensors()? {
        let merged = match (adapter, id) {
            (Some(a), Some(id)) => match a.pairs.get(&id) {
                Some(p) => {
                    let delta =
                        (p.b.to_dtype(DType::F32)?
                            .matmul(&p.a.to_dtype(DType::F32)?)?
                            * a.config.scale())?;
                    (tensor + delta)?
                }
                None => tensor,
            },
            _ => tensor,
        };
        out.insert(name, merged.contiguous()?);
    }
    Ok(out)
}

/// Writes `base` (+ `adapter`) as a Hugging Face directory: config.json, model.safetensors,
/// tokenizer.json, tokenizer_config.json.
pub fn write_hf_dir(
    base: &BaseModel,
    adapter: Option<&Adapter>,
    dir: &Path,
) -> Result<(), LoraError> {
    let io = |source| LoraError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let tensors = merged_tensors(base, adapter)?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let config = base.llama.config().to_hf_json();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap_or_default(),
    )
    .map_err(io)?;
    base.tokenizer
        .save(&dir.join("tokenizer.json"))
        .map_err(|e| LoraError::Unsupported(e.to_string()))?;
    let tok_config = serde_json::json!({
        "bos_token": base.tokenizer.bos_token(),
        "eos_token": base.tokenizer.eos_token(),
        "add_bos_token": base.tokenizer.adds_bos(),
        "chat_template": base.chat_template.as_ref().map(|t| t.source().to_string()),
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tok_config).unwrap_or_default(),
    )
    .map_err(io)
}

/// The projection a Hugging Face weight name belongs to, if any.
pub fn linear_of(name: &str) -> Option<LinearId> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let proj_name = rest.strip_suffix(".weight")?.rsplit('.').next()?;
    Some(LinearId {
        layer: layer.parse().ok()?,
        proj: crate::model::Proj::from_hf_name(proj_name)?,
    })
}
