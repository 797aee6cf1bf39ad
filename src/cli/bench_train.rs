//! `tuneshop bench-train`: LoRA training tokens/s and peak memory on fixed token windows, so
//! that a baseline (bench/peft_train.py) can train on exactly the same tokens.

use clap::Args;
use std::path::PathBuf;
use std::time::Instant;
use tuneshop::config::ModelArgs;
use tuneshop::model::ComputeDtype;
use tuneshop::train::data::Example;
use tuneshop::train::{LrSchedule, Progress, TrainObserver, TrainParams, Trainer};

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// JSON file `{"prompt_tokens": P, "windows": [[ids…], …]}`: every window is one example
    /// whose first P tokens are prompt (no loss) and the rest response.
    #[arg(long)]
    windows: PathBuf,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Optimizer steps; the first is a warm-up and is not timed.
    #[arg(long, default_value_t = 6)]
    steps: usize,
    #[arg(long, default_value_t = 8)]
    lora_r: usize,
    #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
    target_modules: Vec<String>,
    /// Recompute activations in the backward pass (less memory, more compute).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Arithmetic of the frozen base's matmuls: f32 or bf16.
    #[arg(long, default_value = "f32")]
    compute_dtype: ComputeDtype,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(serde::Deserialize)]
struct Windows {
    prompt_tokens: usize,
    windows: Vec<Vec<u32>>,
}

/// Step completion times.
struct Clock(Vec<Instant>);
impl TrainObserver for Clock {
    fn on_progress(&mut self, _: &Progress) {
        self.0.push(Instant::now());
    }
}

/// Peak resident set size of this process (VmHWM), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn run(args: BenchTrainArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.steps >= 2,
        "--steps must be at least 2 (the first is not timed)"
    );
    let w: Windows = serde_json::from_str(&std::fs::read_to_string(&args.windows)?)?;
    let needed = args.steps * args.batch_size;
    anyhow::ensure!(
        w.windows.len() >= needed,
        "{} windows for {} steps of batch {}: need {needed}",
        w.windows.len(),
        args.steps,
        args.batch_size
    );
    let examples: Vec<Example> = w.windows[..needed]
        .iter()
        .map(|ids| Example {
            tokens: ids.clone(),
            supervised: (0..ids.len()).map(|i| i >= w.prompt_tokens).collect(),
        })
        .collect();
    let model = crate::load_model(&args.model)?;
    let params = TrainParams {
        n_epochs: 1,
        batch_size: args.batch_size,
        lora_r: args.lora_r,
        target_modules: args.target_modules.clone(),
        max_seq_len: examples.iter().map(|e| e.tokens.len()).max().unwrap_or(1),
        lr_scheduler: LrSchedule::Constant,
        gradient_checkpointing: args.gradient_checkpointing,
        compute_dtype: args.compute_dtype,
        checkpoint_every: 0,
        ..TrainParams::default()
    };
    let lora = params.validate(model.llama.config())?;
    let trainable = lora.parameter_count(model.llama.config());
    let mut trainer = Trainer::new(&model, params, lora, examples.clone(), Vec::new(), "bench")?;
    let mut clock = Clock(Vec::new());
    trainer.run(&mut clock)?;
    let timed_tokens: usize = examples[args.batch_size..]
        .iter()
        .map(|e| e.tokens.len())
        .sum();
    let secs = (clock.0[clock.0.len() - 1] - clock.0[0]).as_secs_f64();
    let out = serde_json::json!({
        "system": "tuneshop",
        "lora_r": args.lora_r,
        "target_modules": args.target_modules.join(","),
        "gradient_checkpointing": args.gradient_checkpointing,
        "compute_dtype": args.compute_dtype,
        "trainable_parameters": trainable,
        "batch_size": args.batch_size,
        "seq_len": examples[0].tokens.len(),
        "timed_steps": args.steps - 1,
        "tokens_per_second": timed_tokens as f64 / secs,
        "peak_rss_mib": peak_rss_mib(),
        "threads": rayon::current_num_threads(),
    });
    println!("{out}");
    Ok(())
}
