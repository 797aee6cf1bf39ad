//! Isolation between tenants, authentication, and bad input: every error is JSON with a stable
//! code and a message that says what to fix.

use crate::api::{quick_job, rows, TestApp, ADMIN_TOKEN};
use serde_json::{json, Value};

#[tokio::test]
async fn tenants_see_only_their_own_things() {
    let mut app = TestApp::sqlite().await;
    let a = app.key.clone();
    let b = app.tenant("bob").await;
    let data = app.upload(&a, &rows(4)).await;
    let mut body = quick_job(&data);
    body["suffix"] = json!("mine");
    let job = app.create_job(&a, &body).await;
    let job_id = job["id"].as_str().unwrap();
    let done = app.wait_finished(&a, job_id).await;
    let adapter = done["adapter_id"].as_str().unwrap();

    for path in [
        format!("/datasets/{data}"),
        format!("/jobs/{job_id}"),
        format!("/jobs/{job_id}/events"),
        format!("/jobs/{job_id}/checkpoints"),
        format!("/adapters/{adapter}"),
        "/adapters/mine".to_string(),
    ] {
        let (status, body) = app.get(&b, &path).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{path}"
        );
        let (status, _) = app.get(&a, &path).await;
        assert_eq!(status, 200, "{path}");
    }
    let download = |key: &str| {
        app.http
            .get(app.url(&format!("/adapters/{adapter}/download")))
            .bearer_auth(key.to_string())
            .send()
    };
    assert_eq!(download(&b).await.unwrap().status().as_u16(), 404);
    assert_eq!(download(&a).await.unwrap().status().as_u16(), 200);
    let (status, _) = app.delete(&b, &format!("/adapters/{adapter}")).await;
    assert_eq!(status, 404);
    let (status, _) = app
        .post(&b, &format!("/jobs/{job_id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 404);
    // B cannot train on A's dataset either.
    let (status, body) = app.post(&b, "/jobs", &quick_job(&data)).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (422, Some("training_dataset"))
    );
    let (_, list) = app.get(&b, "/datasets").await;
    assert_eq!(list["data"], json!([]));

    // Keys: none, wrong, revoked.
    let (status, body) = app.send(app.http.get(app.url("/datasets"))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("missing_api_key"))
    );
    let (status, body) = app.get("ts-not-a-key", "/datasets").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let tenants = app.get(ADMIN_TOKEN, "/tenants").await.1;
    let bob = tenants["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "bob")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, rotated) = app
        .post(ADMIN_TOKEN, &format!("/tenants/{bob}/keys"), &json!({}))
        .await;
    assert_eq!(status, 201, "{rotated}");
    let (status, _) = app.get(&b, "/datasets").await;
    assert_eq!(status, 401, "the old key is revoked");
    let (status, _) = app
        .get(rotated["api_key"].as_str().unwrap(), "/datasets")
        .await;
    assert_eq!(status, 200);
    // Tenant administration needs the admin token, not a tenant key.
    let (status, body) = app.get(&a, "/tenants").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_admin_token"))
    );
    let (status, _) = app.delete(ADMIN_TOKEN, &format!("/tenants/{bob}")).await;
    assert_eq!(status, 200);
    let (status, _) = app
        .get(rotated["api_key"].as_str().unwrap(), "/datasets")
        .await;
    assert_eq!(status, 401, "a deleted tenant's keys stop working");
    app.stop().await;
}

async fn upload_raw(app: &TestApp, content_type: &str, body: &str) -> (u16, Value) {
    app.send(
        app.http
            .post(app.url("/datasets"))
            .bearer_auth(&app.key)
            .header("content-type", content_type)
            .body(body.to_string()),
    )
    .await
}

