//! The server as real child processes: killed mid-job and restarted (the job resumes from its
//! checkpoint; nothing is lost or doubled), and two servers on one PostgreSQL (each job runs
//! exactly once).

use crate::api::{initial_key, rows, ChildApp, PgDatabase, ADMIN_TOKEN};
use serde_json::{json, Value};

fn count(events: &[Value], needle: &str) -> usize {
    events
        .iter()
        .filter(|e| e["message"].as_str().unwrap_or("").contains(needle))
        .count()
}

#[tokio::test]
async fn a_job_killed_mid_run_resumes_from_its_checkpoint_after_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let app = ChildApp::start(data.path(), &[]).await;
    let key = initial_key(data.path());
    let dataset = app.upload(&key, &rows(8)).await;
    let job = app
        .create_job(
            &key,
            &json!({
                "training_dataset": dataset,
                "suffix": "survivor",
                "hyperparameters": { "n_epochs": 60, "batch_size": 1, "checkpoint_every": 5, "max_seq_len": 64 }
            }),
        )
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    // Kill it once a checkpoint exists and it has moved past it.
    let deadline = std::time::Instant::now() + crate::api::PATIENCE;
    let first_checkpoint = loop {
        let (_, cps) = app.get(&key, &format!("/jobs/{id}/checkpoints")).await;
        if let Some(c) = cps["data"].as_array().and_then(|c| c.first()) {
            break c["step"].as_i64().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint was written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let before = app.job(&key, &id).await;
    assert_eq!(before["status"], "running", "{before}");
    app.kill();

    let app = ChildApp::start(data.path(), &[]).await;
    let done = app.wait_finished(&key, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2);
    assert_eq!(done["progress"]["step"], done["progress"]["total_steps"]);
    let events = app.events(&key, &id).await;
    let resumed: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("Resumed from the checkpoint at step")
        })
        .collect();
    assert_eq!(resumed.len(), 1, "{events:?}");
    let at: i64 = resumed[0]["message"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .nth(6)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        at >= first_checkpoint,
        "resumed at {at}, first checkpoint {first_checkpoint}"
    );
    assert_eq!(count(&events, "Succeeded"), 1);

    // Nothing lost, nothing doubled.
    let (_, datasets) = app.get(&key, "/datasets").await;
    assert_eq!(datasets["data"].as_array().unwrap().len(), 1);
    let (_, jobs) = app.get(&key, "/jobs").await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), 1);
    let (_, adapters) = app.get(&key, "/adapters").await;
    let adapters = adapters["data"].as_array().unwrap();
    assert_eq!(adapters.len(), 1);
    assert_eq!(adapters[0]["name"], "survivor");
}

#[tokio::test]
async fn two_servers_on_one_postgres_run_each_job_exactly_once() {
    let pg = PgDatabase::create().await;
    let store = tempfile::tempdir().unwrap();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let envs = [
        ("DATABASE_URL", pg.url.clone()),
        ("TUNESHOP_STORE", store.path().display().to_string()),
    ];
    let a = ChildApp::start(d1.path(), &envs).await;
    let b = ChildApp::start(d2.path(), &envs).await;
    let key = a.tenant("shared").await;
    let dataset = a.upload(&key, &rows(4)).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        // Alternate the server that takes the request: both share the queue.
        let via = if i % 2 == 0 { &a } else { &b };
        let job = via
            .create_job(
                &key,
                &json!({
                    "training_dataset": dataset,
                    "hyperparameters": { "n_epochs": 3, "batch_size": 1, "max_seq_len": 64 }
                }),
            )
            .await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let mut workers = std::collections::HashSet::new();
    for id in &ids {
        let done = b.wait_finished(&key, id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["attempts"], 1, "{done}");
        let events = a.events(&key, id).await;
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
            .unwrap()["message"]
            .as_str()
            .unwrap()
            .to_string();
        workers.insert(started.split_whitespace().nth(3).unwrap().to_string());
    }
    let (_, adapters) = a.get(&key, "/adapters").await;
    assert_eq!(
        adapters["data"].as_array().unwrap().len(),
        ids.len(),
        "one adapter per job"
    );
    // Either server serves the registry, whichever trained the adapter.
    let (_, from_b) = b.get(&key, "/adapters").await;
    assert_eq!(from_b["data"], adapters["data"]);
    assert!(!workers.is_empty());
    let (status, _) = a.get(ADMIN_TOKEN, "/tenants").await;
    assert_eq!(status, 200);
}
