//! Training data: JSONL rows in the three supported formats, rendered and tokenized into
//! examples whose loss covers only the response tokens.
//!
//! - `{"instruction", "input", "output"}` (Alpaca / Self-Instruct) and `{"messages": [...]}`
//!   are rendered through the model's chat template; every assistant turn is supervised.
//! - `{"prompt", "completion"}` is raw text: the completion and an end-of-sequence token are
//!   supervised.

use crate::model::{BaseModel, Message};
use serde::Deserialize;

/// How many problems a data error lists before it stops.
const MAX_REPORTED: usize = 10;

/// The recognized row formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    Instruction,
    Messages,
    PromptCompletion,
}

/// One problem with one line of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    /// 1-based line number in the file.
    pub line: usize,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("the dataset is empty: it needs at least one JSON object per line")]
    Empty,
    #[error("the dataset has invalid rows:\n{}", .0.iter().map(|e| format!("  line {}: {}", e.line, e.message)).collect::<Vec<_>>().join("\n"))]
    Rows(Vec<LineError>),
    #[error("cannot read the dataset: {0}")]
    Io(#[from] std::io::Error),
}

impl DataError {
    pub fn lines(&self) -> &[LineError] {
        match self {
            Self::Rows(v) => v,
            _ => &[],
        }
    }
}

/// A row in one of the supported formats.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    Instruction {
        instruction: String,
        input: String,
        output: String,
    },
    Messages(Vec<Message>),
    PromptCompletion {
        prompt: String,
        completion: String,
    },
}

impl Row {
    pub fn format(&self) -> DataFormat {
        match self {
            Self::Instruction { .. } => DataFormat::Instruction,
            Self::Messages(_) => DataFormat::Messages,
            Self::PromptCompletion { .. } => DataFormat::PromptCompletion,
        }
    }
}

#[derive(Deserialize)]
struct RawRow {
    instruction: Option<serde_json::Value>,
    input: Option<serde_json::Value>,
    output: Option<serde_json::Value>,
    messages: Option<serde_json::Value>,
    prompt: Option<serde_json::Value>,
    completion: Option<serde_json::Value>,
}

fn string_field(v: &Option<serde_json::Value>, name: &str) -> Result<Option<String>, String> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("`{name}` must be a string")),
    }
}

/// Parses one JSON line into a [`Row`].
pub fn parse_row(text: &str) -> Result<Row, String> {
    let raw: RawRow = serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
    if let Some(messages) = &raw.messages {
        let list: Vec<Message> = serde_json::from_value(messages.clone()).map_err(|_| {
            "`messages` must be a list of {\"role\", \"content\"} objects".to_string()
        })?;
        if list.is_empty() {
            return Err("`messages` is empty".into());
        }
        if let Some(m) = list
            .iter()
            .find(|m| !["system", "user", "assistant"].contains(&m.role.as_str()))
        {
            return Err(format!(
                "unknown role `{}` (use system, user or assistant)",
                m.role
            ));
        }
        if !list
            .iter()
            .any(|m| m.role == "assistant" && !m.content.is_empty())
        {
            return Err("`messages` has no non-empty assistant message to learn from".into());
        }
        return Ok(Row::Messages(list));
    }
    if raw.instruction.is_some() || raw.output.is_some() {
        let instruction = string_field(&raw.instruction, "instruction")?
            .filter(|s| !s.trim().is_empty())
            .ok_or("`instruction` is missing or empty")?;
        let output = string_field(&raw.output, "output")?
            .filter(|s| !s.is_empty())
            .ok_or("`output` is missing or empty")?;
        let input = string_field(&raw.input, "input")?.unwrap_or_default();
        return Ok(Row::Instruction {
            instruction,
            input,
            output,
        });
    }
    if raw.prompt.is_some() || raw.completion.is_some() {
        let prompt = string_field(&raw.prompt, "prompt")?.ok_or("`prompt` is missing")?;
        let completion = string_field(&raw.completion, "completion")?
            .filter(|s| !s.is_empty())
            .ok_or("`completion` is missing or empty")?;
        return Ok(Row::PromptCompletion { prompt, completion });
    }
    Err("unrecognized row: expected {\"instruction\", \"input\", \"output\"}, {\"messages\": [...]} or {\"prompt\", \"completion\"}".into())
}

