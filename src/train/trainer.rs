//! The training loop: shuffled micro-batches, loss on response tokens only, gradient
//! accumulation, clipping, AdamW with warm-up and decay, evaluation, progress, checkpoints,
//! cancellation. The base model is shared and frozen: only the LoRA variables change.

use super::checkpoint::{self, TrainerState};
use super::cross_entropy::cross_entropy_sum;
use super::data::Example;
use super::lora_vars::LoraVars;
use super::optim::{clip_grad_norm, gradients_of, learning_rate, AdamW, AdamWParams};
use super::{TrainError, TrainParams};
use crate::lora::{Adapter, LoraConfig};
use crate::model::{BaseModel, LoraHook, Mode, SeqInput};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Instant;

/// Reported after every optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Optimizer steps completed (1-based after the first).
    pub step: usize,
    pub total_steps: usize,
    /// Fractional epoch, e.g. 1.5 halfway through the second pass.
    pub epoch: f64,
    pub train_loss: f64,
    pub learning_rate: f64,
    pub tokens_per_second: f64,
    pub eta_seconds: f64,
    /// Tokens trained on so far (all epochs, including before a resume).
    pub tokens_trained: usize,
    /// Set on steps that ran an evaluation.
    pub valid: Option<EvalResult>,
}

/// Loss and accuracy over a validation set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    pub loss: f64,
    /// Fraction of supervised tokens whose argmax is the target.
    pub token_accuracy: f64,
}

/// What the caller hears from a run and how it can stop it.
pub trait TrainObserver {
    fn on_progress(&mut self, _progress: &Progress) {}
    fn on_checkpoint(&mut self, _step: usize, _path: &std::path::Path) {}
    /// Checked before every step.
    fn should_stop(&self) -> bool {
        false
    }
    /// Called between pieces of training work (after every micro-batch and every evaluation
    /// batch): the device thread serves inference here.
    fn interleave(&mut self) {}
}

/// Ignores everything.
pub struct Silent;
impl TrainObserver for Silent {}

pub struct TrainOutcome {
    pub adapter: Adapter,
    pub steps: usize,
    pub train_loss: f64,
    pub valid: Option<EvalResult>,
    pub tokens_trained: usize,
}

pub struct Trainer<'a> {
    model: &'a BaseModel,
    params: TrainParams,
    lora: LoraVars,
    opt: AdamW,
    train: Vec<Example>,
    valid: Vec<Example>,
    base_name: String,
    checkpoint_dir: Option<PathBuf>,
    step: usize,
    total_steps: usize,
    tokens_trained: usize,
    last_loss: f64,
    /// The step of the newest checkpoint written (one is never rewritten: a reader may be
    /// copying it).
    checkpointed_at: Option<usize>,
}

