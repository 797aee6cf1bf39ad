//! The tokenizer: loaded from `tokenizer.json`, or rebuilt from GGUF `tokenizer.ggml.*` metadata.
//!
//! Rebuilding from GGUF follows what the upstream `tokenizer.json` of each pre-tokenizer family
//! contains (BPE over byte-level tokens with the file's merges), so ids match the upstream
//! tokenizer exactly; special tokens and BOS/EOS come from the metadata.

use super::gguf::{GgufFile, MetaValue};
use super::ModelError;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// Llama 3's pre-tokenizer regex (`tokenizer.ggml.pre = "llama-bpe"`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Texts of end-of-turn tokens that stop generation when the vocabulary has them.
const STOP_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<|end|>",
    "</s>",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Prepend BOS ourselves (GGUF-built tokenizers have no post-processor).
    add_bos: bool,
    stop_ids: Vec<u32>,
}

fn tok_err(origin: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer {
        origin: origin.display().to_string(),
        detail: e.to_string(),
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`; BOS/EOS come from `tokenizer_config.json` and
    /// `generation_config.json` beside it when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| tok_err(&path, e))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let token_id = |key: &str| -> Option<u32> {
            let v = config.as_ref()?.get(key)?;
            let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
            inner.token_to_id(text)
        };
        let bos = token_id("bos_token");
        let mut eos_ids: Vec<u32> = token_id("eos_token").into_iter().collect();
        if let Some(gen) = read_json(&dir.join("generation_config.json"))? {
            match gen.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => eos_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(serde_json::Value::Array(items)) => {
                    eos_ids.extend(items.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
                }
                _ => {}
            }
        }
        // Prepend BOS ourselves only when the config asks for it and tokenizer.json's
        // post-processor does not already add it.
        let add_bos = config
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
            && inner.get_post_processor().is_none();
        Ok(Self::finish(inner, bos, eos_ids, add_bos))
    }

    /// Rebuilds the tokenizer from GGUF metadata (`tokenizer.ggml.model = "gpt2"`).
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let origin = &file.path;
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(tok_err(
                origin,
                format!(
                    "GGUF tokenizer model `{model}` is not supported (byte-level BPE `gpt2` is); \
                     load the model from its Hugging Face directory, which has tokenizer.json"
                ),
            ));
        }
        let tokens = file.string_array("tokenizer.ggml.tokens")?;
        let merges = file.string_array("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match file
            .get("tokenizer.ggml.token_type")
            .and_then(MetaValue::as_array)
        {
            Some(items) => items
                .iter()
                .map(|v| v.as_u64().map_or(1, |t| t as i64))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| tok_err(origin, format!("merge `{m}` is not two tokens")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(false)
            .build()
            .map_err(|e| tok_err(origin, e))?;
        let pre = file
            .get("tokenizer.ggml.pre")
            .and_then(MetaValue::as_str)
            .unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "default" | "gpt2" => byte_level.into(),
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            "llama-bpe" | "llama3" => {
                let split = Split::new(
                    SplitPattern::Regex(LLAMA3_SPLIT.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| tok_err(origin, e))?;
                Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
            }
            other => {
                return Err(tok_err(
                    origin,
                    format!(
                        "pre-tokenizer `{other}` is not supported (default, gpt2, smollm, llama-bpe are)"
                    ),
                ))
            }
        };
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(pre_tokenizer))
            .with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole, before BPE.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(text, _)| AddedToken::from(text.clone(), true))
            .collect();
        inner.add_special_tokens(&specials);
        let id = |key: &str| file.get(key).and_then(MetaValue::as_u64).map(|v| v as u32);
        let add_bos = file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(MetaValue::as_bool)
            .unwrap_or(false);
        let eos_ids = ["eos", "eot", "eom"]
            .iter()
            .filter_map(|k| id(&format!("tokenizer.ggml.{k}_token_id")))
            .collect();
        Ok(Self::finish(
            inner,
            id("tokenizer.ggml.bos_token_id"),
            eos_ids,
            add_bos,
        ))
    }

    fn finish(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos_ids: Vec<u32>,
        add_bos: bool,
    ) -> Self {
        let mut stop_ids = eos_ids.clone();
        stop_ids.extend(STOP_TOKENS.iter().filter_map(|t| inner.token_to_id(t)));
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Self {
            inner,
            bos,
            eos: eos_ids.first().copied(),
            add_bos,
            stop_ids,
        }
    }

    /// Token ids of `text`. `add_special` adds what the model expects around raw text (BOS);
    /// rendered chat templates already contain it, so they pass `false`.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| ModelError::Tokenizer {
                origin: "encode".into(),
                detail: e.to_string(),
            })?;
        let mut ids = enc.get_ids().to_vec();
        if let (true, true, Some(bos)) = (add_special, self.add_bos, self.bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer {
                origin: "decode".into(),
                detail: e.to_string(),
            })
    }

    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether encoding raw text prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    pub fn bos_token(&self) -> Option<String> {
        self.bos.and_then(|id| self.id_to_token(id))
    }

    pub fn eos_token(&self) -> Option<String> {
        self.eos.and_then(|id| self.id_to_token(id))
    }

    /// Ids that end a generation (EOS, end-of-turn tokens).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Writes `tokenizer.json` (used for the generated test model).
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        self.inner.save(path, true).map_err(|e| tok_err(path, e))
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, ModelError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| tok_err(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(tok_err(path, e)),
    }
}