#[tokio::test]
async fn bad_uploads_are_refused_with_line_numbers_and_limits() {
    let mut app = TestApp::spawn(|s| s.max_upload_bytes = 4096, false).await;
    let text = "{\"prompt\": \"a\", \"completion\": \"b\"}\n\nnot json\n{\"prompt\": \"a\"}\n{\"instruction\": \"x\", \"output\": \"y\"}\n";
    let (status, body) = upload_raw(&app, "application/jsonl", text).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_dataset")),
        "{body}"
    );
    let lines: Vec<i64> = body["error"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_i64().unwrap())
        .collect();
    assert_eq!(lines, vec![3, 4, 5], "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("line 4") && message.contains("completion"),
        "{message}"
    );

    let (status, body) = upload_raw(&app, "application/jsonl", "").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_dataset"))
    );

    let big = format!(
        "{}\n",
        json!({ "prompt": "x".repeat(5000), "completion": "y" })
    );
    let (status, body) = upload_raw(&app, "application/jsonl", &big).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{body}"
    );

    let (status, body) = upload_raw(&app, "image/png", "x").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );

    // Multipart works too, and a form without `file` is named.
    let ok = "{\"prompt\": \"a\", \"completion\": \"b\"}\n";
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::text(ok).file_name("mine.jsonl"),
    );
    let (status, body) = app
        .send(
            app.http
                .post(app.url("/datasets"))
                .bearer_auth(&app.key)
                .multipart(form),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (body["filename"].as_str(), body["rows"].as_i64()),
        (Some("mine.jsonl"), Some(1))
    );
    assert_eq!(body["format"], "prompt_completion");
    let form = reqwest::multipart::Form::new().text("other", "x");
    let (status, body) = app
        .send(
            app.http
                .post(app.url("/datasets"))
                .bearer_auth(&app.key)
                .multipart(form),
        )
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("file"))
    );
    app.stop().await;
}

#[tokio::test]
async fn bad_jobs_are_refused_naming_the_field() {
    let mut app = TestApp::sqlite().await;
    let key = app.key.clone();
    let data = app.upload(&key, &rows(2)).await;
    let cases = [
        (
            json!({ "training_dataset": data, "hyperparameters": { "lora_r": 0 } }),
            "hyperparameters.lora_r",
        ),
        (
            json!({ "training_dataset": data, "hyperparameters": { "learning_rate": -1.0 } }),
            "hyperparameters.learning_rate",
        ),
        (
            json!({ "training_dataset": data, "hyperparameters": { "target_modules": ["qkv"] } }),
            "hyperparameters.target_modules",
        ),
        (
            json!({ "training_dataset": data, "hyperparameters": { "n_epochs": "three" } }),
            "hyperparameters.n_epochs",
        ),
        (
            json!({ "training_dataset": data, "hyperparameters": { "bogus": 1 } }),
            "bogus",
        ),
        (
            json!({ "training_dataset": data, "hyperparameters": { "compute_dtype": "fp8" } }),
            "hyperparameters.compute_dtype",
        ),
        (
            json!({ "training_dataset": data, "base_model": "gpt-4" }),
            "base_model",
        ),
        (
            json!({ "training_dataset": data, "suffix": "has space" }),
            "suffix",
        ),
        (
            json!({ "training_dataset": "00000000-0000-0000-0000-000000000000" }),
            "training_dataset",
        ),
        (
            json!({ "training_dataset": data, "validation_dataset": "nope" }),
            "validation_dataset",
        ),
        (json!({}), "training_dataset"),
    ];
    for (body, param) in cases {
        let (status, err) = app.post(&key, "/jobs", &body).await;
        assert_eq!(status, 422, "{body} → {err}");
        assert_eq!(err["error"]["code"], "invalid_request");
        let got = err["error"]["param"].as_str().unwrap_or("");
        assert!(
            got.contains(param),
            "{body}: param `{got}`, expected `{param}` ({err})"
        );
    }
    let (status, err) = app
        .send(
            app.http
                .post(app.url("/jobs"))
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body("{oops"),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let (status, err) = app
        .send(app.http.post(app.url("/jobs")).bearer_auth(&key).body("{}"))
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );

    // A response cut off entirely by max_seq_len fails in validation, naming the line.
    let long_prompt = app
        .upload(
            &key,
            &[json!({ "prompt": "word ".repeat(40), "completion": "x" })],
        )
        .await;
    let job = app
        .create_job(
            &key,
            &json!({ "training_dataset": long_prompt, "hyperparameters": { "max_seq_len": 8 } }),
        )
        .await;
    let failed = app.wait_finished(&key, job["id"].as_str().unwrap()).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["code"], "invalid_training_file");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 1"),
        "{failed}"
    );

    // Unknown ids are 404s, whatever their shape.
    for path in [
        "/jobs/nope",
        "/jobs/00000000-0000-0000-0000-000000000000",
        "/datasets/x",
        "/adapters/x",
    ] {
        let (status, body) = app.get(&key, path).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{path}"
        );
    }
    // A suffix can name one adapter only.
    let mut body = quick_job(&data);
    body["suffix"] = json!("dup");
    app.create_job(&key, &body).await;
    let (status, err) = app.post(&key, "/jobs", &body).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (409, Some("name_taken"))
    );
    app.stop().await;
}

