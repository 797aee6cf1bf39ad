//! The default model (SmolLM2-135M-Instruct, Q4_1 GGUF), fetched like `serve` would: logits
//! against an independent implementation, and sensible greedy answers from the CLI.

use crate::helpers::{full_logits, real_model, real_model_path, tuneshop};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    tokens: Vec<u32>,
    positions: Vec<Position>,
}

#[derive(Deserialize)]
struct Position {
    ids: Vec<usize>,
    logits: Vec<f32>,
}

#[test]
fn logits_match_pytorch_transformers_on_the_same_gguf() {
    let text = include_str!("../fixtures/reference_logits.json");
    let reference: Reference = serde_json::from_str(text).unwrap();
    let m = real_model();
    for case in &reference.cases {
        let ours = full_logits(m, &case.tokens);
        let mut worst = 0f32;
        for (p, pos) in case.positions.iter().enumerate() {
            for (&id, &want) in pos.ids.iter().zip(&pos.logits) {
                worst = worst.max((ours[p][id] - want).abs());
            }
            // The reference's argmax is ours too.
            let top = pos.ids[pos
                .logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0];
            assert_eq!(
                tuneshop::infer::sampling::argmax(&ours[p]) as usize,
                top,
                "{} position {p}",
                case.name
            );
        }
        assert!(worst < 1e-3, "{}: max abs diff {worst}", case.name);
    }
}

fn ask(question: &str) -> String {
    let model = real_model_path();
    let out = tuneshop(&[
        "generate",
        "--chat",
        "--max-tokens",
        "48",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        question,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn greedy_chat_answers_are_sensible() {
    let cases = [
        ("What is the capital of France?", "Paris"),
        ("What is the capital of Germany?", "Berlin"),
        ("What is 2+2?", "4"),
        ("How many days are in a week?", "7"),
        ("What is the boiling point of water in Celsius?", "100"),
    ];
    for (question, key) in cases {
        let answer = ask(question);
        assert!(answer.contains(key), "{question} -> {answer:?}");
    }
}
