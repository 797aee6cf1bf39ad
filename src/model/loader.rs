//! Loads a base model (weights, tokenizer, chat template) from a GGUF file or a Hugging Face
//! directory.
//!
//! GGUF stores q and k rows interleaved for llama.cpp's RoPE; they are reordered here into the
//! Hugging Face layout, so the model has one RoPE convention and PEFT adapters (trained against
//! Hugging Face weights) apply unchanged.

use super::gguf::{GgmlType, GgufFile, TensorInfo};
use super::linear::Weight;
use super::llama::{LayerWeights, Llama};
use super::quant::{QMatrix, QType};
use super::{ChatTemplate, Config, ModelError, Tokenizer};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to hold the weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Dtype of dense weights and activations for Hugging Face models (GGUF computes in f32).
    pub dtype: DType,
    /// Expand quantized GGUF weights to f32 at load (more memory; what non-CPU devices do).
    pub dequantize: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            dequantize: false,
        }
    }
}

/// A loaded base model with what it needs to turn text into tokens and back.
pub struct BaseModel {
    pub llama: Llama,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub path: PathBuf,
    /// How the weights are held, e.g. "q4_1+q8_0" or "f32".
    pub weight_format: String,
}

/// Loads `path`: a `.gguf` file or a directory with `config.json` and `*.safetensors`.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<BaseModel, ModelError> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return load_hf_dir(path, opts);
        }
    } else if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        || is_gguf(path)
    {
        return load_gguf(path, opts);
    }
    Err(ModelError::UnrecognizedFormat(path.to_path_buf()))
}

fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

fn weights_err(origin: &Path, detail: impl std::fmt::Display) -> ModelError {
    ModelError::Weights {
        origin: origin.display().to_string(),
        detail: detail.to_string(),
    }
}

fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<BaseModel, ModelError> {
    let file = GgufFile::open(path)?;
    let cfg = Config::from_gguf(&file)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let chat_template = match file.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        Some(src) => Some(ChatTemplate::new(
            src.to_string(),
            tokenizer.bos_token(),
            tokenizer.eos_token(),
        )?),
        None => None,
    };
    // Quantized kernels are CPU code; elsewhere the weights are expanded.
    let dequantize = opts.dequantize || !opts.device.is_cpu();
    let mut formats = std::collections::BTreeSet::new();
    let mut weight = |name: &str, heads: Option<usize>| -> Result<Weight, ModelError> {
        let info = file.require_tensor(name)?;
        formats.insert(format!("{:?}", info.ggml_type).to_lowercase());
        gguf_weight(&file, info, heads, &opts.device, dequantize)
    };
    let embed = weight("token_embd.weight", None)?;
    let head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        weight("output.weight", None)?
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = |t: &str| format!("blk.{i}.{t}.weight");
        let projections = [
            weight(&p("attn_q"), Some(cfg.num_attention_heads))?,
            weight(&p("attn_k"), Some(cfg.num_key_value_heads))?,
            weight(&p("attn_v"), None)?,
            weight(&p("attn_output"), None)?,
            weight(&p("ffn_gate"), None)?,
            weight(&p("ffn_up"), None)?,
            weight(&p("ffn_down"), None)?,
        ];
        layers.push(LayerWeights {
            attn_norm: gguf_vector(&file, &p("attn_norm"), &opts.device)?,
            ffn_norm: gguf_vector(&file, &p("ffn_norm"), &opts.device)?,
            projections,
        });
    }
    let norm = gguf_vector(&file, "output_norm.weight", &opts.device)?;
    let weight_format = if dequantize {
        "f32".to_string()
    } else {
        formats
            .into_iter()
            .filter(|f| f != "f32")
            .collect::<Vec<_>>()
            .join("+")
    };
    let llama =
        Llama::new(cfg, embed, head, norm, layers, DType::F32).map_err(|e| weights_err(path, e))?;
    Ok(BaseModel {
        llama,
        tokenizer,
        chat_template,
        path: path.to_path_buf(),
        weight_format: if weight_format.is_empty() {
            "f32".into()
        } else {
            weight_format
        },
    })
}

