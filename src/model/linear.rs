//! Weights of a projection (dense or quantized) and the one linear type every projection uses.
//!
//! A [`Linear`] knows which projection it is ([`LinearId`]), so LoRA side matrices are attached
//! from outside through a [`LoraHook`] without touching the rest of the model: the base weights
//! stay frozen and shared, and one forward pass may apply different adapters to different rows.

use super::quant::{QMatMul, QMatrix};
use candle_core::{DType, Result, Tensor};
use std::sync::Arc;

/// A frozen `[out, in]` weight matrix.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Any float dtype on any device; cloning shares the storage.
    Dense(Tensor),
    /// Quantized blocks computed with f32 activations on the CPU.
    Quantized(Arc<QMatrix>),
}

impl Weight {
    pub fn out_dim(&self) -> usize {
        match self {
            Self::Dense(w) => w.dims()[0],
            Self::Quantized(q) => q.rows(),
        }
    }

    pub fn in_dim(&self) -> usize {
        match self {
            Self::Dense(w) => w.dims()[1],
            Self::Quantized(q) => q.cols(),
        }
    }

    /// The matrix as a dense f32 tensor (quantized weights are expanded).
    pub fn to_dense_f32(&self) -> Result<Tensor> {
        match self {
            Self::Dense(w) => w.to_dtype(DType::F32),
            Self::Quantized(q) => Tensor::from_vec(
                q.dequantize(),
                (q.rows(), q.cols()),
                &candle_core::Device::Cpu,
            ),
        }
    }

    /// Bytes held in memory.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Self::Quantized(q) => q.size_in_bytes(),
        }
    }

    /// `xs[.., in] · Wᵀ`, in the dtype of `xs`.
    pub fn matmul_t(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => xs.broadcast_matmul(&w.t()?),
            Self::Quantized(q) => quantized_matmul_t(vec![q.clone()], xs),
        }
    }

    /// `xs · Wᵢᵀ` for several weights sharing the input; quantized weights run as one fused op.
    pub fn matmul_t_group(ws: &[&Weight], xs: &Tensor) -> Result<Vec<Tensor>> {
        let quantized: Option<Vec<Arc<QMatrix>>> = ws
            .iter()
            .map(|w| match w {
                Self::Quantized(q) => Some(q.clone()),
                Self::Dense(_) => None,
            })
            .collect();
        let Some(qs) = quantized.filter(|qs| qs.len() > 1) else {
            return ws.iter().map(|w| w.matmul_t(xs)).collect();
        };
        let widths: Vec<usize> = qs.iter().map(|q| q.rows()).collect();
        let ys = quantized_matmul_t(qs, xs)?;
        let mut start = 0;
        widths
            .into_iter()
            .map(|n| {
                let y = ys.narrow(candle_core::D::Minus1, start, n);
                start += n;
                y
            })
            .collect()
    }

    /// Rows `ids` of the matrix (an embedding lookup), as `[ids.len(), in]` in `dtype`.
    pub fn rows(&self, ids: &[u32], dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
        match self {
            Self::Dense(w) => {
                let idx = Tensor::new(ids, w.device())?;
                w.index_select(&idx, 0)?.to_dtype(dtype)
            }
            Self::Quantized(q) => {
                let cols = q.cols();
                let mut out = vec![0f32; ids.len() * cols];
                for (&id, o) in ids.iter().zip(out.chunks_exact_mut(cols)) {
                    if id as usize >= q.rows() {
                        candle_core::bail!(
                            "token id {id} is outside the vocabulary of {}",
                            q.rows()
                        )
                    }
                    q.dequantize_rows(id as usize, o);
                }
                Tensor::from_vec(out, (ids.len(), cols), device)?.to_dtype(dtype)
            }
        }
    }
}

fn quantized_matmul_t(qs: Vec<Arc<QMatrix>>, xs: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    let ys = xs
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&QMatMul(qs))?;
    ys.to_dtype(dtype)
}

/// The seven LLaMA projections, named as in Hugging Face checkpoints and PEFT `target_modules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.hf_name() == name)
    }

    /// The Hugging Face module that holds this projection (`self_attn` or `mlp`).
    pub fn hf_parent(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            Self::Gate | Self::Up | Self::Down => "mlp",
        }
    }
}

/// Inference runs the fastest ops; training runs ops whose gradients flow back to the inputs
/// (and so to the LoRA matrices of earlier layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Infer,
    Train(ComputeDtype),
}

/// Arithmetic of the frozen projections in training (the LoRA matrices, norms, attention and
/// the optimizer stay f32). `bf16` rounds activations and weights to bf16 and accumulates in
/// f32, as QLoRA's compute dtype does: 1.2–1.4x faster training steps on CPUs with
/// AVX512-BF16 (`tuneshop bench-train --compute-dtype bf16`); elsewhere (and off the CPU) it computes in f32.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for ComputeDtype {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown compute dtype `{other}` (expected f32 or bf16)"
            )),
        }
    }
}

/// Which projection of which layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinearId {
    pub layer: usize,
    pub proj: Proj,
}

/// Adds low-rank updates to projection outputs. Implemented by the LoRA trainer (one adapter on
/// every row) and by inference (a different adapter per row of the batch).
pub trait LoraHook {
    /// Returns `ys` (the frozen projection's output for inputs `xs`) plus any update for `id`.
    fn apply(&self, id: LinearId, xs: &Tensor, ys: Tensor) -> Result<Tensor>;
}

/// The base model alone.
pub struct NoLora;

impl LoraHook for NoLora {
    fn apply(&self, _id: LinearId, _xs: &Tensor, ys: Tensor) -> Result<Tensor> {
        Ok(ys)
    }
}

/// A frozen projection of the model.
#[derive(Debug, Clone)]
pub struct Linear {
    id: LinearId,
    weight: Weight,
}

impl Linear {
    pub fn new(id: LinearId, weight: Weight) -> Self {
        Self { id, weight }
    }

    pub fn id(&self) -> LinearId {
        self.id
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    pub fn forward(&self, xs: &Tensor, lora: &dyn LoraHook, mode: Mode) -> Result<Tensor> {
        let [y] = Self::forward_group([self], xs, lora, mode)?;
        Ok(y)
    }

    /// [`Linear::forward`] of several projections that share their input, fused where the
    /// weights allow; each output still gets its own LoRA update.
    pub fn forward_group<const N: usize>(
        ls: [&Linear; N],
        xs: &Tensor,
        lora: &dyn LoraHook,
        mode: Mode,
    ) -> Result<[Tensor; N]> {
        let weights: Vec<&Weight> = ls.iter().map(|l| &l.weight).collect();
        let ys = match mode {
            Mode::Infer => Weight::matmul_t_group(&weights, xs)?,
            Mode::Train(dtype) => super::grad_ops::frozen_matmul_t(&weights, xs, dtype)?,
        };
        let out = ls
            .iter()
            .zip(ys)
            .map(|(l, y)| lora.apply(l.id, xs, y))
            .collect::<Result<Vec<_>>>()?;
        out.try_into()
            .map_err(|_| candle_core::Error::Msg("projection group size".into()))
    }
}
