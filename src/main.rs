//! The `tuneshop` command line: parse, set up telemetry, dispatch. Work lives in the library.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use tuneshop::config::{ModelArgs, Settings};

mod cli;

#[derive(Parser)]
#[command(
    name = "tuneshop",
    version,
    about = "LoRA fine-tuning as a service for LLaMA-family models"
)]
struct Cli {
    /// Compute threads (default: all cores; also RAYON_NUM_THREADS).
    #[arg(long, global = true, env = "TUNESHOP_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve(Settings),
    /// Generate text from a prompt with the base model.
    Generate(cli::generate::GenerateArgs),
    /// Fine-tune a LoRA adapter on a JSONL dataset.
    Train(cli::train::TrainArgs),
    /// Loss (and choice accuracy) of the base model or an adapter on a JSONL set.
    Eval(cli::eval::EvalArgs),
    /// Grow an (instruction, input, output) dataset from seed tasks with Self-Instruct.
    SelfInstruct(cli::self_instruct::SelfInstructArgs),
    /// Fold an adapter into a dense copy of the base model (Hugging Face format).
    Merge(cli::merge::MergeArgs),
    /// Measure prompt-processing and decode tokens/s of the base model.
    Bench(cli::bench::BenchArgs),
    /// Measure LoRA training tokens/s and peak memory on fixed token windows.
    BenchTrain(cli::bench_train::BenchTrainArgs),
    /// Write the tiny random test model (HF directory and GGUF files) into a directory.
    TinyModel {
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Print the OpenAPI document.
    Openapi,
}

// Training allocates and frees large activation buffers every step; the system allocator hands
// them back to the kernel and pays for fresh zeroed pages each time. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tuneshop::telemetry::keep_freed_memory();
    let cli = Cli::parse();
    tuneshop::telemetry::init_threads(cli.threads);
    tuneshop::telemetry::init();
    let result = match cli.command {
        Command::Serve(settings) => cli::serve(settings),
        Command::Generate(args) => cli::generate::run(args),
        Command::Train(args) => cli::train::run(args),
        Command::Eval(args) => cli::eval::run(args),
        Command::Merge(args) => cli::merge::run(args),
        Command::SelfInstruct(args) => cli::self_instruct::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::BenchTrain(args) => cli::bench_train::run(args),
        Command::TinyModel { out } => tuneshop::model::tiny::write(&out, 42)
            .map(|_| ())
            .map_err(Into::into),
        Command::Openapi => cli::print_openapi(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the base model named by `args` (fetching the default one if needed).
fn load_model(args: &ModelArgs) -> anyhow::Result<tuneshop::model::BaseModel> {
    let opts = args.load_options()?;
    let path = args.resolve_path()?;
    Ok(tuneshop::model::load(&path, &opts)?)
}