/// Undoes llama.cpp's q/k row interleaving: Hugging Face row `h*d + j*d/2 + i` is GGUF row
/// `h*d + 2i + j`.
fn unpermute_rows(bytes: Vec<u8>, rows: usize, heads: usize) -> Vec<u8> {
    let row_bytes = bytes.len() / rows;
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for r in 0..d {
            let (j, i) = (r / half, r % half);
            let src = h * d + 2 * i + j;
            let dst = h * d + r;
            out[dst * row_bytes..(dst + 1) * row_bytes]
                .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
        }
    }
    out
}

/// The inverse of [`unpermute_rows`], for writing GGUF files.
pub(crate) fn permute_rows(bytes: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    let row_bytes = bytes.len() / rows;
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for r in 0..d {
            let (j, i) = (r / half, r % half);
            let dst = h * d + 2 * i + j;
            let src = h * d + r;
            out[dst * row_bytes..(dst + 1) * row_bytes]
                .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
        }
    }
    out
}

fn f32_values(info: &TensorInfo, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match info.ggml_type {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

fn gguf_weight(
    file: &GgufFile,
    info: &TensorInfo,
    heads: Option<usize>,
    device: &Device,
    dequantize: bool,
) -> Result<Weight, ModelError> {
    let [cols, rows] = info.dims[..] else {
        return Err(weights_err(
            &file.path,
            format!(
                "tensor `{}` has shape {:?}, expected a matrix",
                info.name, info.dims
            ),
        ));
    };
    let mut bytes = file.read_bytes(info)?;
    if let Some(heads) = heads {
        if rows % heads != 0 || (rows / heads) % 2 != 0 {
            return Err(weights_err(
                &file.path,
                format!(
                    "tensor `{}` has {rows} rows, not {heads} heads of even size",
                    info.name
                ),
            ));
        }
        bytes = unpermute_rows(bytes, rows, heads);
    }
    let qtype = match info.ggml_type {
        GgmlType::Q4_0 => Some(QType::Q4_0),
        GgmlType::Q4_1 => Some(QType::Q4_1),
        GgmlType::Q8_0 => Some(QType::Q8_0),
        _ => None,
    };
    let values = match (qtype, f32_values(info, &bytes)) {
        (Some(qtype), _) => {
            let q = QMatrix::from_ggml_bytes(qtype, rows, cols, &bytes)
                .map_err(|e| weights_err(&file.path, e))?;
            if !dequantize {
                return Ok(Weight::Quantized(Arc::new(q)));
            }
            q.dequantize()
        }
        (None, Some(values)) => values,
        // K-quants and the rest: expanded with candle's reference dequantizers.
        (None, None) => {
            let dtype = candle_dtype(info.ggml_type);
            let qt = candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                &bytes,
                vec![rows, cols],
                &Device::Cpu,
            )?;
            return Ok(Weight::Dense(
                qt.dequantize(&Device::Cpu)?.to_device(device)?,
            ));
        }
    };
    Ok(Weight::Dense(Tensor::from_vec(
        values,
        (rows, cols),
        device,
    )?))
}

fn candle_dtype(t: GgmlType) -> candle_core::quantized::GgmlDType {
    use candle_core::quantized::GgmlDType as G;
    match t {
        GgmlType::F32 => G::F32,
        GgmlType::F16 => G::F16,
        GgmlType::BF16 => G::BF16,
        GgmlType::Q4_0 => G::Q4_0,
        GgmlType::Q4_1 => G::Q4_1,
        GgmlType::Q5_0 => G::Q5_0,
        GgmlType::Q5_1 => G::Q5_1,
        GgmlType::Q8_0 => G::Q8_0,
        GgmlType::Q8_1 => G::Q8_1,
        GgmlType::Q2K => G::Q2K,
        GgmlType::Q3K => G::Q3K,
        GgmlType::Q4K => G::Q4K,
        GgmlType::Q5K => G::Q5K,
        GgmlType::Q6K => G::Q6K,
        GgmlType::Q8K => G::Q8K,
    }
}

fn gguf_vector(file: &GgufFile, name: &str, device: &Device) -> Result<Tensor, ModelError> {
    let info = file.require_tensor(name)?;
    let bytes = file.read_bytes(info)?;
    let values = f32_values(info, &bytes).ok_or_else(|| {
        weights_err(
            &file.path,
            format!("tensor `{name}` must be f32, f16 or bf16"),
        )
    })?;
    Ok(Tensor::from_vec(values, info.n_elements(), device)?)
}

/// The `*.safetensors` files of a Hugging Face directory (sharded or not).
fn safetensor_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let io = |source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(io)?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| weights_err(&index, e))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| weights_err(&index, "no `weight_map`"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(weights_err(dir, "no *.safetensors files"));
    }
    Ok(files)
}

fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<BaseModel, ModelError> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
        path: config_path.clone(),
        source,
    })?;
    let mut cfg = Config::from_hf_json(&text, &config_path.display().to_string())?;
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let chat_template = hf_chat_template(dir)?
        .map(|src| ChatTemplate::new(src, tokenizer.bos_token(), tokenizer.eos_token()))
        .transpose()?;
    let files = safetensor_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; tuneshop never writes model files while
    // they are loaded.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| weights_err(dir, e))?;
    let dtype = opts.dtype;
    let get = |name: &str| -> Result<Tensor, ModelError> {
        st.load(name, &opts.device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| weights_err(dir, format!("tensor `{name}`: {e}")))
    };
    let embed = Weight::Dense(get("model.embed_tokens.weight")?);
    let head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        match st.get("lm_head.weight") {
            Ok(_) => Weight::Dense(get("lm_head.weight")?),
            // Some checkpoints omit the head and rely on tying.
            Err(_) => {
                cfg.tie_word_embeddings = true;
                embed.clone()
            }
        }
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = |t: &str| format!("model.layers.{i}.{t}.weight");
        let w = |t: &str| get(&p(t)).map(Weight::Dense);
        layers.push(LayerWeights {
            attn_norm: get(&p("input_layernorm"))?,
            ffn_norm: get(&p("post_attention_layernorm"))?,
            projections: [
                w("self_attn.q_proj")?,
                w("self_attn.k_proj")?,
                w("self_attn.v_proj")?,
                w("self_attn.o_proj")?,
                w("mlp.gate_proj")?,
                w("mlp.up_proj")?,
                w("mlp.down_proj")?,
            ],
        });
    }
    let norm = get("model.norm.weight")?;
    let llama =
        Llama::new(cfg, embed, head, norm, layers, dtype).map_err(|e| weights_err(dir, e))?;
    Ok(BaseModel {
        llama,
        tokenizer,
        chat_template,
        path: dir.to_path_buf(),
        weight_format: format!("{dtype:?}").to_lowercase(),
    })
}

/// `chat_template` from `tokenizer_config.json` (a string, or a list of named templates of
/// which "default" is used), or a `chat_template.jinja` file.
fn hf_chat_template(dir: &Path) -> Result<Option<String>, ModelError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|source| ModelError::Io {
                path: jinja,
                source,
            });
    }
    let path = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::Tokenizer {
            origin: path.display().to_string(),
            detail: e.to_string(),
        })?;
    Ok(match json.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .map(str::to_string),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips() {
        let rows = 12;
        let bytes: Vec<u8> = (0..rows as u8 * 3).collect();
        let there = permute_rows(&bytes, rows, 2);
        assert_ne!(there, bytes);
        assert_eq!(unpermute_rows(there, rows, 2), bytes);
    }
}
