//! Scale-out as deployed: three `tuneshop serve` processes on one PostgreSQL database and one
//! S3 bucket (a real S3-compatible server). Jobs spread over the replicas and each runs once; a
//! replica killed mid-job has its job finished by another from the checkpoint; an adapter
//! trained on one replica is served by the others.

use crate::api::{rows, ChildApp, PgDatabase};
use crate::store_contract::S3Server;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant};

fn count(events: &[Value], needle: &str) -> usize {
    events
        .iter()
        .filter(|e| e["message"].as_str().unwrap_or("").contains(needle))
        .count()
}

#[tokio::test]
async fn replicas_share_the_queue_take_over_a_dead_ones_job_and_serve_each_others_adapters() {
    let pg = PgDatabase::create().await;
    let s3 = S3Server::start(&["tuneshop"]).await;
    let mut base_env = s3.env();
    base_env.push(("DATABASE_URL", pg.url.clone()));
    base_env.push(("TUNESHOP_STORE", "s3://tuneshop/replicas".into()));
    base_env.push(("TUNESHOP_STALE_AFTER_MS", "2000".into()));
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let mut env = base_env.clone();
        env.push(("TUNESHOP_WORKER_ID", format!("replica-{i}")));
        replicas.push(Some(ChildApp::start(d.path(), &env).await));
    }
    // The replicas still alive (one is killed below).
    macro_rules! r {
        ($i:expr) => {
            replicas[$i].as_ref().unwrap()
        };
    }
    let key = r!(0).tenant("shared").await;
    let dataset = r!(1).upload(&key, &rows(4)).await;

    // Six jobs, created through different replicas: each runs exactly once, on some replica.
    let mut ids = Vec::new();
    for i in 0..6 {
        let body = json!({
            "training_dataset": dataset,
            "suffix": format!("job{i}"),
            "hyperparameters": { "n_epochs": 3, "batch_size": 1, "max_seq_len": 64 }
        });
        ids.push(
            r!(i % 3).create_job(&key, &body).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut workers = HashSet::new();
    for id in &ids {
        let done = r!(2).wait_finished(&key, id).await;
        assert_eq!(
            (done["status"].as_str(), done["attempts"].as_i64()),
            (Some("succeeded"), Some(1)),
            "{done}"
        );
        let events = r!(0).events(&key, id).await;
        assert_eq!(count(&events, "Started on worker"), 1, "{events:?}");
        assert_eq!(count(&events, "Succeeded"), 1, "{events:?}");
        let started = events
            .iter()
            .find(|e| {
                e["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("Started on worker")
            })
            .unwrap();
        workers.insert(
            started["message"]
                .as_str()
                .unwrap()
                .split_whitespace()
                .nth(3)
                .unwrap()
                .to_string(),
        );
    }
    assert!(workers.len() >= 2, "the jobs did not spread: {workers:?}");

    // Any replica serves any adapter: the same greedy answer from all three.
    let ask = json!({"model": "job0", "prompt": "the quick brown fox", "max_tokens": 12, "temperature": 0});
    let mut answers = HashSet::new();
    for (i, replica) in replicas.iter().enumerate() {
        let (status, out) = replica
            .as_ref()
            .unwrap()
            .post(&key, "/v1/completions", &ask)
            .await;
        assert_eq!(status, 200, "replica {i}: {out}");
        answers.insert(out["choices"][0]["text"].as_str().unwrap().to_string());
    }
    assert_eq!(answers.len(), 1, "{answers:?}");

    // A long job: kill the replica running it once a checkpoint exists; another takes it over
    // (its heartbeat goes stale) and finishes it from that checkpoint.
    let long = r!(0)
        .create_job(&key, &json!({
            "training_dataset": dataset,
            "suffix": "survivor",
            "hyperparameters": { "n_epochs": 60, "batch_size": 1, "checkpoint_every": 5, "max_seq_len": 64 }
        }))
        .await;
    let id = long["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + crate::api::PATIENCE;
    let (runner, checkpoint) = loop {
        let job = r!(1).job(&key, &id).await;
        let (_, cps) = r!(1).get(&key, &format!("/jobs/{id}/checkpoints")).await;
        let first = cps["data"]
            .as_array()
            .and_then(|c| c.first())
            .map(|c| c["step"].as_i64().unwrap());
        if let (Some(w), Some(step)) = (job["worker"]["id"].as_str(), first) {
            if job["status"] == "running" {
                break (w.to_string(), step);
            }
        }
        assert!(Instant::now() < deadline, "no checkpoint: {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let victim: usize = runner.trim_start_matches("replica-").parse().unwrap();
    replicas[victim].take().unwrap().kill();
    let survivor = (victim + 1) % 3;
    let done = r!(survivor).wait_finished(&key, &id).await;
    assert_eq!(
        (done["status"].as_str(), done["attempts"].as_i64()),
        (Some("succeeded"), Some(2)),
        "{done}"
    );
    let events = r!(survivor).events(&key, &id).await;
    let starts: Vec<&str> = events
        .iter()
        .filter_map(|e| {
            e["message"]
                .as_str()
                .filter(|m| m.starts_with("Started on worker"))
        })
        .collect();
    assert_eq!(starts.len(), 2, "{events:?}");
    assert!(
        !starts[1].contains(&runner),
        "taken over by the dead replica itself: {starts:?}"
    );
    let resumed = events
        .iter()
        .find(|e| {
            e["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("Resumed from the checkpoint at step")
        })
        .unwrap_or_else(|| panic!("no resume: {events:?}"));
    let at: i64 = resumed["message"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .nth(6)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        at >= checkpoint,
        "resumed at {at}, first checkpoint {checkpoint}"
    );
    assert_eq!(count(&events, "Succeeded"), 1, "{events:?}");
    // Its adapter serves from every replica still alive.
    for i in (0..3).filter(|&i| i != victim) {
        let (status, out) = r!(i)
            .post(
                &key,
                "/v1/completions",
                &json!({"model": "survivor", "prompt": "hi", "max_tokens": 4}),
            )
            .await;
        assert_eq!(status, 200, "replica {i}: {out}");
    }
}
