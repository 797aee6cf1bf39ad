//! `tuneshop merge`: fold an adapter into a dense copy of the base and write a Hugging Face
//! model directory.

use clap::Args;
use std::path::PathBuf;
use tuneshop::config::ModelArgs;
use tuneshop::lora::{merge, peft};

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The PEFT adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// The output directory (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let model = crate::load_model(&args.model)?;
    let adapter = peft::load(&args.adapter, model.llama.config(), model.llama.device())?;
    merge::write_hf_dir(&model, Some(&adapter), &args.out)?;
    eprintln!("merged model written to {}", args.out.display());
    Ok(())
}
