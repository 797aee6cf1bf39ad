//! Our LLaMA forward pass over a ragged batch of sequences.
//!
//! Written with candle-core/candle-nn; the layer structure follows candle-transformers'
//! `llama.rs` (credit to the candle authors), but every position's logits are available (training
//! needs them), the KV cache lives outside the model, and every projection is a [`Linear`] that
//! LoRA hooks into. Rows of a batch are the new tokens of several sequences concatenated; the
//! projections and MLPs run on all rows at once, attention runs per sequence.

use super::attention::{attend, Heads};
use super::cache::KvCache;
use super::grad_ops;
use super::linear::{ComputeDtype, Linear, LinearId, LoraHook, Mode, Proj, Weight};
use super::Config;
use candle_core::{DType, Device, IndexOp, Result, Tensor};

mod recompute;

/// One sequence's new tokens in a ragged batch.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    /// `None` for a standalone sequence (training): attention sees only these tokens.
    pub cache: Option<&'a mut KvCache>,
}

struct Block {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Frozen per-layer weights handed to [`Llama::new`] by the loaders.
pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub ffn_norm: Tensor,
    /// In [`Proj::ALL`] order, Hugging Face layout (non-interleaved RoPE rows for q and k).
    pub projections: [Weight; 7],
}

pub struct Llama {
    cfg: Config,
    embed: Weight,
    layers: Vec<Block>,
    norm: Tensor,
    head: Weight,
    inv_freq: Vec<f32>,
    device: Device,
    dtype: DType,
}

/// What every layer of one forward pass shares.
struct BatchCtx<'a> {
    spans: Vec<Span>,
    cos: Tensor,
    sin: Tensor,
    lora: &'a dyn LoraHook,
    mode: Mode,
}

/// How each sequence's rows sit in the batch.
struct Span {
    start: usize,
    len: usize,
    /// Position of the span's first token (tokens already in the cache).
    pos: usize,
    /// Additive causal mask `[len, pos + len]` when `len > 1`.
    mask: Option<Tensor>,
}