/// Parses a JSONL text; blank lines are skipped. Every row must have the same format.
pub fn parse_jsonl(text: &str) -> Result<Vec<Row>, DataError> {
    parse_jsonl_with_lines(text).map(|(rows, _)| rows)
}

/// [`parse_jsonl`], also returning each row's 1-based line number in the file.
pub fn parse_jsonl_with_lines(text: &str) -> Result<(Vec<Row>, Vec<usize>), DataError> {
    let mut rows = Vec::new();
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut format = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_row(line) {
            Ok(row) => {
                let f = *format.get_or_insert(row.format());
                if f != row.format() {
                    errors.push(LineError {
                        line: i + 1,
                        message: format!(
                            "format {:?} differs from the first row's {:?}",
                            row.format(),
                            f
                        ),
                    });
                } else {
                    rows.push(row);
                    lines.push(i + 1);
                }
            }
            Err(message) => errors.push(LineError {
                line: i + 1,
                message,
            }),
        }
        if errors.len() >= MAX_REPORTED {
            break;
        }
    }
    if !errors.is_empty() {
        return Err(DataError::Rows(errors));
    }
    if rows.is_empty() {
        return Err(DataError::Empty);
    }
    Ok((rows, lines))
}

/// Parses and tokenizes a JSONL text for `model`, with errors naming file lines.
pub fn examples_from_jsonl(
    model: &BaseModel,
    text: &str,
    max_seq_len: usize,
) -> Result<(Vec<Example>, DataStats), DataError> {
    let (rows, lines) = parse_jsonl_with_lines(text)?;
    tokenize(model, &rows, max_seq_len, &|i| lines[i])
}

/// A tokenized example: `tokens`, and for each position whether it is a supervised target.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub supervised: Vec<bool>,
}

impl Example {
    /// Positions `p` whose next token is supervised (row `p` of the hidden states predicts it),
    /// with that target token.
    pub fn targets(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        (1..self.tokens.len())
            .filter(|&p| self.supervised[p])
            .map(|p| (p - 1, self.tokens[p]))
    }

    pub fn n_targets(&self) -> usize {
        self.supervised.iter().skip(1).filter(|&&s| s).count()
    }
}

/// Statistics of a tokenized dataset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataStats {
    pub rows: usize,
    pub tokens: usize,
    pub supervised_tokens: usize,
    /// Rows cut to `max_seq_len`.
    pub truncated_rows: usize,
}

/// Tokenizes rows for `model`, truncating each to `max_seq_len` tokens. `first_line` maps row
/// indices back to file lines in error messages (rows are numbered from 1 when it is `None`).
pub fn tokenize(
    model: &BaseModel,
    rows: &[Row],
    max_seq_len: usize,
    line_of: &dyn Fn(usize) -> usize,
) -> Result<(Vec<Example>, DataStats), DataError> {
    let mut examples = Vec::with_capacity(rows.len());
    let mut stats = DataStats::default();
    let mut errors = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        match tokenize_row(model, row) {
            Ok(mut ex) => {
                if ex.tokens.len() > max_seq_len {
                    ex.tokens.truncate(max_seq_len);
                    ex.supervised.truncate(max_seq_len);
                    stats.truncated_rows += 1;
                }
                if ex.n_targets() == 0 {
                    errors.push(LineError {
                        line: line_of(i),
                        message: format!(
                            "the response is cut off entirely by `max_seq_len` = {max_seq_len} (the prompt alone is that long); shorten the prompt or raise max_seq_len"
                        ),
                    });
                } else {
                    stats.rows += 1;
                    stats.tokens += ex.tokens.len();
                    stats.supervised_tokens += ex.n_targets();
                    examples.push(ex);
                }
            }
            Err(message) => errors.push(LineError {
                line: line_of(i),
                message,
            }),
        }
        if errors.len() >= MAX_REPORTED {
            break;
        }
    }
    if !errors.is_empty() {
        return Err(DataError::Rows(errors));
    }
    if examples.is_empty() {
        return Err(DataError::Empty);
    }
    Ok((examples, stats))
}

