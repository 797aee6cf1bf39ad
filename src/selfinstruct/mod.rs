//! Self-Instruct (Wang et al., 2022): grow a training set of (instruction, input, output) rows
//! from a few seed tasks with the model itself. `prompts` builds the prompts and parses the
//! answers, `filter` decides which instructions join the pool (with `rouge` for near-copies),
//! `pipeline` runs the rounds over any [`TextGenerator`]. No HTTP, no database: the job runner
//! and the CLI drive it.

mod engine_generator;
pub mod filter;
pub mod pipeline;
pub mod prompts;
pub mod rouge;

pub use engine_generator::EngineGenerator;
pub use pipeline::{
    run, GenOptions, Observer, Outcome, Provenance, RoundStats, Row, TextGenerator,
};

use serde::{Deserialize, Serialize};

/// The 175 human-written seed tasks of the paper (Apache-2.0, yizhongw/self-instruct).
const BUILTIN_SEEDS: &str = include_str!("seed_tasks.jsonl");

/// The most instructions one job may ask for.
pub const MAX_INSTRUCTIONS: usize = 1000;
/// The most instances kept per instruction.
pub const MAX_INSTANCES: usize = 5;

/// One worked example of a seed task.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Instance {
    #[serde(default)]
    pub input: String,
    pub output: String,
}

/// A seed task: an instruction and at least one instance.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct SeedTask {
    pub instruction: String,
    pub instances: Vec<Instance>,
    #[serde(default)]
    pub is_classification: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SelfInstructError {
    #[error("line {line}: {message}")]
    BadSeed { line: usize, message: String },
    #[error("the seed tasks hold no instruction: give at least one")]
    NoSeeds,
    #[error("`{param}` {message}")]
    Invalid {
        param: &'static str,
        message: String,
    },
    #[error("text generation failed: {0}")]
    Generation(String),
    #[error("cancelled after {accepted} instructions")]
    Cancelled { accepted: usize },
    #[error("the model produced no usable instruction in {rounds} rounds; try a higher temperature or another model")]
    NothingUsable { rounds: usize },
}

/// Parses seed tasks: the Self-Instruct seed format (`instruction`, `instances`,
/// `is_classification`), or plain `instruction`/`input`/`output` rows (rows with the same
/// instruction are gathered into one task).
pub fn parse_seeds(jsonl: &str) -> Result<Vec<SeedTask>, SelfInstructError> {
    #[derive(Deserialize)]
    struct Plain {
        instruction: String,
        #[serde(default)]
        input: String,
        output: String,
    }
    let mut tasks: Vec<SeedTask> = Vec::new();
    for (i, line) in jsonl.lines().enumerate() {
        let bad = |message: String| SelfInstructError::BadSeed {
            line: i + 1,
            message,
        };
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let task = if v.get("instances").is_some() {
            serde_json::from_value::<SeedTask>(v).map_err(|e| bad(e.to_string()))?
        } else {
            let p: Plain = serde_json::from_value(v).map_err(|e| {
                bad(format!(
                    "{e}; a seed is {{\"instruction\", \"instances\": [{{\"input\", \"output\"}}], \"is_classification\"}} or {{\"instruction\", \"input\", \"output\"}}"
                ))
            })?;
            if let Some(t) = tasks.iter_mut().find(|t| t.instruction == p.instruction) {
                t.instances.push(Instance {
                    input: p.input,
                    output: p.output,
                });
                continue;
            }
            SeedTask {
                instruction: p.instruction,
                instances: vec![Instance {
                    input: p.input,
                    output: p.output,
                }],
                is_classification: false,
            }
        };
        if task.instruction.trim().is_empty() {
            return Err(bad("`instruction` is empty".into()));
        }
        if task.instances.is_empty() || task.instances.iter().any(|x| x.output.trim().is_empty()) {
            return Err(bad(
                "every seed needs at least one instance with a non-empty `output`".into(),
            ));
        }
        tasks.push(task);
    }
    if tasks.is_empty() {
        return Err(SelfInstructError::NoSeeds);
    }
    Ok(tasks)
}

/// The paper's seed tasks.
pub fn builtin_seeds() -> Vec<SeedTask> {
    // The file is part of the build and parsed by a test.
    parse_seeds(BUILTIN_SEEDS).unwrap_or_default()
}

/// What a Self-Instruct job stores: who writes (the base model's name or an adapter id) and how.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct SelfInstructSpec {
    pub model: String,
    pub params: Params,
}

/// How a generation job runs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Instructions to generate, 1 to 1000.
    #[schema(example = 20)]
    pub num_instructions: usize,
    /// Sampling temperature of instruction generation (the paper: 0.7).
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// Nucleus sampling of instruction generation (the paper: 0.5).
    #[serde(default = "default_top_p")]
    pub top_p: f32,
    /// New instructions requested per generation prompt round (prompts run in one batch).
    #[serde(default = "default_prompts_per_round")]
    pub prompts_per_round: usize,
    /// Seeds the example choice and sampling.
    #[serde(default)]
    pub seed: u64,
}

fn default_temperature() -> f32 {
    0.7
}
fn default_top_p() -> f32 {
    0.5
}
fn default_prompts_per_round() -> usize {
    8
}

impl Params {
    pub fn new(num_instructions: usize) -> Self {
        Self {
            num_instructions,
            temperature: default_temperature(),
            top_p: default_top_p(),
            prompts_per_round: default_prompts_per_round(),
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<(), SelfInstructError> {
        let bad = |param, message: &str| {
            Err(SelfInstructError::Invalid {
                param,
                message: message.to_string(),
            })
        };
        if !(1..=MAX_INSTRUCTIONS).contains(&self.num_instructions) {
            return bad(
                "num_instructions",
                &format!("must be between 1 and {MAX_INSTRUCTIONS}"),
            );
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad("temperature", "must be between 0 and 2");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be greater than 0 and at most 1");
        }
        if !(1..=64).contains(&self.prompts_per_round) {
            return bad("prompts_per_round", "must be between 1 and 64");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_seeds_and_both_formats_parse() {
        let seeds = builtin_seeds();
        assert_eq!(seeds.len(), 175);
        assert_eq!(seeds.iter().filter(|s| s.is_classification).count(), 26);
        let plain = "{\"instruction\": \"Add the numbers.\", \"input\": \"1 2\", \"output\": \"3\"}\n\
                     {\"instruction\": \"Add the numbers.\", \"input\": \"2 2\", \"output\": \"4\"}\n";
        let got = parse_seeds(plain).unwrap();
        assert_eq!((got.len(), got[0].instances.len()), (1, 2));
        assert_eq!(parse_seeds("\n"), Err(SelfInstructError::NoSeeds));
        let err = parse_seeds("{\"instruction\": \"x\"}\n").unwrap_err();
        assert!(
            matches!(err, SelfInstructError::BadSeed { line: 1, .. }),
            "{err}"
        );
        let err = parse_seeds(
            "{\"instruction\": \"\", \"instances\": [{\"input\": \"\", \"output\": \"y\"}]}",
        )
        .unwrap_err();
        assert!(err.to_string().contains("`instruction` is empty"), "{err}");
    }
}
