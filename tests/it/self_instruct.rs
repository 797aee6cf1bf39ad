//! Self-Instruct: the pipeline driven by a scripted generator (each filter, output-first
//! prompts for classification, instance cleaning, the result as training data), the job API on
//! the tiny model (statuses, events, bad input), and the real model end to end.

use crate::api::{quick_job, TestApp};
use crate::helpers::real_model_path;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tuneshop::selfinstruct::filter::MAX_SIMILARITY;
use tuneshop::selfinstruct::rouge::{rouge_l, tokens};
use tuneshop::selfinstruct::{
    self, GenOptions, Observer, Params, Provenance, RoundStats, SelfInstructError, TextGenerator,
};
use tuneshop::train::data::parse_jsonl;

/// Answers each kind of prompt from a script and remembers what it was asked.
#[derive(Default)]
struct Scripted {
    asked: Vec<String>,
}

const CANDIDATES: &str = " Summarize the following news article in one sentence.
10. Classify the sentiment of the given movie review as positive or negative.
11. Describe the image shown below in detail.
12. Hi there.
13. - List three ways to save energy at home.
14. Write a program that prints the first ten primes.
15. Summarize the following news article in a single sentence.
16. Is there anything I can eat for a breakfast that doesn't include eggs, yet includes protein, and has roughly 700-1000 calories?";

impl TextGenerator for Scripted {
    fn generate(
        &mut self,
        prompts: &[String],
        _opts: &GenOptions,
    ) -> Result<Vec<String>, SelfInstructError> {
        self.asked.extend(prompts.iter().cloned());
        Ok(prompts
            .iter()
            .map(|p| {
                if p.starts_with("Come up with a series of tasks") {
                    CANDIDATES.to_string()
                } else if p.starts_with("Can the following task") {
                    let last = p.rsplit("Task: ").next().unwrap_or("");
                    if last.contains("sentiment") { " Yes" } else { " No" }.to_string()
                } else if p.ends_with("Class label:") {
                    " Positive\nInput: I loved every minute.\nClass label: Negative\nInput: Dull and long.\n".into()
                } else {
                    // One good instance, one whose output repeats its input.
                    " The city council met on Monday to approve the budget.\nOutput: The council approved the budget.\nExample 2\nInput: same\nOutput: same\n".into()
                }
            })
            .collect())
    }
}

#[derive(Default)]
struct Recorder {
    tasks: Vec<Provenance>,
    rounds: Vec<RoundStats>,
}

impl Observer for Recorder {
    fn on_task(&mut self, p: &Provenance) {
        self.tasks.push(p.clone());
    }
    fn on_round(&mut self, s: &RoundStats, _accepted: usize) {
        self.rounds.push(s.clone());
    }
}

