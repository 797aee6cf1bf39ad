//! The HTTP server on port 0 with the tiny model: health, readiness, errors, the OpenAPI file.

use crate::helpers::tiny;
use serde_json::Value;
use std::time::Duration;
use tuneshop::config::Settings;
use tuneshop::startup::{Application, StartupError};

struct TestApp {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), StartupError>>,
    _data: tempfile::TempDir,
}

impl TestApp {
    async fn spawn(model: String) -> Self {
        let data = tempfile::tempdir().unwrap();
        let settings = Settings::with_defaults(data.path().to_path_buf(), model);
        let app = Application::build(settings).await.expect("build app");
        let base = format!("http://127.0.0.1:{}", app.port());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(app.run_until(async {
            let _ = rx.await;
        }));
        Self {
            base,
            stop: Some(tx),
            handle,
            _data: data,
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let resp = reqwest::get(format!("{}{path}", self.base)).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    async fn wait_ready(&self) -> Value {
        for _ in 0..300 {
            let (status, body) = self.get("/readyz").await;
            if status == 200 {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server never became ready");
    }

    async fn stop(mut self) -> Result<(), StartupError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.handle.await.unwrap()
    }
}

#[tokio::test]
async fn health_readiness_and_json_errors() {
    let app = TestApp::spawn(tiny().gguf_quantized.display().to_string()).await;
    let (status, body) = app.get("/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let ready = app.wait_ready().await;
    assert_eq!(ready["database"], "sqlite");
    assert_eq!(ready["model"]["weight_format"], "q4_1+q8_0");
    assert_eq!(ready["model"]["layers"], 2);
    let (status, body) = app.get("/no/such/route").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "route_not_found");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/no/such/route"));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_model_that_cannot_load_is_reported_and_stops_the_server() {
    let app = TestApp::spawn("/definitely/not/a/model.gguf".into()).await;
    // While it is still up, readiness says why; then the server stops itself with the reason.
    if let Ok(resp) = reqwest::get(format!("{}/readyz", app.base)).await {
        assert_eq!(resp.status().as_u16(), 503);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_ready");
    }
    let err = tokio::time::timeout(Duration::from_secs(30), app.handle)
        .await
        .expect("server stops by itself")
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
}

#[tokio::test]
async fn committed_openapi_document_matches_the_code() {
    let committed = include_str!("../../openapi/openapi.json");
    let committed: Value = serde_json::from_str(committed).unwrap();
    let generated = serde_json::to_value(tuneshop::api::openapi_spec()).unwrap();
    assert_eq!(
        committed, generated,
        "openapi/openapi.json is stale: run `cargo run --release -- openapi > openapi/openapi.json`"
    );
    let app = TestApp::spawn(tiny().gguf_quantized.display().to_string()).await;
    let (status, served) = app.get("/openapi.json").await;
    assert_eq!((status, served), (200, generated));
    app.stop().await.unwrap();
}
