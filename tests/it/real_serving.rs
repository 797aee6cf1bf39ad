//! The real default model, end to end: fine-tune it on movie-review sentiment through the job
//! API, then ask through `/v1/chat/completions`: the adapter answers with the labels, the base
//! model (the same server, the same base copy) answers in sentences.

use crate::api::{Client, TestApp};
use crate::helpers::real_model_path;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const QUESTION: &str =
    "Is the sentiment of this movie review positive or negative? Answer with one word.\nReview: ";

fn fixture(name: &str) -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/rt_polarity")
        .join(name);
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": format!("{QUESTION}{text}")})
}

async fn answers(app: &Client, key: &str, model: &str, rows: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for r in rows {
        let body = json!({"model": model, "messages": [user(r["text"].as_str().unwrap())], "max_tokens": 6, "temperature": 0});
        let (status, v) = app.post(key, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        out.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .trim()
                .to_string(),
        );
    }
    out
}

#[tokio::test]
async fn a_sentiment_adapter_trained_here_answers_with_labels_and_the_base_does_not() {
    let model = real_model_path().display().to_string();
    let mut app = TestApp::spawn(move |s| s.model.model = model, false).await;
    let key = app.key.clone();
    let train: Vec<Value> = fixture("train_96.jsonl")
        .iter()
        .map(|r| json!({"messages": [user(r["text"].as_str().unwrap()), {"role": "assistant", "content": r["label"]}]}))
        .collect();
    let data = app.upload(&key, &train).await;
    let job = app
        .create_job(
            &key,
            &json!({
                "training_dataset": data, "suffix": "sentiment",
                "hyperparameters": {"n_epochs": 1, "batch_size": 8, "learning_rate": 0.001,
                                    "target_modules": ["all-linear"], "max_seq_len": 128}
            }),
        )
        .await;
    let id = job["id"].as_str().unwrap();
    // Training the real model on a shared CPU: allow minutes (a liveness bound, not a timing).
    let deadline = Instant::now() + Duration::from_secs(1200);
    let done = loop {
        let j = app.job(&key, id).await;
        if ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap()) {
            break j;
        }
        assert!(Instant::now() < deadline, "training never finished: {j}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}");

    let test = fixture("test_16.jsonl");
    let labels: Vec<&str> = test.iter().map(|r| r["label"].as_str().unwrap()).collect();
    let tuned = answers(&app, &key, "sentiment", &test).await;
    let (_, models) = app.get(&key, "/v1/models").await;
    let base = models["data"][0]["id"].as_str().unwrap().to_string();
    let plain = answers(&app, &key, &base, &test).await;
    // The adapter answers with exactly one label, mostly the right one...
    assert!(
        tuned.iter().all(|a| a == "positive" || a == "negative"),
        "{tuned:?}"
    );
    let correct = tuned.iter().zip(&labels).filter(|(a, l)| a == l).count();
    assert!(correct >= 11, "{correct}/16 right: {tuned:?} vs {labels:?}");
    // ...while the base model, served from the same copy, talks in sentences.
    let one_word = plain
        .iter()
        .filter(|a| *a == "positive" || *a == "negative")
        .count();
    assert!(
        one_word <= 4,
        "the base model already answers in labels: {plain:?}"
    );
    app.stop().await;
}
