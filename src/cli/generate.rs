//! `tuneshop generate`: one completion from the command line, streamed to stdout.

use clap::Args;
use std::io::Write;
use tuneshop::config::ModelArgs;
use tuneshop::infer::{GenerateParams, SamplingParams};
use tuneshop::model::Message;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Treat the prompt as a user message and render the model's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// A PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<std::path::PathBuf>,
    /// Print prompt size and speed to stderr.
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        stop: args.stop.clone(),
    };
    params.validate()?;
    if args.prompt.is_empty() {
        anyhow::bail!("the prompt is empty: pass some text with --prompt");
    }
    let model = crate::load_model(&args.model)?;
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &args.prompt));
        model.chat_prompt(&messages)?
    } else {
        model.completion_prompt(&args.prompt)?
    };
    let adapter = match &args.adapter {
        Some(dir) => Some(super::served_adapter(dir, &model)?),
        None => None,
    };
    let mut stdout = std::io::stdout().lock();
    let out = model.generate(&prompt, &params, adapter.as_ref(), &mut |piece| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    if args.verbose {
        let decoded = out.tokens.len().saturating_sub(1).max(1) as f64;
        eprintln!(
            "prompt {} tokens in {:.2}s ({:.1} tok/s); generated {} tokens, {:.1} tok/s; finish: {}",
            out.prompt_tokens,
            out.prefill_time.as_secs_f64(),
            out.prompt_tokens as f64 / out.prefill_time.as_secs_f64(),
            out.tokens.len(),
            decoded / out.decode_time.as_secs_f64().max(1e-9),
            out.finish_reason.as_str()
        );
    }
    Ok(())
}
