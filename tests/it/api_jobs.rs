//! The service end to end on the tiny model: upload → job → adapter, the queue's order,
//! cancellation, events, checkpoints, metrics; on SQLite and on PostgreSQL.

use crate::api::{quick_job, rows, unzip, TestApp};
use crate::helpers::tiny;
use serde_json::{json, Value};
use tuneshop::lora::peft;

fn message_events<'a>(events: &'a [Value], needle: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["message"].as_str().unwrap_or("").contains(needle))
        .collect()
}

async fn upload_train_and_download(app: &TestApp) {
    let key = &app.key;
    let train = app.upload(key, &rows(6)).await;
    let valid = app.upload(key, &rows(2)).await;
    let mut body = quick_job(&train);
    body["validation_dataset"] = json!(valid);
    body["suffix"] = json!("counting");
    body["hyperparameters"]["checkpoint_every"] = json!(2);
    body["hyperparameters"]["compute_dtype"] = json!("bf16");
    let job = app.create_job(key, &body).await;
    assert_eq!(job["status"], "validating_files");
    assert_eq!(job["hyperparameters"]["compute_dtype"], "bf16");
    assert_eq!(
        job["hyperparameters"]["lora_r"], 8,
        "defaults are filled in"
    );
    let id = job["id"].as_str().unwrap();

    let done = app.wait_finished(key, id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["progress"]["step"], 6, "2 epochs of 3 steps");
    assert_eq!(done["progress"]["total_steps"], 6);
    assert!(done["progress"]["valid_loss"].as_f64().unwrap().is_finite());
    assert!(done["trained_tokens"].as_i64().unwrap() > 0);
    assert!(done["error"].is_null());
    let adapter_id = done["adapter_id"].as_str().unwrap();

    // The registry has it, by id and by the job's suffix.
    let (status, adapter) = app.get(key, &format!("/adapters/{adapter_id}")).await;
    assert_eq!(status, 200, "{adapter}");
    assert_eq!(adapter["name"], "counting");
    assert_eq!(adapter["job_id"], id);
    let (status, by_name) = app.get(key, "/adapters/counting").await;
    assert_eq!((status, &by_name["id"]), (200, &adapter["id"]));

    // The download is a PEFT directory that loads on the base model.
    let resp = app
        .http
        .get(app.url(&format!("/adapters/{adapter_id}/download")))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "application/zip");
    let bytes = resp.bytes().await.unwrap();
    let dir = unzip(&bytes, &app.data.path().join("downloaded"));
    let base = crate::helpers::load(&tiny().gguf_quantized);
    let loaded = peft::load(&dir, base.llama.config(), &candle_core::Device::Cpu).unwrap();
    assert_eq!(loaded.config.r, 8);
    assert_eq!(
        loaded.parameter_count() as i64,
        adapter["parameters"].as_i64().unwrap()
    );

    // Events tell the story, with per-step metrics; checkpoints were listed as written.
    let events = app.events(key, id).await;
    assert_eq!(message_events(&events, "Started on worker").len(), 1);
    assert_eq!(message_events(&events, "Files validated").len(), 1);
    let metrics: Vec<&Value> = events.iter().filter(|e| e["type"] == "metrics").collect();
    assert_eq!(metrics.len(), 6);
    assert!(metrics[0]["data"]["train_loss"].as_f64().is_some());
    assert_eq!(message_events(&events, "Succeeded").len(), 1);
    let (_, cps) = app.get(key, &format!("/jobs/{id}/checkpoints")).await;
    let steps: Vec<i64> = cps["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, vec![2, 4, 6]);

    // Listing pages newest first.
    let second = app.create_job(key, &quick_job(&train)).await;
    let (_, page) = app.get(key, "/jobs?limit=1").await;
    assert_eq!(page["data"][0]["id"], second["id"]);
    assert_eq!(page["has_more"], true);
    let (_, page2) = app
        .get(
            key,
            &format!("/jobs?limit=1&after={}", second["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(page2["data"][0]["id"], id);
    assert_eq!(page2["has_more"], false);
    app.wait_finished(key, second["id"].as_str().unwrap()).await;

    // Metrics count the jobs and the requests.
    let text = app.metrics().await;
    assert!(
        text.contains("tuneshop_jobs{status=\"succeeded\"} 2"),
        "{text}"
    );
    assert!(text.contains("route=\"/jobs/{id}\""), "{text}");
}

#[tokio::test]
async fn upload_train_register_and_download_on_sqlite() {
    let mut app = TestApp::sqlite().await;
    upload_train_and_download(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn upload_train_register_and_download_on_postgres() {
    let mut app = TestApp::postgres().await;
    upload_train_and_download(&app).await;
    app.stop().await;
}

/// Time (ms) of the first event whose message contains `needle`.
fn when(events: &[Value], needle: &str) -> i64 {
    message_events(events, needle)
        .first()
        .unwrap_or_else(|| panic!("no `{needle}` event in {events:?}"))["created_at"]
        .as_i64()
        .unwrap()
}

#[tokio::test]
async fn jobs_submitted_together_run_one_after_another_in_order() {
    let mut app = TestApp::sqlite().await;
    let key = &app.key;
    let data = app.upload(key, &rows(4)).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            app.create_job(key, &quick_job(&data)).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut spans = Vec::new();
    for id in &ids {
        let job = app.wait_finished(key, id).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["attempts"], 1);
        let events = app.events(key, id).await;
        spans.push((
            when(&events, "Started on worker"),
            when(&events, "Succeeded"),
        ));
    }
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "a job started before the previous one finished: {spans:?}"
        );
    }
    app.stop().await;
}

/// A job long enough to be caught running.
fn long_job(dataset: &str) -> Value {
    json!({
        "training_dataset": dataset,
        "hyperparameters": { "n_epochs": 100, "batch_size": 1, "checkpoint_every": 3, "max_seq_len": 64 }
    })
}

#[tokio::test]
async fn cancel_stops_a_running_job_and_a_queued_one_never_runs() {
    let mut app = TestApp::sqlite().await;
    let key = &app.key;
    let data = app.upload(key, &rows(8)).await;
    let running = app.create_job(key, &long_job(&data)).await;
    let running = running["id"].as_str().unwrap().to_string();
    let queued = app.create_job(key, &quick_job(&data)).await;
    let queued = queued["id"].as_str().unwrap().to_string();

    // The dataset cannot go while jobs wait on it.
    let (status, body) = app.delete(key, &format!("/datasets/{data}")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("dataset_in_use"))
    );

    app.wait_job(key, &running, |j| {
        j["status"] == "running" && j["progress"]["step"].as_i64() >= Some(4)
    })
    .await;
    let (status, job) = app
        .post(key, &format!("/jobs/{queued}/cancel"), &json!({}))
        .await;
    assert_eq!(
        (status, job["status"].as_str()),
        (200, Some("cancelled")),
        "{job}"
    );
    let (status, job) = app
        .post(key, &format!("/jobs/{running}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["cancel_requested"], true);

    let done = app.wait_finished(key, &running).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    let step = done["progress"]["step"].as_i64().unwrap();
    assert!(step < done["progress"]["total_steps"].as_i64().unwrap());
    // The checkpoints stay, the last one at the step where it stopped.
    let (_, cps) = app.get(key, &format!("/jobs/{running}/checkpoints")).await;
    let last = cps["data"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["step"].as_i64().unwrap(), step, "{cps}");

    // The queued one never started, and cancelling again is refused.
    let events = app.events(key, &queued).await;
    assert!(
        message_events(&events, "Started on worker").is_empty(),
        "{events:?}"
    );
    assert_eq!(app.job(key, &queued).await["status"], "cancelled");
    let (status, body) = app
        .post(key, &format!("/jobs/{queued}/cancel"), &json!({}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("job_finished"))
    );

    // Now nothing uses the dataset.
    let (status, _) = app.delete(key, &format!("/datasets/{data}")).await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[tokio::test]
async fn a_graceful_shutdown_requeues_the_running_job_and_a_restart_resumes_it() {
    let data_dir = tempfile::tempdir().unwrap();
    let path = data_dir.path().to_path_buf();
    let mut app = TestApp::spawn(|s| s.model.data_dir = path.clone(), false).await;
    let key = app.key.clone();
    let data = app.upload(&key, &rows(8)).await;
    let id = app.create_job(&key, &long_job(&data)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    app.wait_job(&key, &id, |j| j["progress"]["step"].as_i64() >= Some(4))
        .await;
    app.stop().await;

    let mut again = TestApp::spawn(|s| s.model.data_dir = path.clone(), false).await;
    assert_eq!(again.key, key, "the first tenant is created once");
    let done = again.wait_finished(&key, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2);
    let events = again.events(&key, &id).await;
    assert_eq!(
        message_events(&events, "Interrupted by a server shutdown").len(),
        1
    );
    assert_eq!(
        message_events(&events, "Resumed from the checkpoint").len(),
        1
    );
    again.stop().await;
}

#[tokio::test]
async fn events_stream_live_until_the_job_ends() {
    use futures_util::StreamExt;
    let mut app = TestApp::sqlite().await;
    let key = &app.key;
    let data = app.upload(key, &rows(4)).await;
    let id = app.create_job(key, &quick_job(&data)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = app
        .http
        .get(app.url(&format!("/jobs/{id}/events")))
        .bearer_auth(key)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = String::new();
    let mut stream = resp.bytes_stream();
    // The stream ends by itself once the job has finished.
    let read = tokio::time::timeout(crate::api::PATIENCE, async {
        while let Some(chunk) = stream.next().await {
            body.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await;
    assert!(read.is_ok(), "the stream did not end: {body}");
    let events: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(
        events,
        app.events(key, &id).await,
        "the stream and the list agree"
    );
    assert!(events.last().unwrap()["message"]
        .as_str()
        .unwrap()
        .starts_with("Succeeded"));
    app.stop().await;
}
