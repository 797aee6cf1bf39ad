//! Generation on the tiny model: sampling, stop conditions, streaming text, bad requests.

use crate::helpers::{load, tiny};
use tuneshop::infer::text::TextStream;
use tuneshop::infer::{FinishReason, GenerateParams, InferError, SamplingParams};
use tuneshop::model::{BaseModel, Message};

fn model() -> BaseModel {
    load(&tiny().gguf_quantized)
}

fn run(
    m: &BaseModel,
    prompt: &str,
    params: &GenerateParams,
) -> (tuneshop::infer::Generation, String) {
    let ids = m.completion_prompt(prompt).unwrap();
    let mut streamed = String::new();
    let out = m
        .generate(&ids, params, None, &mut |piece| streamed.push_str(piece))
        .unwrap();
    (out, streamed)
}

fn sampled(seed: u64) -> GenerateParams {
    GenerateParams {
        max_tokens: 24,
        sampling: SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            top_k: 0,
            seed: Some(seed),
        },
        stop: vec![],
    }
}

#[test]
fn greedy_is_deterministic_and_streams_the_whole_text() {
    let m = model();
    let params = GenerateParams {
        max_tokens: 20,
        ..Default::default()
    };
    let (a, streamed) = run(&m, "the quick brown", &params);
    let (b, _) = run(&m, "the quick brown", &params);
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.text, streamed, "the callback saw exactly the final text");
    assert_eq!(a.text, m.tokenizer.decode(&a.tokens, true).unwrap());
}

#[test]
fn seeded_sampling_is_reproducible() {
    let m = model();
    let (a, _) = run(&m, "hello", &sampled(7));
    let (b, _) = run(&m, "hello", &sampled(7));
    assert_eq!(a.tokens, b.tokens);
    let differs = (8..16).any(|s| run(&m, "hello", &sampled(s)).0.tokens != a.tokens);
    assert!(differs, "other seeds give other samples");
}

#[test]
fn max_tokens_ends_with_length() {
    let m = model();
    let params = GenerateParams {
        max_tokens: 5,
        ..Default::default()
    };
    let (out, _) = run(&m, "the", &params);
    // The tiny model may emit an end-of-turn token early; otherwise exactly 5 tokens.
    if out.finish_reason == FinishReason::Length {
        assert_eq!(out.tokens.len(), 5);
    } else {
        assert!(out.tokens.len() < 5);
    }
}

#[test]
fn a_stop_string_cuts_the_text_before_it() {
    let m = model();
    let long = GenerateParams {
        max_tokens: 40,
        sampling: SamplingParams {
            seed: Some(3),
            temperature: 0.8,
            ..Default::default()
        },
        ..Default::default()
    };
    let (full, _) = run(&m, "the capital", &long);
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 8, "need some text, got {:?}", full.text);
    let stop: String = chars[5..8].iter().collect();
    let before = &full.text[..full.text.find(&stop).unwrap()];
    let with_stop = GenerateParams {
        stop: vec![stop.clone()],
        ..long
    };
    let (cut, streamed) = run(&m, "the capital", &with_stop);
    assert_eq!(cut.text, before);
    assert_eq!(streamed, before, "the stop string never reached the stream");
    assert_eq!(cut.finish_reason, FinishReason::Stop);
}

#[test]
fn streaming_never_splits_a_utf8_character() {
    let m = model();
    let text = "héllo wörld, 東京 🦀 ok";
    let ids = m.tokenizer.encode(text, false).unwrap();
    // Byte-level BPE: multi-byte characters span several tokens.
    assert!(ids.len() > text.chars().count() / 2);
    let mut stream = TextStream::new();
    let mut out = String::new();
    for &id in &ids {
        if let Some(piece) = stream.push(&m.tokenizer, id).unwrap() {
            assert!(
                !piece.contains('\u{FFFD}'),
                "partial character leaked: {piece:?}"
            );
            out.push_str(&piece);
        }
    }
    out.push_str(&stream.finish(&m.tokenizer).unwrap());
    assert_eq!(out, text);
}

#[test]
fn chat_prompts_use_the_template() {
    let m = model();
    let ids = m.chat_prompt(&[Message::new("user", "hi")]).unwrap();
    let text = m.tokenizer.decode(&ids, false).unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        ids[0],
        m.tokenizer.token_to_id("<|im_start|>").unwrap(),
        "specials are single tokens"
    );
}

#[test]
fn bad_requests_are_errors() {
    let m = model();
    assert!(matches!(
        m.completion_prompt(""),
        Err(InferError::EmptyPrompt)
    ));
    assert!(matches!(m.chat_prompt(&[]), Err(InferError::EmptyPrompt)));
    let ctx = m.llama.config().max_position_embeddings;
    let long = vec![10u32; ctx - 4];
    let params = GenerateParams {
        max_tokens: 16,
        ..Default::default()
    };
    let err = m.generate(&long, &params, None, &mut |_| {}).unwrap_err();
    assert!(matches!(err, InferError::ContextExceeded { .. }), "{err}");
    for (bad, param) in [
        (
            GenerateParams {
                max_tokens: 0,
                ..Default::default()
            },
            "max_tokens",
        ),
        (
            GenerateParams {
                sampling: SamplingParams {
                    temperature: 3.0,
                    ..Default::default()
                },
                ..Default::default()
            },
            "temperature",
        ),
        (
            GenerateParams {
                sampling: SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                ..Default::default()
            },
            "top_p",
        ),
    ] {
        let err = m.generate(&[10], &bad, None, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains(param), "{err}");
    }
}
