//! The key/value cache of one sequence, kept outside the model so one `&Llama` serves many
//! sequences at once.
//!
//! Keys and values live in per-layer buffers `[kv_heads, capacity, head_dim]` that grow by
//! doubling; appends write in place, so decoding a token does not copy the past.

use super::Config;
use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    kv_heads: usize,
    head_dim: usize,
    max_len: usize,
}

impl KvCache {
    pub fn new(cfg: &Config) -> Self {
        Self {
            layers: vec![None; cfg.num_hidden_layers],
            len: 0,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            max_len: cfg.max_position_embeddings,
        }
    }

    /// Tokens already processed; the next token's position.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the buffers.
    pub fn size_in_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Forgets everything after the first `len` tokens (e.g. to reuse a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`) of `layer` after the cached tokens and returns
    /// views of all keys and values so far. The length advances only in [`KvCache::advance`],
    /// once every layer has appended.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        let total = self.len + n;
        if total > self.max_len {
            candle_core::bail!(
                "sequence of {total} tokens exceeds the model's context of {}",
                self.max_len
            )
        }
        let needs_grow = match &self.layers[layer] {
            Some((kb, _)) => kb.dim(1)? < total,
            None => true,
        };
        if needs_grow {
            let cap = total.next_power_of_two().clamp(16, self.max_len.max(total));
            let kb = self.buffer(cap, k.dtype(), k.device())?;
            let vb = self.buffer(cap, v.dtype(), v.device())?;
            if let Some((old_k, old_v)) = &self.layers[layer] {
                if self.len > 0 {
                    kb.slice_set(&old_k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    vb.slice_set(&old_v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
            }
            self.layers[layer] = Some((kb, vb));
        }
        let Some((kb, vb)) = &self.layers[layer] else {
            candle_core::bail!("kv cache layer {layer} was not allocated")
        };
        kb.slice_set(&k.contiguous()?, 1, self.len)?;
        vb.slice_set(&v.contiguous()?, 1, self.len)?;
        Ok((kb.narrow(1, 0, total)?, vb.narrow(1, 0, total)?))
    }

    fn buffer(&self, cap: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::zeros((self.kv_heads, cap, self.head_dim), dtype, device)
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