/// Mixes numbers into one seed (SplitMix64 finalizer over a running hash).
fn seed_of(parts: &[u64]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &p in parts {
        h ^= p
            .wrapping_add(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(h << 6)
            .wrapping_add(h >> 2);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h = z ^ (z >> 31);
    }
    h
}

impl<'a> Trainer<'a> {
    /// Prepares a run; `params` must already have been validated into `lora`.
    pub fn new(
        model: &'a BaseModel,
        params: TrainParams,
        lora: LoraConfig,
        train: Vec<Example>,
        valid: Vec<Example>,
        base_name: &str,
    ) -> Result<Self, TrainError> {
        if train.is_empty() {
            return Err(TrainError::Data(super::DataError::Empty));
        }
        let cfg = model.llama.config();
        let lora = LoraVars::init(&lora, cfg, params.seed, &Device::Cpu)?;
        let vars = lora.named().into_iter().map(|(_, v)| v.clone()).collect();
        let opt = AdamW::new(
            vars,
            AdamWParams {
                weight_decay: params.weight_decay,
                ..Default::default()
            },
        )?;
        let total_steps = params.total_steps(train.len());
        Ok(Self {
            model,
            params,
            lora,
            opt,
            train,
            valid,
            base_name: base_name.to_string(),
            checkpoint_dir: None,
            step: 0,
            total_steps,
            tokens_trained: 0,
            last_loss: f64::NAN,
            checkpointed_at: None,
        })
    }

    /// Writes checkpoints under `dir` (every `checkpoint_every` steps and at the end).
    pub fn with_checkpoints(mut self, dir: PathBuf) -> Self {
        self.checkpoint_dir = Some(dir);
        self
    }

    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    pub fn step(&self) -> usize {
        self.step
    }

    /// The variables being trained (tests inspect and perturb them).
    pub fn lora(&self) -> &LoraVars {
        &self.lora
    }

    /// Continues from a checkpoint written by this run's settings.
    pub fn resume(&mut self, path: &std::path::Path) -> Result<(), TrainError> {
        let ck = checkpoint::load(path, self.model.llama.config())?;
        if ck.state.seed != self.params.seed || ck.state.total_steps != self.total_steps {
            return Err(TrainError::Checkpoint(format!(
                "`{}` belongs to another run (seed {}, {} steps)",
                path.display(),
                ck.state.seed,
                ck.state.total_steps
            )));
        }
        self.lora.load_from(&ck.adapter)?;
        for ((name, _), slot) in self.lora.named().iter().zip(self.opt.moments.iter_mut()) {
            let (m, v) = ck
                .moments
                .get(name)
                .ok_or_else(|| TrainError::Checkpoint(format!("optimizer state lacks `{name}`")))?;
            *slot = (m.clone(), v.clone());
        }
        self.opt.steps = ck.state.step;
        self.step = ck.state.step;
        self.checkpointed_at = Some(ck.state.step);
        self.tokens_trained = ck.state.tokens_trained;
        self.last_loss = ck.state.train_loss;
        Ok(())
    }

    /// Indices of the examples of optimizer step `step`, as micro-batches.
    fn batches_of(&self, step: usize) -> Vec<Vec<usize>> {
        let per_step = self.params.batch_size * self.params.gradient_accumulation_steps;
        let steps_per_epoch = self.train.len().div_ceil(per_step);
        let epoch = step / steps_per_epoch;
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed_of(&[
            self.params.seed,
            1,
            epoch as u64,
        ])));
        let start = (step % steps_per_epoch) * per_step;
        let end = (start + per_step).min(order.len());
        order[start..end]
            .chunks(self.params.batch_size)
            .map(|c| c.to_vec())
            .collect()
    }

    /// Loss and token accuracy on `examples` with the current adapter (no dropout).
    pub fn evaluate(&self, examples: &[Example]) -> Result<EvalResult, TrainError> {
        self.evaluate_with(examples, &mut Silent)
    }

    fn evaluate_with(
        &self,
        examples: &[Example],
        observer: &mut dyn TrainObserver,
    ) -> Result<EvalResult, TrainError> {
        let hook = self.lora.eval_hook();
        let (mut loss, mut correct, mut count) = (0f64, 0usize, 0usize);
        for chunk in examples.chunks(self.params.batch_size) {
            let batch: Vec<&Example> = chunk.iter().collect();
            let (nll, ok) = supervised_nll(self.model, &batch, &hook, Mode::Infer)?;
            loss += nll.to_scalar::<f32>()? as f64;
            correct += ok;
            count += batch.iter().map(|e| e.n_targets()).sum::<usize>();
            observer.interleave();
        }
        Ok(EvalResult {
            loss: loss / count.max(1) as f64,
            token_accuracy: correct as f64 / count.max(1) as f64,
        })
    }

    /// One optimizer step; returns the mean loss per supervised token and the tokens seen.
    fn train_step(&mut self, observer: &mut dyn TrainObserver) -> Result<(f64, usize), TrainError> {
        let batches = self.batches_of(self.step);
        let n_targets: usize = batches
            .iter()
            .flatten()
            .map(|&i| self.train[i].n_targets())
            .sum();
        let named = self.lora.named();
        let mut summed: Option<Vec<Tensor>> = None;
        let mut loss = 0f64;
        let mut tokens = 0;
        for (micro, idx) in batches.iter().enumerate() {
            let batch: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
            tokens += batch.iter().map(|e| e.tokens.len()).sum::<usize>();
            let hook = self.lora.hook(seed_of(&[
                self.params.seed,
                2,
                self.step as u64,
                micro as u64,
            ]));
            let (scaled, g) = if self.params.gradient_checkpointing {
                self.recomputed_micro_step(&batch, &hook, &named, n_targets)?
            } else {
                let (nll, _) = supervised_nll(self.model, &batch, &hook, self.train_mode())?;
                let scaled = (nll / n_targets as f64)?;
                let grads = scaled.backward()?;
                (scaled, gradients_of(&named, &grads)?)
            };
            let value = scaled.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                return Err(TrainError::NonFinite {
                    step: self.step + 1,
                    what: "loss",
                });
            }
            loss += value;
            observer.interleave();
            summed = Some(match summed {
                None => g,
                Some(acc) => acc
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let mut grads = summed.ok_or(TrainError::Data(super::DataError::Empty))?;
        let norm = clip_grad_norm(&mut grads, self.params.max_grad_norm)?;
        if !norm.is_finite() {
            return Err(TrainError::NonFinite {
                step: self.step + 1,
                what: "gradient norm",
            });
        }
        let lr = self.current_lr();
        self.opt.step(&grads, lr)?;
        Ok((loss, tokens))
    }

    /// One micro-batch's loss and gradients with each layer recomputed in the backward pass.
    fn recomputed_micro_step(
        &self,
        batch: &[&Example],
        hook: &dyn LoraHook,
        named: &[(String, &candle_core::Var)],
        n_targets: usize,
    ) -> Result<(Tensor, Vec<Tensor>), TrainError> {
        let seqs: Vec<&[u32]> = batch.iter().map(|e| e.tokens.as_slice()).collect();
        let vars: Vec<&candle_core::Var> = named.iter().map(|(_, v)| *v).collect();
        let dtype = self.params.compute_dtype;
        let (loss, grads) =
            self.model
                .llama
                .backward_recomputed(&seqs, hook, dtype, &vars, &mut |hidden| {
                    let (nll, _) = nll_of_hidden(self.model, batch, hidden, Mode::Train(dtype))
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    nll / n_targets as f64
                })?;
        let grads = grads
            .into_iter()
            .zip(named)
            .map(|(g, (name, _))| {
                g.ok_or_else(|| {
                    TrainError::Candle(candle_core::Error::Msg(format!(
                        "no gradient reached `{name}`"
                    )))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((loss, grads))
    }

    fn train_mode(&self) -> Mode {
        Mode::Train(self.params.compute_dtype)
    }

    fn current_lr(&self) -> f64 {
        learning_rate(
            self.params.lr_scheduler,
            self.params.learning_rate,
            self.step,
            self.params.warmup_steps,
            self.total_steps,
        )
    }

    fn write_checkpoint(&mut self, valid_loss: Option<f64>) -> Result<Option<PathBuf>, TrainError> {
        let Some(dir) = &self.checkpoint_dir else {
            return Ok(None);
        };
        if self.checkpointed_at == Some(self.step) {
            return Ok(None);
        }
        let adapter = self.lora.to_adapter(&self.base_name)?;
        let moments: Vec<(String, Tensor, Tensor)> = self
            .lora
            .named()
            .into_iter()
            .zip(&self.opt.moments)
            .map(|((name, _), (m, v))| (name, m.clone(), v.clone()))
            .collect();
        let state = TrainerState {
            step: self.step,
            total_steps: self.total_steps,
            train_loss: self.last_loss,
            valid_loss,
            tokens_trained: self.tokens_trained,
            seed: self.params.seed,
        };
        let path = checkpoint::save(dir, &adapter, &moments, &state)?;
        self.checkpointed_at = Some(self.step);
        Ok(Some(path))
    }

    /// Trains until the last step (or until the observer says stop).
    pub fn run(&mut self, observer: &mut dyn TrainObserver) -> Result<TrainOutcome, TrainError> {
        let start = Instant::now();
        let start_step = self.step;
        let mut run_tokens = 0usize;
        let mut valid: Option<EvalResult> = None;
        let per_step = self.params.batch_size * self.params.gradient_accumulation_steps;
        let steps_per_epoch = self.train.len().div_ceil(per_step);
        while self.step < self.total_steps {
            if observer.should_stop() {
                // Keep the work done so far: a stopped run resumes from here.
                if self.step > start_step {
                    if let Some(path) = self.write_checkpoint(valid.map(|v| v.loss))? {
                        observer.on_checkpoint(self.step, &path);
                    }
                }
                return Err(TrainError::Cancelled { step: self.step });
            }
            let lr = self.current_lr();
            let (loss, tokens) = self.train_step(observer)?;
            self.step += 1;
            self.tokens_trained += tokens;
            self.last_loss = loss;
            run_tokens += tokens;
            let last = self.step == self.total_steps;
            let eval_now = !self.valid.is_empty()
                && (last
                    || (self.params.eval_every > 0
                        && self.step.is_multiple_of(self.params.eval_every)));
            let step_valid = if eval_now {
                let v = self.evaluate_with(&self.valid, observer)?;
                if !v.loss.is_finite() {
                    return Err(TrainError::NonFinite {
                        step: self.step,
                        what: "validation loss",
                    });
                }
                valid = Some(v);
                Some(v)
            } else {
                None
            };
            let elapsed = start.elapsed().as_secs_f64().max(1e-9);
            let done = self.step - start_step;
            observer.on_progress(&Progress {
                step: self.step,
                total_steps: self.total_steps,
                epoch: self.step as f64 / steps_per_epoch as f64,
                train_loss: loss,
                learning_rate: lr,
                tokens_per_second: run_tokens as f64 / elapsed,
                eta_seconds: elapsed / done as f64 * (self.total_steps - self.step) as f64,
                tokens_trained: self.tokens_trained,
                valid: step_valid,
            });
            let every = self.params.checkpoint_every;
            if last || (every > 0 && self.step.is_multiple_of(every)) {
                if let Some(path) = self.write_checkpoint(valid.map(|v| v.loss))? {
                    observer.on_checkpoint(self.step, &path);
                }
            }
        }
        Ok(TrainOutcome {
            adapter: self.lora.to_adapter(&self.base_name)?,
            steps: self.step,
            train_loss: self.last_loss,
            valid,
            tokens_trained: self.tokens_trained,
        })
    }
}

/// Summed cross-entropy over the supervised tokens of `batch` and (outside training) how many
/// of them the argmax gets right, from a forward pass with `hook`; in training mode the graph
/// reaches the LoRA variables.
pub fn supervised_nll(
    model: &BaseModel,
    batch: &[&Example],
    hook: &dyn LoraHook,
    mode: Mode,
) -> Result<(Tensor, usize), TrainError> {
    let llama = &model.llama;
    let seqs: Vec<&[u32]> = batch.iter().map(|e| e.tokens.as_slice()).collect();
    let hidden = if let Mode::Train(dtype) = mode {
        llama.forward_hidden_train(&seqs, hook, dtype)?
    } else {
        let mut inputs: Vec<SeqInput> = seqs
            .iter()
            .map(|tokens| SeqInput {
                tokens,
                cache: None,
            })
            .collect();
        llama.forward_hidden(&mut inputs, hook)?
    };
    nll_of_hidden(model, batch, &hidden, mode)
}

/// [`supervised_nll`] from the final hidden states `[rows, hidden]` of `batch`.
fn nll_of_hidden(
    model: &BaseModel,
    batch: &[&Example],
    hidden: &Tensor,
    mode: Mode,
) -> Result<(Tensor, usize), TrainError> {
    let llama = &model.llama;
    // Only rows that predict a supervised token reach the LM head.
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut offset = 0;
    for e in batch {
        for (p, t) in e.targets() {
            rows.push((offset + p) as u32);
            targets.push(t);
        }
        offset += e.tokens.len();
    }
    let dev = hidden.device().clone();
    let rows = Tensor::new(rows.as_slice(), &dev)?;
    let targets = Tensor::new(targets.as_slice(), &dev)?;
    let h = hidden.index_select(&rows, 0)?;
    let logits = if let Mode::Train(dtype) = mode {
        llama.logits_train(&h, dtype)?
    } else {
        llama.logits(&h)?
    };
    let nll = if logits.device().is_cpu() {
        cross_entropy_sum(&logits, &targets)?
    } else {
        candle_nn::ops::log_softmax(&logits, D::Minus1)?
            .gather(&targets.unsqueeze(1)?, 1)?
            .neg()?
            .sum_all()?
    };
    // Token accuracy is reported for evaluation only; training steps skip the extra pass.
    let correct = if matches!(mode, Mode::Train(_)) {
        0
    } else {
        logits
            .argmax(D::Minus1)?
            .eq(&targets)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()? as usize
    };
    Ok((nll, correct))
}

/// Mean cross-entropy of the base model plus an optional adapter over `examples`.
pub fn loss_of(
    model: &BaseModel,
    hook: &dyn LoraHook,
    examples: &[Example],
) -> Result<f64, TrainError> {
    let (mut total, mut count) = (0f64, 0usize);
    for e in examples {
        let mut seqs = [SeqInput {
            tokens: &e.tokens,
            cache: None,
        }];
        let hidden = model.llama.forward_hidden(&mut seqs, hook)?;
        for (p, t) in e.targets() {
            let logits = model.llama.logits(&hidden.i(p..p + 1)?)?;
            let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            total -= lp.i((0, t as usize))?.to_scalar::<f32>()? as f64;
            count += 1;
        }
    }
    Ok(total / count.max(1) as f64)
}
