//! The forward pass on the tiny model: KV-cache decoding, ragged batches and every loader agree.

use crate::helpers::{full_logits, load, load_dequantized, max_abs_diff, tiny};
use candle_core::Tensor;
use tuneshop::model::{last_logits, BaseModel, KvCache, NoLora, SeqInput};

const TEXT: &str = "the capital of france is paris. what is the quick brown fox?";

fn tokens(m: &BaseModel, text: &str) -> Vec<u32> {
    m.tokenizer.encode(text, false).unwrap()
}

/// Last-position logits of one step for each sequence.
fn step(m: &BaseModel, inputs: Vec<(&[u32], &mut KvCache)>) -> Vec<Vec<f32>> {
    let mut seqs: Vec<SeqInput> = inputs
        .into_iter()
        .map(|(tokens, cache)| SeqInput {
            tokens,
            cache: Some(cache),
        })
        .collect();
    let n = seqs.len();
    let logits = m.llama.forward_last(&mut seqs, &NoLora).unwrap();
    (0..n).map(|i| last_logits(&logits, i).unwrap()).collect()
}

#[test]
fn full_sequence_logits_equal_step_by_step_kv_cache_decoding() {
    for path in [&tiny().hf_dir, &tiny().gguf_quantized] {
        let m = load(path);
        let ids = tokens(&m, TEXT);
        assert!(ids.len() > 10);
        let full = full_logits(&m, &ids);
        let mut cache = KvCache::new(m.llama.config());
        for (i, t) in ids.iter().enumerate() {
            let got = step(&m, vec![(std::slice::from_ref(t), &mut cache)]).remove(0);
            let diff = max_abs_diff(&got, &full[i]);
            assert!(
                diff < 1e-4,
                "{}: position {i} differs by {diff}",
                path.display()
            );
        }
        assert_eq!(cache.len(), ids.len());
    }
}

#[test]
fn chunked_prefill_equals_one_prefill() {
    let m = load(&tiny().gguf_quantized);
    let ids = tokens(&m, TEXT);
    let full = full_logits(&m, &ids);
    let mut cache = KvCache::new(m.llama.config());
    let (a, b) = ids.split_at(5);
    step(&m, vec![(a, &mut cache)]);
    let got = step(&m, vec![(b, &mut cache)]).remove(0);
    assert!(max_abs_diff(&got, &full[ids.len() - 1]) < 1e-4);
}

#[test]
fn batched_decode_of_different_lengths_equals_decoding_one_by_one() {
    let m = load(&tiny().gguf_quantized);
    let prompts = [
        "a",
        "the quick brown fox",
        "what is the capital of france? it is paris, the city of",
    ];
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tokens(&m, p)).collect();
    assert!(ids[0].len() < ids[1].len() && ids[1].len() < ids[2].len());
    let cfg = m.llama.config();

    // One by one: prefill, then 6 greedy steps each.
    let mut alone: Vec<Vec<Vec<f32>>> = Vec::new();
    let mut next_tokens: Vec<Vec<u32>> = Vec::new();
    for p in &ids {
        let mut cache = KvCache::new(cfg);
        let mut logits = step(&m, vec![(p, &mut cache)]).remove(0);
        let (mut seen, mut toks) = (vec![logits.clone()], Vec::new());
        for _ in 0..6 {
            let t = tuneshop::infer::sampling::argmax(&logits);
            toks.push(t);
            logits = step(&m, vec![(&[t], &mut cache)]).remove(0);
            seen.push(logits.clone());
        }
        alone.push(seen);
        next_tokens.push(toks);
    }

    // Together: one batched prefill of all three, then batched decode steps.
    let mut caches: Vec<KvCache> = ids.iter().map(|_| KvCache::new(cfg)).collect();
    let inputs = ids
        .iter()
        .map(|p| p.as_slice())
        .zip(caches.iter_mut())
        .collect();
    let mut batch = step(&m, inputs);
    for s in 0..=6 {
        for (i, got) in batch.iter().enumerate() {
            let diff = max_abs_diff(got, &alone[i][s]);
            assert!(diff < 1e-4, "sequence {i}, step {s}: {diff}");
        }
        if s == 6 {
            break;
        }
        let toks: Vec<[u32; 1]> = next_tokens.iter().map(|t| [t[s]]).collect();
        let inputs = toks
            .iter()
            .map(|t| t.as_slice())
            .zip(caches.iter_mut())
            .collect();
        batch = step(&m, inputs);
    }
}

