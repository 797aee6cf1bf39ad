//! `tuneshop eval`: loss of a model (and adapter) on a JSONL set, and accuracy when the answers
//! are a fixed set of choices (classification tasks).

use clap::Args;
use std::path::PathBuf;
use tuneshop::config::ModelArgs;
use tuneshop::lora::{peft, Adapter};
use tuneshop::model::{last_logits, BaseModel, LoraHook, Message, NoLora, SeqInput};
use tuneshop::train::data::{parse_jsonl, tokenize, Row};
use tuneshop::train::loss_of;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// JSONL rows whose last assistant message (or output / completion) is the expected answer.
    #[arg(long)]
    data: PathBuf,
    /// A PEFT adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Comma-separated answers; the prediction is the choice whose first token scores highest.
    #[arg(long, value_delimiter = ',')]
    choices: Vec<String>,
    /// Evaluate only the first N rows.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    #[command(flatten)]
    model: ModelArgs,
}

/// The prompt tokens (ready for the answer) and the expected answer of a row.
fn prompt_and_answer(model: &BaseModel, row: &Row) -> anyhow::Result<(Vec<u32>, String)> {
    Ok(match row {
        Row::Messages(msgs) => {
            let last = msgs.len() - 1;
            anyhow::ensure!(
                msgs[last].role == "assistant",
                "the last message must be the assistant's answer"
            );
            (
                model.chat_prompt(&msgs[..last])?,
                msgs[last].content.clone(),
            )
        }
        Row::Instruction {
            instruction,
            input,
            output,
        } => {
            let user = if input.is_empty() {
                instruction.clone()
            } else {
                format!("{instruction}\n\n{input}")
            };
            (
                model.chat_prompt(&[Message::new("user", &user)])?,
                output.clone(),
            )
        }
        Row::PromptCompletion { prompt, completion } => {
            (model.completion_prompt(prompt)?, completion.clone())
        }
    })
}

fn accuracy(
    model: &BaseModel,
    hook: &dyn LoraHook,
    rows: &[Row],
    choices: &[String],
) -> anyhow::Result<(f64, usize)> {
    let first_tokens: Vec<u32> = choices
        .iter()
        .map(|c| {
            let ids = model.tokenizer.encode(c, false)?;
            ids.first()
                .copied()
                .ok_or_else(|| anyhow::anyhow!("choice `{c}` encodes to no tokens"))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut correct = 0;
    for row in rows {
        let (prompt, answer) = prompt_and_answer(model, row)?;
        let want = choices
            .iter()
            .position(|c| c == answer.trim())
            .ok_or_else(|| anyhow::anyhow!("answer `{answer}` is not one of the choices"))?;
        let logits = model.llama.forward_last(
            &mut [SeqInput {
                tokens: &prompt,
                cache: None,
            }],
            hook,
        )?;
        let logits = last_logits(&logits, 0)?;
        let got = (0..choices.len())
            .max_by(|&a, &b| {
                logits[first_tokens[a] as usize].total_cmp(&logits[first_tokens[b] as usize])
            })
            .unwrap_or(0);
        correct += usize::from(got == want);
    }
    Ok((correct as f64 / rows.len().max(1) as f64, rows.len()))
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let model = crate::load_model(&args.model)?;
    let adapter: Option<Adapter> = match &args.adapter {
        Some(dir) => Some(peft::load(dir, model.llama.config(), model.llama.device())?),
        None => None,
    };
    let hook: Box<dyn LoraHook + '_> = match &adapter {
        Some(a) => Box::new(a.hook()),
        None => Box::new(NoLora),
    };
    let text = std::fs::read_to_string(&args.data)?;
    let mut rows = parse_jsonl(&text)?;
    if let Some(n) = args.limit {
        rows.truncate(n);
    }
    let (examples, _) = tokenize(&model, &rows, args.max_seq_len, &|i| i + 1)?;
    let loss = loss_of(&model, hook.as_ref(), &examples)?;
    let mut report = serde_json::json!({ "rows": rows.len(), "loss": loss });
    if !args.choices.is_empty() {
        let (acc, n) = accuracy(&model, hook.as_ref(), &rows, &args.choices)?;
        report["accuracy"] = serde_json::json!(acc);
        eprintln!("accuracy {acc:.3} on {n} rows; loss {loss:.4}");
    } else {
        eprintln!("loss {loss:.4} on {} rows", rows.len());
    }
    println!("{report}");
    Ok(())
}