#[test]
fn the_pipeline_filters_classifies_and_cleans_as_specified() {
    let seeds = selfinstruct::builtin_seeds();
    let mut gen = Scripted::default();
    let mut rec = Recorder::default();
    let params = Params {
        prompts_per_round: 1,
        ..Params::new(2)
    };
    let out = selfinstruct::run(&seeds, &params, &mut gen, &mut rec).unwrap();
    let kept: Vec<&str> = rec.tasks.iter().map(|t| t.instruction.as_str()).collect();
    assert_eq!(
        kept,
        [
            "Summarize the following news article in one sentence.",
            "Classify the sentiment of the given movie review as positive or negative."
        ]
    );
    // The rest were dropped, each by its own rule, before the target was reached.
    let dropped = &rec.rounds[0].dropped;
    assert_eq!(rec.rounds[0].candidates, 2);
    assert!(dropped.is_empty(), "{dropped:?}");

    // With room for everything: every filter fires once.
    let mut rec = Recorder::default();
    let params = Params {
        prompts_per_round: 1,
        ..Params::new(10)
    };
    let out_all = selfinstruct::run(&seeds, &params, &mut Scripted::default(), &mut rec).unwrap();
    let dropped = &rec.rounds[0].dropped;
    for (why, n) in [
        ("unservable", 1),
        ("too_short", 1),
        ("odd_start", 1),
        ("program", 1),
        ("similar", 2),
    ] {
        assert_eq!(dropped.get(why), Some(&n), "{why}: {dropped:?}");
    }
    // Later rounds bring only copies of the pool: the run stops, with what it has.
    assert_eq!(out_all.instructions, 2);
    assert!(rec.rounds.len() > 1 && rec.rounds[1..].iter().all(|r| r.kept == 0));

    // Classification tasks got the output-first prompt, the others input-first.
    let clf = &rec.tasks[1];
    assert!(clf.is_classification && clf.instance_prompt == "output_first");
    assert!(!rec.tasks[0].is_classification && rec.tasks[0].instance_prompt == "input_first");
    assert!(gen
        .asked
        .iter()
        .any(|p| p.ends_with("Class label:") && p.contains("sentiment of the given movie review")));
    assert!(!gen
        .asked
        .iter()
        .any(|p| p.ends_with("Class label:") && p.contains("news article in one")));

    // Instances were cleaned (the input == output one is gone); labels came back as outputs.
    let rows: Vec<(&str, &str)> = out
        .rows
        .iter()
        .map(|r| (r.input.as_str(), r.output.as_str()))
        .collect();
    assert_eq!(
        rows,
        [
            (
                "The city council met on Monday to approve the budget.",
                "The council approved the budget."
            ),
            ("I loved every minute.", "Positive"),
            ("Dull and long.", "Negative"),
        ]
    );
    // No two instructions of the result are near-copies, nor copies of a seed.
    for (i, a) in kept.iter().enumerate() {
        for b in kept[i + 1..]
            .iter()
            .copied()
            .chain(seeds.iter().map(|s| s.instruction.as_str()))
        {
            assert!(
                rouge_l(&tokens(a), &tokens(b)) <= MAX_SIMILARITY,
                "{a} ~ {b}"
            );
        }
    }
    // The result is a training dataset.
    let jsonl: String = out
        .rows
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    assert_eq!(parse_jsonl(&jsonl).unwrap().len(), 3);
}

#[test]
fn a_generator_that_never_helps_ends_with_a_clear_error() {
    struct Silent;
    impl TextGenerator for Silent {
        fn generate(
            &mut self,
            prompts: &[String],
            _: &GenOptions,
        ) -> Result<Vec<String>, SelfInstructError> {
            Ok(vec![String::new(); prompts.len()])
        }
    }
    let err = selfinstruct::run(
        &selfinstruct::builtin_seeds(),
        &Params::new(3),
        &mut Silent,
        &mut Recorder::default(),
    )
    .err()
    .unwrap();
    assert!(
        matches!(err, SelfInstructError::NothingUsable { rounds: 5 }),
        "{err}"
    );
}