#[tokio::test]
async fn peft_adapters_are_imported_after_validation() {
    let mut app = TestApp::sqlite().await;
    let key = app.key.clone();
    // An adapter trained here, downloaded and imported again, is accepted...
    let data = app.upload(&key, &rows(2)).await;
    let job = app.create_job(&key, &quick_job(&data)).await;
    let done = app.wait_finished(&key, job["id"].as_str().unwrap()).await;
    let adapter = done["adapter_id"].as_str().unwrap();
    let bytes = app
        .http
        .get(app.url(&format!("/adapters/{adapter}/download")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let dir = crate::api::unzip(&bytes, &app.data.path().join("dl"));
    let config = std::fs::read(dir.join("adapter_config.json")).unwrap();
    let weights = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let form = |config: Vec<u8>, name: &str| {
        reqwest::multipart::Form::new()
            .part("adapter_config", reqwest::multipart::Part::bytes(config))
            .part(
                "adapter_model",
                reqwest::multipart::Part::bytes(weights.clone()),
            )
            .text("name", name.to_string())
    };
    let (status, imported) = app
        .send(
            app.http
                .post(app.url("/adapters"))
                .bearer_auth(&key)
                .multipart(form(config.clone(), "again")),
        )
        .await;
    assert_eq!(status, 201, "{imported}");
    assert_eq!(
        (imported["source"].as_str(), imported["name"].as_str()),
        (Some("import"), Some("again"))
    );
    let (status, body) = app
        .send(
            app.http
                .post(app.url("/adapters"))
                .bearer_auth(&key)
                .multipart(form(config.clone(), "again")),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("name_taken"))
    );

    // ...but DoRA, or a rank the weights do not have, is refused at import.
    let mut c: Value = serde_json::from_slice(&config).unwrap();
    c["use_dora"] = json!(true);
    let (status, body) = app
        .send(
            app.http
                .post(app.url("/adapters"))
                .bearer_auth(&key)
                .multipart(form(serde_json::to_vec(&c).unwrap(), "dora")),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("DoRA"),
        "{body}"
    );
    let mut c: Value = serde_json::from_slice(&config).unwrap();
    c["r"] = json!(4);
    let (status, body) = app
        .send(
            app.http
                .post(app.url("/adapters"))
                .bearer_auth(&key)
                .multipart(form(serde_json::to_vec(&c).unwrap(), "r4")),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let (_, list) = app.get(&key, "/adapters").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);

    // Deleting removes it from the registry.
    let (status, _) = app.delete(&key, "/adapters/again").await;
    assert_eq!(status, 200);
    let (status, _) = app.get(&key, "/adapters/again").await;
    assert_eq!(status, 404);
    app.stop().await;
}
