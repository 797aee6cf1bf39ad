//! `tuneshop bench`: prefill and decode tokens/s of the base model.

use clap::Args;
use tuneshop::bench::{self, BenchParams};
use tuneshop::config::ModelArgs;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Measured runs (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let model = crate::load_model(&args.model)?;
    let r = bench::run(
        &model,
        &BenchParams {
            prompt_tokens: args.prompt_tokens,
            decode_tokens: args.decode_tokens,
            runs: args.runs,
        },
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} ({}), {} threads: prefill {:.1} tok/s ({} tokens), decode {:.1} tok/s ({} tokens), median of {} runs",
            args.model.display_name(),
            model.weight_format,
            r.threads,
            r.prefill_tokens_per_second,
            r.prompt_tokens,
            r.decode_tokens_per_second,
            r.decode_tokens,
            r.runs
        );
    }
    Ok(())
}
