//! The Self-Instruct rounds: generate instructions from sampled examples, filter them into the
//! pool, ask which are classification tasks, generate instances (output first for
//! classification), clean the instances, until enough instructions have instances.

use super::filter::{Pool, Rejection};
use super::prompts;
use super::{Instance, Params, SeedTask, SelfInstructError, MAX_INSTANCES};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::BTreeMap;

/// Seed instructions and generated ones shown in each instruction prompt.
const SEED_EXAMPLES: usize = 6;
const MACHINE_EXAMPLES: usize = 2;
/// Rounds in a row without a new instruction before giving up.
const MAX_IDLE_ROUNDS: usize = 5;

/// How one batch of prompts is completed.
#[derive(Debug, Clone, PartialEq)]
pub struct GenOptions {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub stop: Vec<String>,
}

/// Completes plain-text prompts (no chat template). The server's runs on the batcher, many
/// prompts per batch; tests use scripted ones.
pub trait TextGenerator {
    fn generate(
        &mut self,
        prompts: &[String],
        opts: &GenOptions,
    ) -> Result<Vec<String>, SelfInstructError>;
}

/// A training row of the result.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Row {
    pub instruction: String,
    pub input: String,
    pub output: String,
}

/// Where an accepted instruction came from (for the job's events).
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub round: usize,
    pub instruction: String,
    /// The example instructions of the prompt that produced it.
    pub prompt_examples: Vec<String>,
    pub is_classification: bool,
    /// `output_first` (classification) or `input_first`.
    pub instance_prompt: &'static str,
    pub instances: usize,
}

