//! The official `openai` Python package (from PyPI) against the running server, unchanged:
//! completions, chat completions, streaming, an adapter as `model`, and its error classes.

use crate::api::{Client, TestApp};
use crate::batching::random_adapter;
use crate::helpers::{importable, load, pip_package, tiny};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tuneshop::lora::peft;
use tuneshop::model::Proj;

/// The client version the test installs.
const OPENAI_VERSION: &str = "3.60.0";

/// A directory with the `openai` package.
fn openai_package() -> PathBuf {
    pip_package(&format!("openai=={OPENAI_VERSION}"), |d| {
        importable(d, "openai")
    })
}

async fn import_adapter(app: &Client, key: &str, dir: &Path) {
    let m = load(&tiny().gguf_quantized);
    peft::save(&random_adapter(&m, 11, 4, &[Proj::Q, Proj::V]), dir).unwrap();
    let form = reqwest::multipart::Form::new()
        .part(
            "adapter_config",
            reqwest::multipart::Part::bytes(std::fs::read(dir.join(peft::CONFIG_FILE)).unwrap()),
        )
        .part(
            "adapter_model",
            reqwest::multipart::Part::bytes(std::fs::read(dir.join(peft::WEIGHTS_FILE)).unwrap()),
        )
        .text("name", "tuned");
    let (status, body) = app
        .send(
            app.http
                .post(app.url("/adapters"))
                .bearer_auth(key)
                .multipart(form),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn the_official_openai_python_client_works_unchanged() {
    let package = tokio::task::spawn_blocking(openai_package).await.unwrap();
    let mut app = TestApp::sqlite().await;
    let key = app.key.clone();
    import_adapter(&app, &key, &app.data.path().join("tuned")).await;
    let (_, models) = app.get(&key, "/v1/models").await;
    let base = models["data"][0]["id"].as_str().unwrap().to_string();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_e2e.py");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(script)
        .env("PYTHONPATH", &package)
        .env("OPENAI_BASE_URL", app.url("/v1"))
        .env("OPENAI_API_KEY", &key)
        .env("BASE_MODEL", &base)
        .env("ADAPTER", "tuned");
    let out = cmd.output().await.expect("run python3");
    assert!(
        out.status.success(),
        "the script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    assert_eq!(seen["client_version"], OPENAI_VERSION);
    let mut models = vec![base.clone(), "tuned".to_string()];
    models.sort();
    assert_eq!(seen["models"], json!(models));

    for name in [base.as_str(), "tuned"] {
        let c = &seen[format!("completion:{name}")];
        assert_eq!(c["text"], c["streamed"], "{c}");
        assert!(
            c["finish_reason"] == "stop" || c["finish_reason"] == "length",
            "{c}"
        );
        // The same request over plain HTTP gives the same text.
        let (status, direct) = app
            .post(&key, "/v1/completions", &json!({"model": name, "prompt": "the quick brown fox", "max_tokens": 20, "temperature": 0}))
            .await;
        assert_eq!(status, 200);
        assert_eq!(c["text"], direct["choices"][0]["text"]);
        let chat = &seen[format!("chat:{name}")];
        assert_eq!(chat["role"], "assistant");
        assert_eq!(chat["text"], chat["streamed"], "{chat}");
        assert_eq!(chat["completion_tokens"], chat["streamed_usage"], "{chat}");
    }
    assert_ne!(
        seen[format!("completion:{base}")]["text"],
        seen["completion:tuned"]["text"]
    );
    assert_eq!(
        seen["unknown_model"],
        json!({"status": 404, "code": "model_not_found"})
    );
    app.stop().await;
}