impl Llama {
    pub fn new(
        cfg: Config,
        embed: Weight,
        head: Weight,
        norm: Tensor,
        layers: Vec<LayerWeights>,
        dtype: DType,
    ) -> Result<Self> {
        if layers.len() != cfg.num_hidden_layers {
            candle_core::bail!(
                "expected {} layers, got {}",
                cfg.num_hidden_layers,
                layers.len()
            )
        }
        let device = norm.device().clone();
        let expect = |w: &Weight, out: usize, inp: usize, what: &str| {
            if w.out_dim() != out || w.in_dim() != inp {
                candle_core::bail!(
                    "{what} has shape [{}, {}], expected [{out}, {inp}]",
                    w.out_dim(),
                    w.in_dim()
                )
            }
            Ok(())
        };
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        expect(&embed, cfg.vocab_size, h, "token embedding")?;
        expect(&head, cfg.vocab_size, h, "output head")?;
        let mut blocks = Vec::with_capacity(layers.len());
        for (layer, lw) in layers.into_iter().enumerate() {
            let shapes = [
                (cfg.q_dim(), h),
                (cfg.kv_dim(), h),
                (cfg.kv_dim(), h),
                (h, cfg.q_dim()),
                (i, h),
                (i, h),
                (h, i),
            ];
            let [q, k, v, o, gate, up, down] = lw.projections;
            let linears = [q, k, v, o, gate, up, down]
                .into_iter()
                .zip(Proj::ALL)
                .zip(shapes)
                .map(|((w, proj), (out, inp))| {
                    expect(&w, out, inp, &format!("layer {layer} {}", proj.hf_name()))?;
                    Ok(Linear::new(LinearId { layer, proj }, w))
                })
                .collect::<Result<Vec<_>>>()?;
            let [q, k, v, o, gate, up, down]: [Linear; 7] = linears
                .try_into()
                .map_err(|_| candle_core::Error::Msg("projection count".into()))?;
            blocks.push(Block {
                attn_norm: lw.attn_norm.to_dtype(dtype)?,
                q,
                k,
                v,
                o,
                ffn_norm: lw.ffn_norm.to_dtype(dtype)?,
                gate,
                up,
                down,
            });
        }
        let inv_freq = cfg.inv_freq();
        Ok(Self {
            cfg,
            embed,
            layers: blocks,
            norm: norm.to_dtype(dtype)?,
            head,
            inv_freq,
            device,
            dtype,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Activation dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every frozen projection, for LoRA set-up and reporting.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|b| [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down])
    }

    /// Every weight as a dense f32 tensor in Hugging Face naming and layout, with the projection
    /// it belongs to (export, merging, checks that the base stays frozen).
    pub fn hf_tensors(&self) -> Result<Vec<(String, Option<LinearId>, Tensor)>> {
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                None,
                self.embed.to_dense_f32()?,
            ),
            (
                "model.norm.weight".to_string(),
                None,
                self.norm.to_dtype(DType::F32)?,
            ),
        ];
        if !self.cfg.tie_word_embeddings {
            out.push((
                "lm_head.weight".to_string(),
                None,
                self.head.to_dense_f32()?,
            ));
        }
        for (i, b) in self.layers.iter().enumerate() {
            let p = |t: &str| format!("model.layers.{i}.{t}.weight");
            out.push((
                p("input_layernorm"),
                None,
                b.attn_norm.to_dtype(DType::F32)?,
            ));
            out.push((
                p("post_attention_layernorm"),
                None,
                b.ffn_norm.to_dtype(DType::F32)?,
            ));
            for l in [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down] {
                let id = l.id();
                let name = p(&format!("{}.{}", id.proj.hf_parent(), id.proj.hf_name()));
                out.push((name, Some(id), l.weight().to_dense_f32()?));
            }
        }
        Ok(out)
    }

    /// Bytes of weights held in memory (a tied head counted once).
    pub fn weight_bytes(&self) -> usize {
        let head = if self.cfg.tie_word_embeddings {
            0
        } else {
            self.head.size_in_bytes()
        };
        let norms: usize = self
            .layers
            .iter()
            .map(|b| {
                (b.attn_norm.elem_count() + b.ffn_norm.elem_count()) * self.dtype.size_in_bytes()
            })
            .sum();
        self.embed.size_in_bytes()
            + head
            + norms
            + self
                .linears()
                .map(|l| l.weight().size_in_bytes())
                .sum::<usize>()
    }

    /// Number of base parameters.
    pub fn parameter_count(&self) -> usize {
        let c = &self.cfg;
        let per_layer = 2 * c.hidden_size
            + c.hidden_size * (2 * c.q_dim() + 2 * c.kv_dim())
            + 3 * c.hidden_size * c.intermediate_size;
        let head = if c.tie_word_embeddings {
            0
        } else {
            c.vocab_size * c.hidden_size
        };
        c.vocab_size * c.hidden_size + head + c.hidden_size + c.num_hidden_layers * per_layer
    }

    /// Final hidden states `[total_tokens, hidden]` for the new tokens of every sequence.
    /// Sequences with a cache continue it and the cache grows by their tokens.
    pub fn forward_hidden(&self, seqs: &mut [SeqInput<'_>], lora: &dyn LoraHook) -> Result<Tensor> {
        self.hidden(seqs, lora, Mode::Infer)
    }

    /// [`Llama::forward_hidden`] for training: sequences without caches, through ops whose
    /// gradients reach every LoRA matrix (the base weights get none).
    pub fn forward_hidden_train(
        &self,
        seqs: &[&[u32]],
        lora: &dyn LoraHook,
        dtype: ComputeDtype,
    ) -> Result<Tensor> {
        let mut inputs: Vec<SeqInput> = seqs
            .iter()
            .map(|tokens| SeqInput {
                tokens,
                cache: None,
            })
            .collect();
        self.hidden(&mut inputs, lora, Mode::Train(dtype))
    }

    /// The tokens of every sequence, concatenated, and what every layer shares.
    fn batch_ctx<'h>(
        &self,
        seqs: &[SeqInput<'_>],
        lora: &'h dyn LoraHook,
        mode: Mode,
    ) -> Result<(Vec<u32>, BatchCtx<'h>)> {
        let mut tokens = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                candle_core::bail!("every sequence in a batch needs at least one new token")
            }
            let pos = s.cache.as_ref().map_or(0, |c| c.len());
            if pos + s.tokens.len() > self.cfg.max_position_embeddings {
                candle_core::bail!(
                    "sequence of {} tokens exceeds the model's context of {}",
                    pos + s.tokens.len(),
                    self.cfg.max_position_embeddings
                )
            }
            let len = s.tokens.len();
            spans.push(Span {
                start: tokens.len(),
                len,
                pos,
                mask: (len > 1)
                    .then(|| causal_mask(len, pos, &self.device, self.dtype))
                    .transpose()?,
            });
            tokens.extend_from_slice(s.tokens);
        }
        let (cos, sin) = self.rope_tables(&spans)?;
        let ctx = BatchCtx {
            spans,
            cos,
            sin,
            lora,
            mode,
        };
        Ok((tokens, ctx))
    }

    fn hidden(&self, seqs: &mut [SeqInput<'_>], lora: &dyn LoraHook, mode: Mode) -> Result<Tensor> {
        let (tokens, ctx) = self.batch_ctx(seqs, lora, mode)?;
        let mut xs = self.embed.rows(&tokens, self.dtype, &self.device)?;
        for (layer, block) in self.layers.iter().enumerate() {
            xs = self.block_forward(layer, block, &xs, &ctx, seqs)?;
        }
        for (s, span) in seqs.iter_mut().zip(&ctx.spans) {
            if let Some(cache) = s.cache.as_deref_mut() {
                cache.advance(span.len);
            }
        }
        self.norm(&xs, &self.norm, mode)
    }

    fn norm(&self, xs: &Tensor, weight: &Tensor, mode: Mode) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        match mode {
            Mode::Infer => candle_nn::ops::rms_norm(xs, weight, eps),
            Mode::Train(_) => grad_ops::rms_norm(xs, weight, eps),
        }
    }

    /// Logits `[rows, vocab]` (f32) for hidden states `[rows, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.head.matmul_t(hidden)?.to_dtype(DType::F32)
    }

    /// [`Llama::logits`] with a gradient path back to `hidden` (training).
    pub fn logits_train(&self, hidden: &Tensor, dtype: ComputeDtype) -> Result<Tensor> {
        grad_ops::frozen_matmul_t(&[&self.head], hidden, dtype)?
            .remove(0)
            .to_dtype(DType::F32)
    }

    /// Logits of each sequence's last new token, `[sequences, vocab]`: prefill and decode steps.
    pub fn forward_last(&self, seqs: &mut [SeqInput<'_>], lora: &dyn LoraHook) -> Result<Tensor> {
        let hidden = self.forward_hidden(seqs, lora)?;
        let mut last = Vec::with_capacity(seqs.len());
        let mut end = 0;
        for s in seqs.iter() {
            end += s.tokens.len();
            last.push((end - 1) as u32);
        }
        let idx = Tensor::new(last.as_slice(), &self.device)?;
        self.logits(&hidden.index_select(&idx, 0)?)
    }

    /// Logits for every position of `tokens` (`[batch, seq_len]`, u32): `[batch, seq_len, vocab]`.
    pub fn forward(&self, tokens: &Tensor, lora: &dyn LoraHook) -> Result<Tensor> {
        let (b, l) = tokens.dims2()?;
        let rows: Vec<Vec<u32>> = tokens.to_vec2()?;
        let mut seqs: Vec<SeqInput> = rows
            .iter()
            .map(|r| SeqInput {
                tokens: r,
                cache: None,
            })
            .collect();
        let hidden = self.forward_hidden(&mut seqs, lora)?;
        self.logits(&hidden)?.reshape((b, l, self.cfg.vocab_size))
    }

    /// cos/sin `[rows, head_dim / 2]` for each row's position.
    fn rope_tables(&self, spans: &[Span]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let rows: usize = spans.iter().map(|s| s.len).sum();
        let mut cos = Vec::with_capacity(rows * half);
        let mut sin = Vec::with_capacity(rows * half);
        for s in spans {
            for p in s.pos..s.pos + s.len {
                for &f in &self.inv_freq {
                    // f64 keeps large positions exact before the final rounding.
                    let a = p as f64 * f as f64;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (rows, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (rows, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    fn block_forward(
        &self,
        layer: usize,
        b: &Block,
        xs: &Tensor,
        ctx: &BatchCtx<'_>,
        seqs: &mut [SeqInput<'_>],
    ) -> Result<Tensor> {
        let (lora, mode) = (ctx.lora, ctx.mode);
        let h = self.norm(xs, &b.attn_norm, mode)?;
        let attn = self.attention(layer, b, &h, ctx, seqs)?;
        let xs = (xs + attn)?;
        let h = self.norm(&xs, &b.ffn_norm, mode)?;
        let [gate, up] = Linear::forward_group([&b.gate, &b.up], &h, lora, mode)?;
        let act = match mode {
            Mode::Infer => (gate.silu()? * up)?,
            Mode::Train(_) => super::swiglu::swiglu(&gate, &up)?,
        };
        let mlp = b.down.forward(&act, lora, mode)?;
        xs + mlp
    }

    fn attention(
        &self,
        layer: usize,
        b: &Block,
        h: &Tensor,
        ctx: &BatchCtx<'_>,
        seqs: &mut [SeqInput<'_>],
    ) -> Result<Tensor> {
        let lora = ctx.lora;
        let c = &self.cfg;
        let (n, hd) = (h.dim(0)?, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let rope = |x: Tensor, heads: usize| -> Result<Tensor> {
            let x = match ctx.mode {
                Mode::Infer => {
                    let x = x.reshape((1, n, heads, hd))?;
                    candle_nn::rotary_emb::rope_thd(&x, &ctx.cos, &ctx.sin)?.squeeze(0)?
                }
                Mode::Train(_) => grad_ops::rope(&x.reshape((n, heads, hd))?, &ctx.cos, &ctx.sin)?,
            };
            x.transpose(0, 1)
        };
        let [q, k, v] = Linear::forward_group([&b.q, &b.k, &b.v], h, lora, ctx.mode)?;
        // [heads, rows, head_dim]
        let q = rope(q.contiguous()?, nh)?;
        let k = rope(k.contiguous()?, nkv)?;
        let v = v.contiguous()?.reshape((n, nkv, hd))?.transpose(0, 1)?;
        let mut outs = Vec::with_capacity(ctx.spans.len());
        for (span, seq) in ctx.spans.iter().zip(seqs.iter_mut()) {
            let l = span.len;
            let qs = q.narrow(1, span.start, l)?;
            let ks = k.narrow(1, span.start, l)?;
            let vs = v.narrow(1, span.start, l)?;
            let (ks, vs) = match seq.cache.as_deref_mut() {
                Some(cache) => cache.append(layer, &ks, &vs)?,
                None => (ks.contiguous()?, vs.contiguous()?),
            };
            let heads = Heads {
                q: nh,
                kv: nkv,
                dim: hd,
            };
            let out = match (ctx.mode, seq.cache.is_some()) {
                (Mode::Train(_), false) => grad_ops::causal_attention(&qs, &ks, &vs, heads)?,
                _ => attend(&qs, &ks, &vs, span.mask.as_ref(), heads)?,
            };
            outs.push(out);
        }
        let out = if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 1)?
        };
        let out = out.transpose(0, 1)?.reshape((n, nh * hd))?;
        b.o.forward(&out, lora, ctx.mode)
    }
}

/// `[len, pos + len]`: query `i` (at position `pos + i`) sees keys `0..=pos + i`.
fn causal_mask(len: usize, pos: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let t = pos + len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..t).map(move |j| if j <= pos + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (len, t), device)?.to_dtype(dtype)
}

/// Convenience for tests and tools: the last-position logits as a `Vec<f32>`.
pub fn last_logits(logits: &Tensor, row: usize) -> Result<Vec<f32>> {
    logits.i(row)?.to_dtype(DType::F32)?.to_vec1()
}
