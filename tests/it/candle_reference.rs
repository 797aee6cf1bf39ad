//! A live cross-check against an independent implementation: candle-transformers'
//! `quantized_llama` reads the same GGUF files with its own loader and runs llama.cpp's
//! interleaved RoPE on the unpermuted weights, with every matrix dequantized to f32
//! (`CANDLE_DEQUANTIZE_ALL`) so both sides do f32 math on identical weights.

use crate::helpers::{full_logits, load, max_abs_diff, real_model, real_model_path, tiny};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use std::path::Path;

/// Last-position logits from candle-transformers, feeding `tokens` in `chunks` (exercising
/// its KV cache as well).
fn reference_logits(path: &Path, tokens: &[u32], chunks: &[usize]) -> Vec<f32> {
    // Read once per thread by candle; every test that loads candle-transformers sets it.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let mut pos = 0;
    let mut logits = None;
    for &n in chunks.iter().chain(std::iter::once(
        &(tokens.len() - chunks.iter().sum::<usize>()),
    )) {
        if n == 0 {
            continue;
        }
        let input = Tensor::new(&tokens[pos..pos + n], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        logits = Some(model.forward(&input, pos).unwrap());
        pos += n;
    }
    logits.unwrap().squeeze(0).unwrap().to_vec1().unwrap()
}

#[test]
fn tiny_ggufs_match_candle_transformers() {
    for path in [&tiny().gguf_f32, &tiny().gguf_quantized] {
        let ours = load(path);
        let ids = ours
            .tokenizer
            .encode("what is the capital of france? it is paris", false)
            .unwrap();
        let mine = full_logits(&ours, &ids);
        let theirs = reference_logits(path, &ids, &[5, 1]);
        let diff = max_abs_diff(&mine[ids.len() - 1], &theirs);
        assert!(diff < 1e-4, "{}: {diff}", path.display());
    }
}

#[test]
fn default_model_matches_candle_transformers() {
    let m = real_model();
    let ids = m
        .chat_prompt(&[tuneshop::model::Message::new(
            "user",
            "Write a haiku about the sea.",
        )])
        .unwrap();
    let mine = full_logits(m, &ids);
    let theirs = reference_logits(&real_model_path(), &ids, &[ids.len() - 3, 1, 1]);
    let diff = max_abs_diff(&mine[ids.len() - 1], &theirs);
    assert!(diff < 1e-3, "max abs diff {diff}");
}