impl Provenance {
    /// The task's kind, as shown in progress lines and events.
    pub fn kind(&self) -> &'static str {
        if self.is_classification {
            "classification"
        } else {
            "generation"
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundStats {
    pub round: usize,
    pub candidates: usize,
    pub kept: usize,
    pub dropped: BTreeMap<String, usize>,
}

pub trait Observer {
    fn on_task(&mut self, _p: &Provenance) {}
    fn on_round(&mut self, _stats: &RoundStats, _accepted: usize) {}
    /// Checked before every round.
    fn should_stop(&self) -> bool {
        false
    }
}

pub struct Outcome {
    pub rows: Vec<Row>,
    pub instructions: usize,
    pub rounds: usize,
}

/// Cleans one task's instances: no empty output, no output equal to its input, no input given
/// two different outputs, no repeats; at most [`MAX_INSTANCES`].
pub fn clean_instances(pairs: Vec<(String, String)>) -> Vec<Instance> {
    let conflicting: Vec<String> = pairs
        .iter()
        .filter(|(i, o)| pairs.iter().any(|(i2, o2)| i2 == i && o2 != o))
        .map(|(i, _)| i.clone())
        .collect();
    let mut out: Vec<Instance> = Vec::new();
    for (input, output) in pairs {
        let keep = !output.trim().is_empty()
            && input.trim() != output.trim()
            && !conflicting.contains(&input)
            && !out.iter().any(|x| x.input == input);
        if keep {
            out.push(Instance { input, output });
        }
    }
    out.truncate(MAX_INSTANCES);
    out
}

fn rejection_name(d: Rejection) -> String {
    serde_json::to_value(d)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Runs rounds until `params.num_instructions` instructions have instances.
pub fn run(
    seeds: &[SeedTask],
    params: &Params,
    gen: &mut dyn TextGenerator,
    obs: &mut dyn Observer,
) -> Result<Outcome, SelfInstructError> {
    params.validate()?;
    if seeds.is_empty() {
        return Err(SelfInstructError::NoSeeds);
    }
    let mut rng = StdRng::seed_from_u64(params.seed);
    let mut pool = Pool::new(seeds.iter().map(|s| s.instruction.as_str()));
    let clf_examples = few_shot(seeds, |s| s.is_classification, 6)
        .into_iter()
        .chain(few_shot(seeds, |s| !s.is_classification, 6))
        .collect::<Vec<_>>();
    let input_first_examples = few_shot(seeds, |s| !s.is_classification, 3);
    let output_first_examples = few_shot(seeds, |s| s.is_classification, 3);
    let (mut machine, mut rows): (Vec<String>, Vec<Row>) = (Vec::new(), Vec::new());
    let (mut round, mut idle) = (0, 0);
    while machine.len() < params.num_instructions {
        if obs.should_stop() {
            return Err(SelfInstructError::Cancelled {
                accepted: machine.len(),
            });
        }
        round += 1;
        let mut stats = RoundStats {
            round,
            ..Default::default()
        };

        // 1. New instructions from sampled examples.
        let shown: Vec<Vec<String>> = (0..params.prompts_per_round)
            .map(|_| {
                let mut ex: Vec<String> = seeds
                    .choose_multiple(&mut rng, SEED_EXAMPLES)
                    .map(|s| s.instruction.clone())
                    .collect();
                ex.extend(machine.choose_multiple(&mut rng, MACHINE_EXAMPLES).cloned());
                ex
            })
            .collect();
        let texts: Vec<String> = shown
            .iter()
            .map(|ex| {
                prompts::instruction_prompt(&ex.iter().map(String::as_str).collect::<Vec<_>>())
            })
            .collect();
        let opts = GenOptions {
            max_tokens: 256,
            temperature: params.temperature,
            top_p: params.top_p,
            seed: rng.random(),
            stop: vec!["\n\n".into()],
        };
        let accepted = machine.len();
        let mut complete = |prompts: &[String], opts: &GenOptions| {
            gen.generate(prompts, opts).map_err(|e| match e {
                SelfInstructError::Cancelled { .. } => SelfInstructError::Cancelled { accepted },
                other => other,
            })
        };
        let outputs = complete(&texts, &opts)?;

        // 2. Filtering into the pool.
        let mut new: Vec<(String, usize)> = Vec::new();
        let wanted = params.num_instructions - machine.len();
        for (p, out) in outputs.iter().enumerate() {
            for cand in prompts::parse_instructions(out) {
                if new.len() == wanted {
                    break;
                }
                stats.candidates += 1;
                match pool.admit(&cand) {
                    Ok(()) => new.push((cand, p)),
                    Err(d) => *stats.dropped.entry(rejection_name(d)).or_default() += 1,
                }
            }
        }

        // 3. Which are classification tasks.
        let questions: Vec<String> = new
            .iter()
            .map(|(i, _)| prompts::classification_prompt(&clf_examples, i))
            .collect();
        let greedy = |max_tokens: usize, stop: Vec<String>| GenOptions {
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop,
        };
        let answers = if new.is_empty() {
            Vec::new()
        } else {
            complete(&questions, &greedy(3, vec!["\n".into()]))?
        };
        let is_clf: Vec<bool> = answers
            .iter()
            .map(|a| prompts::parse_yes_no(a) == Some(true))
            .collect();

        // 4. Instances: output first for classification tasks.
        let instance_prompts: Vec<String> = new
            .iter()
            .zip(&is_clf)
            .map(|((i, _), &clf)| {
                if clf {
                    prompts::output_first_prompt(&output_first_examples, i)
                } else {
                    prompts::input_first_prompt(&input_first_examples, i)
                }
            })
            .collect();
        let continuations = if new.is_empty() {
            Vec::new()
        } else {
            complete(&instance_prompts, &greedy(300, vec!["\n\nTask:".into()]))?
        };
        for (((instruction, p), &clf), text) in new.into_iter().zip(&is_clf).zip(&continuations) {
            let pairs = if clf {
                prompts::parse_output_first(text)
            } else {
                prompts::parse_input_first(text)
            };
            let instances = clean_instances(pairs);
            if instances.is_empty() {
                *stats.dropped.entry("no_instances".into()).or_default() += 1;
                continue;
            }
            stats.kept += 1;
            obs.on_task(&Provenance {
                round,
                instruction: instruction.clone(),
                prompt_examples: shown[p].clone(),
                is_classification: clf,
                instance_prompt: if clf { "output_first" } else { "input_first" },
                instances: instances.len(),
            });
            for x in instances {
                rows.push(Row {
                    instruction: instruction.clone(),
                    input: x.input,
                    output: x.output,
                });
            }
            machine.push(instruction);
        }
        obs.on_round(&stats, machine.len());
        idle = if stats.kept == 0 { idle + 1 } else { 0 };
        if idle == MAX_IDLE_ROUNDS {
            break;
        }
    }
    if machine.is_empty() {
        return Err(SelfInstructError::NothingUsable { rounds: round });
    }
    let mut seen = std::collections::HashSet::new();
    rows.retain(|r| seen.insert(r.clone()));
    Ok(Outcome {
        rows,
        instructions: machine.len(),
        rounds: round,
    })
}

/// The first `n` seeds that satisfy `keep` (and have an instance with an input, when any do).
fn few_shot(seeds: &[SeedTask], keep: impl Fn(&SeedTask) -> bool, n: usize) -> Vec<&SeedTask> {
    let mut picked: Vec<&SeedTask> = seeds
        .iter()
        .filter(|s| keep(s) && s.instances.iter().any(|x| !x.input.trim().is_empty()))
        .take(n)
        .collect();
    if picked.len() < n {
        let more: Vec<&SeedTask> = seeds
            .iter()
            .filter(|s| keep(s) && !picked.contains(s))
            .take(n - picked.len())
            .collect();
        picked.extend(more);
    }
    picked
}
