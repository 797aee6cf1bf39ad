//! Training with recomputed layers ("gradient checkpointing"): the forward pass keeps only each
//! layer's input, and the backward pass runs layer by layer from the top, recomputing one
//! layer's activations at a time. Memory then holds one layer's graph instead of all of them,
//! for about one extra forward pass of compute.

use super::{Llama, SeqInput};
use crate::model::linear::{ComputeDtype, LoraHook, Mode};
use candle_core::{Result, Tensor, Var};

impl Llama {
    /// One training micro-batch, forward and backward, recomputing each layer. `loss_of` turns
    /// the final (normed) hidden states into a scalar loss. Returns the loss and the gradient
    /// of each of `vars`, in order (`None` for one no gradient reached). The hook must be
    /// deterministic (the same dropout masks when a layer runs again).
    pub fn backward_recomputed(
        &self,
        seqs: &[&[u32]],
        lora: &dyn LoraHook,
        dtype: ComputeDtype,
        vars: &[&Var],
        loss_of: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Vec<Option<Tensor>>)> {
        let mut inputs: Vec<SeqInput> = seqs
            .iter()
            .map(|tokens| SeqInput {
                tokens,
                cache: None,
            })
            .collect();
        let (tokens, ctx) = self.batch_ctx(&inputs, lora, Mode::Train(dtype))?;
        let mut xs = self.embed.rows(&tokens, self.dtype, &self.device)?;
        let mut saved = Vec::with_capacity(self.layers.len());
        for (layer, block) in self.layers.iter().enumerate() {
            // Detached: the layer's graph is freed as soon as its output exists.
            let input = xs.detach();
            xs = self
                .block_forward(layer, block, &input, &ctx, &mut inputs)?
                .detach();
            saved.push(input);
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut collect = |store: &candle_core::backprop::GradStore| -> Result<()> {
            for (slot, v) in grads.iter_mut().zip(vars) {
                if let Some(g) = store.get(v.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    });
                }
            }
            Ok(())
        };

        let top = Var::from_tensor(&xs)?;
        let loss = loss_of(&self.norm(top.as_tensor(), &self.norm, Mode::Train(dtype))?)?;
        let store = loss.backward()?;
        collect(&store)?;
        let mut grad = store
            .get(top.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached the last layer".into()))?;
        drop(store);
        for (layer, block) in self.layers.iter().enumerate().rev() {
            let saved_input = saved
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("a layer input is missing".into()))?;
            let input = Var::from_tensor(&saved_input)?;
            let out = self.block_forward(layer, block, input.as_tensor(), &ctx, &mut inputs)?;
            // d(sum(out ⊙ grad))/dθ is the chain rule through this layer.
            let store = (out * &grad)?.sum_all()?.backward()?;
            collect(&store)?;
            grad = store.get(input.as_tensor()).cloned().ok_or_else(|| {
                candle_core::Error::Msg(format!("no gradient reached the input of layer {layer}"))
            })?;
        }
        Ok((loss.detach(), grads))
    }
}
