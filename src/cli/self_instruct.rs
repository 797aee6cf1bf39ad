//! `tuneshop self-instruct`: grow an (instruction, input, output) dataset from seed tasks with
//! the model itself, with a live progress line.

use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use tuneshop::config::ModelArgs;
use tuneshop::infer::{Engine, EngineConfig};
use tuneshop::selfinstruct::{self, EngineGenerator, Observer, Params, Provenance, RoundStats};

#[derive(Debug, Args)]
pub struct SelfInstructArgs {
    /// Seed tasks (JSONL: the Self-Instruct seed format or instruction/input/output rows);
    /// default: the paper's 175 seed tasks.
    #[arg(long)]
    seeds: Option<PathBuf>,
    /// Instructions to generate.
    #[arg(long)]
    num: usize,
    /// Where to write the rows (JSONL, `{"instruction", "input", "output"}`).
    #[arg(long)]
    out: PathBuf,
    /// A PEFT LoRA adapter directory that writes instead of the base model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 0.5)]
    top_p: f32,
    /// Generation prompts per round (one batch).
    #[arg(long, default_value_t = 8)]
    prompts_per_round: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    model: ModelArgs,
}

/// A progress line on stderr, and each accepted instruction when `--verbose`-like detail helps.
struct Progress {
    target: usize,
}

impl Observer for Progress {
    fn on_task(&mut self, p: &Provenance) {
        eprintln!(
            "\r\x1b[K+ {} [{}; {} instances]",
            p.instruction,
            p.kind(),
            p.instances
        );
    }

    fn on_round(&mut self, s: &RoundStats, accepted: usize) {
        let done = (24 * accepted / self.target.max(1)).min(24);
        eprint!(
            "\r\x1b[K[{}{}] {accepted}/{} instructions | round {} | kept {} of {} candidates",
            "#".repeat(done),
            ".".repeat(24 - done),
            self.target,
            s.round,
            s.kept,
            s.candidates
        );
        let _ = std::io::stderr().flush();
    }
}

pub fn run(args: SelfInstructArgs) -> anyhow::Result<()> {
    let params = Params {
        num_instructions: args.num,
        temperature: args.temperature,
        top_p: args.top_p,
        prompts_per_round: args.prompts_per_round,
        seed: args.seed,
    };
    params.validate()?;
    let seeds = match &args.seeds {
        Some(path) => selfinstruct::parse_seeds(&std::fs::read_to_string(path)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        None => selfinstruct::builtin_seeds(),
    };
    let model = crate::load_model(&args.model)?;
    let adapter = match &args.adapter {
        Some(dir) => Some(super::served_adapter(dir, &model)?),
        None => None,
    };
    let mut engine = Engine::new(&model, EngineConfig::default(), None);
    let mut between = |_: &mut Engine| {};
    let never = || false;
    let mut gen = EngineGenerator {
        model: &model,
        engine: &mut engine,
        adapter,
        between_steps: &mut between,
        stop: &never,
    };
    let started = std::time::Instant::now();
    let outcome = selfinstruct::run(
        &seeds,
        &params,
        &mut gen,
        &mut Progress { target: args.num },
    )?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args.out)?);
    for row in &outcome.rows {
        writeln!(out, "{}", serde_json::to_string(row)?)?;
    }
    out.flush()?;
    eprintln!(
        "\ndone in {:.0}s: {} instructions, {} rows in {} rounds; written to {}",
        started.elapsed().as_secs_f64(),
        outcome.instructions,
        outcome.rows.len(),
        outcome.rounds,
        args.out.display()
    );
    Ok(())
}
