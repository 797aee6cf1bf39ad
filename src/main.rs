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
    /// Measure prompt-processing and decode tokens/s of the base model.
    Bench(cli::bench::BenchArgs),
    /// Print the OpenAPI document.
    Openapi,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tuneshop::telemetry::init_threads(cli.threads);
    tuneshop::telemetry::init();
    let result = match cli.command {
        Command::Serve(settings) => cli::serve(settings),
        Command::Generate(args) => cli::generate::run(args),
        Command::Bench(args) => cli::bench::run(args),
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
