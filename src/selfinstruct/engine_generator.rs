//! The [`TextGenerator`] of the server and the CLI: prompts go to the continuous batcher all at
//! once, with the job's adapter (or none), and share batches with whatever else it serves.

use super::pipeline::{GenOptions, TextGenerator};
use super::SelfInstructError;
use crate::infer::{
    generate_many, AdapterLease, BatchPrompt, Engine, GenerateParams, SamplingParams,
};
use crate::model::BaseModel;

pub struct EngineGenerator<'a, 'm> {
    pub model: &'m BaseModel,
    pub engine: &'a mut Engine<'m>,
    pub adapter: Option<AdapterLease>,
    /// Runs after every batch step (the device thread takes new requests there).
    pub between_steps: &'a mut dyn FnMut(&mut Engine<'m>),
    pub stop: &'a dyn Fn() -> bool,
}

impl TextGenerator for EngineGenerator<'_, '_> {
    fn generate(
        &mut self,
        prompts: &[String],
        opts: &GenOptions,
    ) -> Result<Vec<String>, SelfInstructError> {
        let context = self.model.llama.config().max_position_embeddings;
        let failed = |e: crate::infer::InferError| SelfInstructError::Generation(e.to_string());
        let batch = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut tokens = self.model.completion_prompt(p).map_err(failed)?;
                let max_tokens = opts.max_tokens.min(context / 2);
                // A prompt too long for the context keeps its end (the open question).
                let room = context - max_tokens;
                if tokens.len() > room {
                    tokens.drain(..tokens.len() - room);
                }
                Ok(BatchPrompt {
                    tokens,
                    params: GenerateParams {
                        max_tokens,
                        sampling: SamplingParams {
                            temperature: opts.temperature,
                            top_p: opts.top_p,
                            top_k: 0,
                            seed: Some(opts.seed.wrapping_add(i as u64)),
                        },
                        stop: opts.stop.clone(),
                    },
                })
            })
            .collect::<Result<Vec<_>, SelfInstructError>>()?;
        let stop = self.stop;
        if stop() {
            return Err(SelfInstructError::Cancelled { accepted: 0 });
        }
        generate_many(
            self.engine,
            batch,
            self.adapter.as_ref(),
            self.between_steps,
            stop,
        )
        .map_err(|e| {
            if stop() {
                SelfInstructError::Cancelled { accepted: 0 }
            } else {
                failed(e)
            }
        })
    }
}
