//! `tuneshop train`: fine-tune a LoRA adapter on a JSONL file, with a live progress line.

use clap::Args;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tuneshop::config::ModelArgs;
use tuneshop::lora::peft;
use tuneshop::model::ComputeDtype;
use tuneshop::train::data::examples_from_jsonl;
use tuneshop::train::{checkpoint, LrSchedule, Progress, TrainObserver, TrainParams, Trainer};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training data (JSONL: instruction/input/output, messages, or prompt/completion rows).
    #[arg(long)]
    data: PathBuf,
    /// Validation data in the same format (loss and token accuracy are reported).
    #[arg(long)]
    validation: Option<PathBuf>,
    /// Where the adapter (PEFT files) and checkpoints go.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 8)]
    lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f64,
    /// Comma-separated projections, or all-linear.
    #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
    target_modules: Vec<String>,
    #[arg(long)]
    use_rslora: bool,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    #[arg(long, default_value_t = 2e-4)]
    learning_rate: f64,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Longer examples are truncated (default: 512, or the model's context if shorter).
    #[arg(long)]
    max_seq_len: Option<usize>,
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    #[arg(long, value_enum, default_value = "cosine")]
    lr_scheduler: SchedulerArg,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Recompute activations in the backward pass: much less memory, about a third slower.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Arithmetic of the frozen base's matmuls: f32, or bf16 (1.2–1.4x faster steps on CPUs with
    /// AVX512-BF16; f32 elsewhere).
    #[arg(long, default_value = "f32")]
    compute_dtype: ComputeDtype,
    /// Continue from the latest checkpoint in OUT/checkpoints.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SchedulerArg {
    Cosine,
    Linear,
    Constant,
}

impl TrainArgs {
    fn params(&self, context: usize) -> TrainParams {
        TrainParams {
            n_epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            lora_r: self.lora_r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: self.target_modules.clone(),
            use_rslora: self.use_rslora,
            max_seq_len: self.max_seq_len.unwrap_or(512.min(context)),
            warmup_steps: self.warmup_steps,
            gradient_accumulation_steps: self.grad_accum,
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            weight_decay: self.weight_decay,
            max_grad_norm: 1.0,
            lr_scheduler: match self.lr_scheduler {
                SchedulerArg::Cosine => LrSchedule::Cosine,
                SchedulerArg::Linear => LrSchedule::Linear,
                SchedulerArg::Constant => LrSchedule::Constant,
            },
            gradient_checkpointing: self.gradient_checkpointing,
            compute_dtype: self.compute_dtype,
            seed: self.seed,
        }
    }
}

/// Prints progress on stderr: one rewritten line on a terminal, a line every few seconds
/// otherwise (logs, CI).
struct ProgressLine {
    tty: bool,
    last_print: Instant,
}

fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

impl TrainObserver for ProgressLine {
    fn on_progress(&mut self, p: &Progress) {
        let width = 24;
        let filled = (p.step * width).checked_div(p.total_steps).unwrap_or(width);
        let bar: String = "#".repeat(filled) + &".".repeat(width - filled);
        let line = format!(
            "[{bar}] step {}/{} | epoch {:.2} | loss {:.4} | lr {:.2e} | {:.0} tok/s | ETA {}",
            p.step,
            p.total_steps,
            p.epoch,
            p.train_loss,
            p.learning_rate,
            p.tokens_per_second,
            duration(p.eta_seconds)
        );
        let mut err = std::io::stderr().lock();
        if let Some(v) = p.valid {
            let _ = writeln!(
                err,
                "{}step {}: validation loss {:.4}, token accuracy {:.3}",
                if self.tty { "\r\x1b[2K" } else { "" },
                p.step,
                v.loss,
                v.token_accuracy
            );
        }
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
        } else if self.last_print.elapsed() > Duration::from_secs(5)
            || p.step == p.total_steps
            || p.step == 1
        {
            let _ = writeln!(err, "{line}");
            self.last_print = Instant::now();
        }
    }

    fn on_checkpoint(&mut self, step: usize, path: &std::path::Path) {
        tracing::debug!(step, path = %path.display(), "checkpoint written");
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let model = crate::load_model(&args.model)?;
    let params = args.params(model.llama.config().max_position_embeddings);
    let lora = params.validate(model.llama.config())?;
    let read = |path: &PathBuf| -> anyhow::Result<_> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read `{}`: {e}", path.display()))?;
        let (examples, stats) = examples_from_jsonl(&model, &text, params.max_seq_len)
            .map_err(|e| anyhow::anyhow!("`{}`: {e}", path.display()))?;
        eprintln!(
            "{}: {} rows, {} tokens ({} supervised), {} truncated to {} tokens",
            path.display(),
            stats.rows,
            stats.tokens,
            stats.supervised_tokens,
            stats.truncated_rows,
            params.max_seq_len
        );
        Ok(examples)
    };
    let train = read(&args.data)?;
    let valid = match &args.validation {
        Some(p) => read(p)?,
        None => Vec::new(),
    };
    let checkpoints = args.out.join("checkpoints");
    let mut trainer = Trainer::new(
        &model,
        params,
        lora.clone(),
        train,
        valid,
        &args.model.display_name(),
    )?
    .with_checkpoints(checkpoints.clone());
    if args.resume {
        match checkpoint::latest(&checkpoints) {
            Some(path) => {
                trainer.resume(&path)?;
                eprintln!("resuming from {} (step {})", path.display(), trainer.step());
            }
            None => eprintln!(
                "no checkpoint in {}; starting from scratch",
                checkpoints.display()
            ),
        }
    }
    eprintln!(
        "training {} LoRA parameters (r={}, {}) for {} steps",
        lora.parameter_count(model.llama.config()),
        lora.r,
        lora.targets
            .iter()
            .map(|p| p.hf_name())
            .collect::<Vec<_>>()
            .join(","),
        trainer.total_steps()
    );
    let started = Instant::now();
    let mut progress = ProgressLine {
        tty: std::io::stderr().is_terminal(),
        last_print: Instant::now(),
    };
    let out = trainer.run(&mut progress)?;
    if progress.tty {
        eprintln!();
    }
    peft::save(&out.adapter, &args.out)?;
    eprintln!(
        "done in {}: {} steps, final train loss {:.4}{}; adapter written to {}",
        duration(started.elapsed().as_secs_f64()),
        out.steps,
        out.train_loss,
        out.valid
            .map(|v| format!(
                ", validation loss {:.4} (token accuracy {:.3})",
                v.loss, v.token_accuracy
            ))
            .unwrap_or_default(),
        args.out.display()
    );
    Ok(())
}