/// Alpaca's prompt, for models without a chat template.
fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!("### Instruction:\n{instruction}\n\n### Response:\n")
    } else {
        format!("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    }
}

fn tokenize_row(model: &BaseModel, row: &Row) -> Result<Example, String> {
    let tok = &model.tokenizer;
    let enc = |text: &str, special: bool| tok.encode(text, special).map_err(|e| e.to_string());
    let eos = tok.stop_ids().first().copied();
    match row {
        Row::PromptCompletion { prompt, completion } => {
            let mut ex = Example {
                tokens: enc(prompt, true)?,
                supervised: Vec::new(),
            };
            ex.supervised = vec![false; ex.tokens.len()];
            push(&mut ex, &enc(completion, false)?, true);
            push(&mut ex, eos.as_slice(), true);
            Ok(ex)
        }
        Row::Instruction {
            instruction,
            input,
            output,
        } => {
            if model.chat_template.is_none() {
                let mut ex = Example {
                    tokens: enc(&alpaca_prompt(instruction, input), true)?,
                    supervised: Vec::new(),
                };
                ex.supervised = vec![false; ex.tokens.len()];
                push(&mut ex, &enc(output, false)?, true);
                push(&mut ex, eos.as_slice(), true);
                return Ok(ex);
            }
            let user = if input.is_empty() {
                instruction.clone()
            } else {
                format!("{instruction}\n\n{input}")
            };
            chat_example(
                model,
                &[
                    Message::new("user", &user),
                    Message::new("assistant", output),
                ],
            )
        }
        Row::Messages(messages) => chat_example(model, messages),
    }
}

fn push(ex: &mut Example, ids: &[u32], supervised: bool) {
    ex.tokens.extend_from_slice(ids);
    ex.supervised
        .extend(std::iter::repeat_n(supervised, ids.len()));
}

/// Renders a conversation and marks the tokens of each assistant turn (its content and the
/// end-of-turn token; not the whitespace the template puts after it).
fn chat_example(model: &BaseModel, messages: &[Message]) -> Result<Example, String> {
    let template = model
        .chat_template
        .as_ref()
        .ok_or("the base model has no chat template; use {\"prompt\", \"completion\"} rows")?;
    let tok = &model.tokenizer;
    let render =
        |msgs: &[Message], gen: bool| template.render(msgs, gen).map_err(|e| e.to_string());
    let mut ex = Example {
        tokens: Vec::new(),
        supervised: Vec::new(),
    };
    let mut done = String::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(&messages[..i], true)?;
        let after = render(&messages[..=i], false)?;
        let (Some(context), Some(reply)) =
            (before.strip_prefix(&done), after.strip_prefix(&before))
        else {
            return Err("the chat template does not render conversations incrementally".into());
        };
        push(
            &mut ex,
            &tok.encode(context, false).map_err(|e| e.to_string())?,
            false,
        );
        let mut reply_ids = tok.encode(reply, false).map_err(|e| e.to_string())?;
        // Keep the end-of-turn token, drop what follows it.
        if let Some(end) = reply_ids.iter().rposition(|id| tok.stop_ids().contains(id)) {
            let tail = reply_ids.split_off(end + 1);
            push(&mut ex, &reply_ids, true);
            push(&mut ex, &tail, false);
        } else {
            push(&mut ex, &reply_ids, true);
        }
        done = after;
    }
    Ok(ex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_formats_and_reports_lines() {
        let rows = parse_jsonl("{\"instruction\":\"a\",\"input\":\"\",\"output\":\"b\"}\n\n{\"instruction\":\"c\",\"output\":\"d\"}\n").unwrap();
        assert_eq!(rows.len(), 2);
        assert!(matches!(
            parse_row(
                r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#
            ),
            Ok(Row::Messages(_))
        ));
        assert!(matches!(
            parse_row(r#"{"prompt":"p","completion":"c"}"#),
            Ok(Row::PromptCompletion { .. })
        ));
        let err = parse_jsonl("{\"instruction\":\"a\",\"output\":\"b\"}\nnot json\n{\"instruction\":\"a\"}\n{\"prompt\":\"p\",\"completion\":\"c\"}\n").unwrap_err();
        let lines: Vec<usize> = err.lines().iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 4]);
        assert!(err.lines()[1].message.contains("`output`"));
        assert!(matches!(parse_jsonl("\n \n"), Err(DataError::Empty)));
        assert!(
            parse_row(r#"{"messages":[{"role":"user","content":"hi"}]}"#)
                .unwrap_err()
                .contains("assistant")
        );
    }
}