#[test]
fn padded_free_batch_of_equal_rows_matches_single_rows() {
    let m = load(&tiny().hf_dir);
    let a = tokens(&m, "the lazy dog");
    let b = tokens(&m, "hello world");
    let n = a.len().min(b.len());
    let rows = [&a[..n], &b[..n]].concat();
    let input = Tensor::from_vec(rows, (2, n), &candle_core::Device::Cpu).unwrap();
    let both: Vec<Vec<Vec<f32>>> = m.llama.forward(&input, &NoLora).unwrap().to_vec3().unwrap();
    for (row, seq) in [&a[..n], &b[..n]].iter().enumerate() {
        let alone = crate::helpers::full_logits(&m, seq);
        for p in 0..n {
            assert!(max_abs_diff(&both[row][p], &alone[p]) < 1e-4);
        }
    }
}

#[test]
fn safetensors_and_gguf_loaders_agree() {
    // The GGUF stores q/k rows interleaved for llama.cpp's RoPE; the loader must undo it.
    let hf = load(&tiny().hf_dir);
    let gguf = load(&tiny().gguf_f32);
    let ids = tokens(&hf, TEXT);
    assert_eq!(ids, tokens(&gguf, TEXT), "both tokenizers agree");
    let (a, b) = (full_logits(&hf, &ids), full_logits(&gguf, &ids));
    for p in 0..ids.len() {
        assert!(max_abs_diff(&a[p], &b[p]) < 1e-4, "position {p}");
    }
}

#[test]
fn quantized_kernels_match_f32_math_on_the_same_weights() {
    let q = load(&tiny().gguf_quantized);
    let f = load_dequantized(&tiny().gguf_quantized);
    assert_eq!(q.weight_format, "q4_1+q8_0");
    assert_eq!(f.weight_format, "f32");
    assert!(
        q.llama.weight_bytes() * 3 < f.llama.weight_bytes(),
        "weights stay quantized"
    );
    let ids = tokens(&q, TEXT);
    let (a, b) = (full_logits(&q, &ids), full_logits(&f, &ids));
    for p in 0..ids.len() {
        assert!(max_abs_diff(&a[p], &b[p]) < 1e-4, "position {p}");
    }
    // The decode path (dot kernels) agrees too.
    let mut cache = KvCache::new(q.llama.config());
    let got = step(&q, vec![(&ids, &mut cache)]).remove(0);
    assert!(max_abs_diff(&got, &b[ids.len() - 1]) < 1e-4);
}

#[test]
fn a_sequence_past_the_context_is_an_error_not_a_panic() {
    let m = load(&tiny().gguf_quantized);
    let ctx = m.llama.config().max_position_embeddings;
    let ids = vec![5u32; ctx + 1];
    let mut cache = KvCache::new(m.llama.config());
    let mut seqs = [SeqInput {
        tokens: &ids,
        cache: Some(&mut cache),
    }];
    let err = m.llama.forward_last(&mut seqs, &NoLora).unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
    let bad = [m.llama.config().vocab_size as u32 + 7];
    let mut seqs = [SeqInput {
        tokens: &bad,
        cache: None,
    }];
    assert!(m.llama.forward_last(&mut seqs, &NoLora).is_err());
}

#[test]
fn half_precision_hf_weights_track_f32() {
    let f32_model = load(&tiny().hf_dir);
    let ids = tokens(&f32_model, TEXT);
    let want = full_logits(&f32_model, &ids);
    for dtype in [candle_core::DType::F16, candle_core::DType::BF16] {
        let opts = tuneshop::model::LoadOptions {
            dtype,
            ..Default::default()
        };
        let m = tuneshop::model::load(&tiny().hf_dir, &opts).unwrap();
        assert_eq!(m.llama.weight_bytes() * 2, f32_model.llama.weight_bytes());
        let got = full_logits(&m, &ids);
        let last = ids.len() - 1;
        let diff = max_abs_diff(&got[last], &want[last]);
        // bf16 keeps 8 bits of mantissa, f16 11: loose bounds, but far below the logits' spread.
        assert!(diff < 0.25, "{dtype:?}: {diff}");
        assert_eq!(
            tuneshop::infer::sampling::argmax(&got[last]),
            tuneshop::infer::sampling::argmax(&want[last])
        );
    }
}