#[tokio::test]
async fn generate_jobs_share_the_queue_report_and_refuse_bad_input() {
    let mut app = TestApp::sqlite().await;
    let key = app.key.clone();
    // Seeds of the paper's format, uploaded as a dataset.
    let seeds: Vec<Value> = selfinstruct::builtin_seeds()
        .into_iter()
        .take(8)
        .map(|s| serde_json::to_value(s).unwrap())
        .collect();
    let seed_set = app.upload(&key, &seeds).await;
    let (_, d) = app.get(&key, &format!("/datasets/{seed_set}")).await;
    assert_eq!(d["format"], "self_instruct_seeds");
    // Seed tasks are not training data.
    let (s, b) = app.post(&key, "/jobs", &quick_job(&seed_set)).await;
    assert_eq!(
        (s, b["error"]["param"].as_str()),
        (422, Some("training_dataset")),
        "{b}"
    );

    // Bad input: 422 naming the field, 404 for an unknown model, 400 for bad seed rows.
    for (body, status, param) in [
        (
            json!({"num_instructions": 0}),
            422,
            Some("num_instructions"),
        ),
        (
            json!({"num_instructions": 5000}),
            422,
            Some("num_instructions"),
        ),
        (
            json!({"num_instructions": 5, "temperature": 9}),
            422,
            Some("temperature"),
        ),
        (
            json!({"num_instructions": 5, "seed_dataset": "nope"}),
            422,
            Some("seed_dataset"),
        ),
        (
            json!({"num_instructions": 5, "model": "no-such-adapter"}),
            404,
            Some("model"),
        ),
    ] {
        let (s, b) = app.post(&key, "/datasets/generate", &body).await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (status, param),
            "{body} -> {b}"
        );
    }
    let chat = app.upload(&key, &[json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})]).await;
    let (s, b) = app
        .post(
            &key,
            "/datasets/generate",
            &json!({"num_instructions": 5, "seed_dataset": chat}),
        )
        .await;
    assert_eq!(
        (s, b["error"]["param"].as_str()),
        (422, Some("seed_dataset")),
        "{b}"
    );
    let (s, b) = app
        .send(
            app.http
                .post(app.url("/datasets"))
                .bearer_auth(&key)
                .header("content-type", "application/jsonl")
                .body("{\"instruction\": \"Do it.\", \"instances\": []}\n"),
        )
        .await;
    assert_eq!(
        (s, b["error"]["lines"][0]["line"].as_u64()),
        (400, Some(1)),
        "{b}"
    );

    // A job on the tiny model: it runs in the queue like any job, reports its rounds, and (the
    // tiny model writes nonsense) ends with a clear error.
    let (s, job) = app
        .post(
            &key,
            "/datasets/generate",
            &json!({"num_instructions": 2, "seed_dataset": seed_set, "prompts_per_round": 2}),
        )
        .await;
    assert_eq!(s, 201, "{job}");
    assert_eq!(job["kind"], "self_instruct");
    assert_eq!(job["self_instruct"]["seed_dataset"], seed_set.as_str());
    let id = job["id"].as_str().unwrap();
    let done = app.wait_finished(&key, id).await;
    assert_eq!(
        (done["status"].as_str(), done["error"]["code"].as_str()),
        (Some("failed"), Some("nothing_usable")),
        "{done}"
    );
    let events = app.events(&key, id).await;
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "metrics" && e["data"]["round"] == 1),
        "{events:?}"
    );

    // What the pipeline produces is a training dataset, and a job trains on it.
    let params = Params {
        prompts_per_round: 1,
        ..Params::new(2)
    };
    let out = selfinstruct::run(
        &selfinstruct::builtin_seeds(),
        &params,
        &mut Scripted::default(),
        &mut Recorder::default(),
    )
    .unwrap();
    let rows: Vec<Value> = out
        .rows
        .iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .collect();
    let grown = app.upload(&key, &rows).await;
    let mut body = quick_job(&grown);
    body["hyperparameters"]["max_seq_len"] = json!(256);
    let job = app.create_job(&key, &body).await;
    let done = app.wait_finished(&key, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    app.stop().await;
}

#[tokio::test]
async fn the_real_model_grows_a_dataset_that_trains() {
    let model = real_model_path().display().to_string();
    let mut app = TestApp::spawn(move |s| s.model.model = model, false).await;
    let key = app.key.clone();
    let (s, job) = app
        .post(
            &key,
            "/datasets/generate",
            &json!({"num_instructions": 3, "prompts_per_round": 4, "seed": 1, "name": "grown"}),
        )
        .await;
    assert_eq!(s, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(1200);
    let done = loop {
        let j = app.job(&key, &id).await;
        if ["succeeded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap()) {
            break j;
        }
        assert!(Instant::now() < deadline, "the job never finished: {j}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    let dataset = done["result_dataset_id"].as_str().unwrap();
    let (_, d) = app.get(&key, &format!("/datasets/{dataset}")).await;
    assert_eq!(
        (d["format"].as_str(), d["filename"].as_str()),
        (Some("instruction"), Some("grown.jsonl"))
    );
    assert!(d["rows"].as_i64().unwrap() >= 3, "{d}");
    let events = app.events(&key, &id).await;
    let accepted: Vec<&Value> = events
        .iter()
        .filter(|e| e["data"]["instruction"].is_string())
        .collect();
    assert_eq!(accepted.len(), 3, "{events:?}");
    for e in &accepted {
        eprintln!("generated: {}", e["message"]);
    }
    // It trains like any dataset.
    let (s, train) = app
        .post(&key, "/jobs", &json!({"training_dataset": dataset, "hyperparameters": {"n_epochs": 1, "batch_size": 8, "max_seq_len": 256}}))
        .await;
    assert_eq!(s, 201, "{train}");
    let trained = app.wait_finished(&key, train["id"].as_str().unwrap()).await;
    assert_eq!(trained["status"], "succeeded", "{trained}");
    app.stop().await;
}
