//! The OpenAI-compatible inference API on the tiny model: adapters hot-swapped per request,
//! streaming, the sampling parameters, tenant isolation, deletion under a running stream,
//! backpressure, and serving while a training job runs.

use crate::api::{quick_job, rows, Client, TestApp};
use crate::batching::random_adapter;
use crate::helpers::{load, tiny, tuneshop};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tuneshop::lora::peft;
use tuneshop::model::Proj;

/// Writes a random adapter for the tiny model into `dir` and imports it as `name`.
async fn import_random(
    app: &Client,
    key: &str,
    dir: &Path,
    name: &str,
    seed: u64,
    targets: &[Proj],
) -> PathBuf {
    let m = load(&tiny().gguf_quantized);
    let adapter = random_adapter(&m, seed, 4, targets);
    let dir = dir.join(name);
    peft::save(&adapter, &dir).unwrap();
    let form = reqwest::multipart::Form::new()
        .part(
            "adapter_config",
            reqwest::multipart::Part::bytes(std::fs::read(dir.join(peft::CONFIG_FILE)).unwrap()),
        )
        .part(
            "adapter_model",
            reqwest::multipart::Part::bytes(std::fs::read(dir.join(peft::WEIGHTS_FILE)).unwrap()),
        )
        .text("name", name.to_string());
    let (status, body) = app
        .send(
            app.http
                .post(app.url("/adapters"))
                .bearer_auth(key)
                .multipart(form),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    dir
}

async fn complete(app: &Client, key: &str, body: Value) -> Value {
    let (status, out) = app.post(key, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{out}");
    out
}

/// The `data:` payloads of a whole SSE response, `[DONE]` included.
async fn stream_events(app: &Client, key: &str, path: &str, body: &Value) -> Vec<String> {
    let resp = app
        .http
        .post(app.url(path))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

fn text_of(v: &Value, i: usize) -> String {
    v["choices"][i]["text"].as_str().unwrap().to_string()
}

const PROMPT: &str = "the quick brown fox";

#[tokio::test]
async fn adapters_are_applied_per_request_and_match_the_cli() {
    let mut app = TestApp::sqlite().await;
    let key = app.key.clone();
    let dirs = app.data.path().join("adapters");
    let x = import_random(&app, &key, &dirs, "x", 1, &[Proj::Q, Proj::V]).await;
    let y = import_random(&app, &key, &dirs, "y", 2, &Proj::ALL).await;
    let (_, models) = app.get(&key, "/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let base_name = ids[0].to_string();
    assert!(ids.contains(&"x") && ids.contains(&"y"), "{models}");

    let body =
        |model: &str| json!({"model": model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0});
    let mut alone = Vec::new();
    for model in ["x", "y", base_name.as_str()] {
        let out = complete(&app, &key, body(model)).await;
        assert_eq!(out["object"], "text_completion");
        assert_eq!(out["model"], model);
        alone.push(text_of(&out, 0));
    }
    assert_ne!(alone[0], alone[2], "adapter x changes nothing");
    assert_ne!(alone[1], alone[2], "adapter y changes nothing");

    // The CLI applying the same PEFT files gives the same text.
    let model_path = tiny().gguf_quantized.display().to_string();
    for (dir, want) in [
        (Some(&x), &alone[0]),
        (Some(&y), &alone[1]),
        (None, &alone[2]),
    ] {
        let mut args = vec![
            "generate",
            "--model",
            &model_path,
            "--prompt",
            PROMPT,
            "--max-tokens",
            "24",
        ];
        let dir = dir.map(|d| d.display().to_string());
        if let Some(d) = &dir {
            args.extend(["--adapter", d]);
        }
        let out = tuneshop(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8(out.stdout).unwrap();
        assert_eq!(printed.strip_suffix('\n').unwrap(), want);
    }

    // Concurrent requests on x, y and the base each get what they got alone.
    let (a, b, c) = tokio::join!(
        complete(&app, &key, body("x")),
        complete(&app, &key, body("y")),
        complete(&app, &key, body(&base_name)),
    );
    assert_eq!(
        [text_of(&a, 0), text_of(&b, 0), text_of(&c, 0)],
        [alone[0].clone(), alone[1].clone(), alone[2].clone()]
    );

    // The adapter cache counted one load per adapter and hits after that.
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("tuneshop_adapter_cache_misses_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tuneshop_adapter_cache_adapters 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tuneshop_time_to_first_token_seconds_count"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn streaming_n_stop_max_tokens_seed_echo_and_logprobs_behave() {
    let mut app = TestApp::sqlite().await;
    let key = app.key.clone();
    let (_, models) = app.get(&key, "/v1/models").await;
    let base = models["data"][0]["id"].as_str().unwrap().to_string();

    // Streamed text, concatenated, is the whole text; then a usage chunk and [DONE].
    let body = json!({"model": base, "prompt": PROMPT, "max_tokens": 30, "temperature": 0});
    let whole = complete(&app, &key, body.clone()).await;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = stream_events(&app, &key, "/v1/completions", &streamed).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, text_of(&whole, 0));
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage, &whole["usage"]);
    let reasons: Vec<&str> = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .filter_map(|c| c["finish_reason"].as_str())
        .collect();
    assert_eq!(
        reasons,
        [whole["choices"][0]["finish_reason"].as_str().unwrap()]
    );

    // Chat: streamed deltas add up to the message.
    let chat = json!({"model": base, "messages": [{"role": "user", "content": "what is the capital of france?"}], "max_tokens": 20, "temperature": 0});
    let (status, whole_chat) = app.post(&key, "/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{whole_chat}");
    assert_eq!(whole_chat["choices"][0]["message"]["role"], "assistant");
    let mut s = chat.clone();
    s["stream"] = json!(true);
    let events = stream_events(&app, &key, "/v1/chat/completions", &s).await;
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole_chat["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
    );

    // max_tokens ends with `length` and exactly that many tokens.
    let out = complete(
        &app,
        &key,
        json!({"model": base, "prompt": PROMPT, "max_tokens": 7, "ignore_eos": true}),
    )
    .await;
    assert_eq!(out["choices"][0]["finish_reason"], "length");
    assert_eq!(out["usage"]["completion_tokens"], 7);

    // A stop string cuts the text before it.
    let long = complete(&app, &key, json!({"model": base, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": true})).await;
    let long_text = text_of(&long, 0);
    let cut = long_text.char_indices().nth(8).map(|(i, _)| i).unwrap();
    let stop: String = long_text[cut..].chars().take(3).collect();
    let out = complete(&app, &key, json!({"model": base, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stop": [stop.clone()]})).await;
    let before = &long_text[..long_text.find(&stop).unwrap()];
    assert_eq!(
        (
            text_of(&out, 0).as_str(),
            out["choices"][0]["finish_reason"].as_str()
        ),
        (before, Some("stop"))
    );

    // n choices with a seed: reproducible, and not all the same.
    let sampled = json!({"model": base, "prompt": [PROMPT, "a lazy dog"], "max_tokens": 12, "temperature": 2.0, "n": 3, "seed": 7});
    let one = complete(&app, &key, sampled.clone()).await;
    let two = complete(&app, &key, sampled).await;
    assert_eq!(one["choices"].as_array().unwrap().len(), 6);
    let texts = |v: &Value| (0..6).map(|i| text_of(v, i)).collect::<Vec<_>>();
    assert_eq!(texts(&one), texts(&two));
    let indices: Vec<u64> = one["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2, 3, 4, 5]);

    // echo puts the prompt first; logprobs cover every generated token.
    let out = complete(
        &app,
        &key,
        json!({"model": base, "prompt": PROMPT, "max_tokens": 5, "echo": true, "temperature": 0}),
    )
    .await;
    assert!(text_of(&out, 0).starts_with(PROMPT));
    let out = complete(&app, &key, json!({"model": base, "prompt": PROMPT, "max_tokens": 5, "logprobs": 3, "temperature": 0, "ignore_eos": true})).await;
    let lp = &out["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        // Keyed by token text, as OpenAI's are: tokens that decode alike share a key.
        let top = top.as_object().unwrap();
        assert!((1..=3).contains(&top.len()), "{lp}");
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            chosen <= 0.0 && (chosen - best).abs() < 1e-4,
            "greedy picks the most likely: {lp}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn bad_requests_other_tenants_and_overload_get_clear_errors() {
    let mut app = TestApp::sqlite().await;
    let key = app.key.clone();
    let dirs = app.data.path().join("adapters");
    import_random(&app, &key, &dirs, "mine", 3, &[Proj::Q, Proj::V]).await;
    let (_, models) = app.get(&key, "/v1/models").await;
    let base = models["data"][0]["id"].as_str().unwrap().to_string();
    let other = app.tenant("other").await;

    let check = |status: u16, body: &Value, want_status: u16, code: &str| {
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (want_status, Some(code)),
            "{body}"
        );
        assert!(body["error"]["type"].is_string(), "{body}");
    };
    // Another tenant's adapter, an unknown model: 404.
    let (s, b) = app
        .post(
            &other,
            "/v1/completions",
            &json!({"model": "mine", "prompt": "hi"}),
        )
        .await;
    check(s, &b, 404, "model_not_found");
    let (s, b) = app
        .post(
            &key,
            "/v1/completions",
            &json!({"model": "nope", "prompt": "hi"}),
        )
        .await;
    check(s, &b, 404, "model_not_found");
    let (_, theirs) = app.get(&other, "/v1/models").await;
    assert_eq!(theirs["data"].as_array().unwrap().len(), 1, "{theirs}");
    // No key: 401.
    let (s, b) = app
        .send(
            app.http
                .post(app.url("/v1/completions"))
                .json(&json!({"model": base, "prompt": "hi"})),
        )
        .await;
    check(s, &b, 401, "missing_api_key");
    // Bad fields: 422 naming them; too long: 400 with the token counts.
    for (body, param) in [
        (
            json!({"model": base, "prompt": "hi", "temperature": 5}),
            "temperature",
        ),
        (json!({"model": base, "prompt": "hi", "n": 0}), "n"),
        (
            json!({"model": base, "prompt": "hi", "max_tokens": 0}),
            "max_tokens",
        ),
        (json!({"model": base, "prompt": ""}), "prompt"),
        (
            json!({"model": base, "prompt": "hi", "presence_penalty": 1}),
            "presence_penalty",
        ),
        (
            json!({"model": base, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}),
            "stop",
        ),
        (json!({"model": base, "prompt": [99999]}), "prompt"),
        (json!({"model": base, "prompt": 5}), "prompt"),
    ] {
        let (s, b) = app.post(&key, "/v1/completions", &body).await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (422, Some(param)),
            "{body} -> {b}"
        );
    }
    let (s, b) = app
        .post(
            &key,
            "/v1/completions",
            &json!({"model": base, "prompt": "hi", "max_tokens": 100_000}),
        )
        .await;
    check(s, &b, 400, "context_length_exceeded");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("100000"),
        "{b}"
    );
    let (s, b) = app
        .post(
            &key,
            "/v1/chat/completions",
            &json!({"model": base, "messages": []}),
        )
        .await;
    assert_eq!(
        (s, b["error"]["param"].as_str()),
        (422, Some("messages")),
        "{b}"
    );

    app.stop().await;
}

#[tokio::test]
async fn deleting_an_adapter_does_not_break_a_stream_that_uses_it() {
    let mut app = TestApp::sqlite().await;
    let key = app.key.clone();
    let dirs = app.data.path().join("adapters");
    import_random(&app, &key, &dirs, "doomed", 4, &[Proj::Q, Proj::V]).await;
    let body = json!({"model": "doomed", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": true});
    let whole = complete(&app, &key, body.clone()).await;

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = app
        .http
        .post(app.url("/v1/completions"))
        .bearer_auth(&key)
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut raw = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    let (status, _) = app.delete(&key, "/adapters/doomed").await;
    assert_eq!(status, 200);
    while let Some(chunk) = stream.next().await {
        raw.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .flat_map(|c| c["choices"].as_array().unwrap().clone())
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, text_of(&whole, 0));
    // New requests no longer find it.
    let (status, b) = app.post(&key, "/v1/completions", &body).await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    app.stop().await;
}

#[tokio::test]
async fn completions_are_served_while_a_job_trains_and_overload_is_a_429() {
    // Inference gets one batch step per piece of training work, and one request at a time.
    let mut app = TestApp::spawn(
        |s| {
            s.inference_share = 0.0;
            s.max_pending_requests = 1;
        },
        false,
    )
    .await;
    let key = app.key.clone();
    let (_, models) = app.get(&key, "/v1/models").await;
    let base = models["data"][0]["id"].as_str().unwrap().to_string();
    // Long rows in big batches: each piece of training work takes a while.
    let long_rows: Vec<Value> = (0..32)
        .map(|i| {
            let completion: String = (0..80).map(|k| format!(" {}", (i + k) % 10)).collect();
            json!({"prompt": format!("count from {i}"), "completion": completion})
        })
        .collect();
    let data = app.upload(&key, &long_rows).await;
    let long = json!({
        "training_dataset": data,
        "hyperparameters": { "n_epochs": 100, "batch_size": 4, "max_seq_len": 256 }
    });
    let job = app.create_job(&key, &long).await;
    let id = job["id"].as_str().unwrap();
    app.wait_job(&key, id, |j| j["status"] == "running").await;

    // A stream in progress while the job trains...
    let body = json!({"model": base, "prompt": PROMPT, "max_tokens": 40, "ignore_eos": true, "stream": true});
    let resp = app
        .http
        .post(app.url("/v1/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut raw = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    // ...fills the server: the next request is refused at once.
    let (s, b) = app
        .post(
            &key,
            "/v1/completions",
            &json!({"model": base, "prompt": "hi"}),
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (429, Some("overloaded")),
        "{b}"
    );
    while let Some(chunk) = stream.next().await {
        raw.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(raw.trim_end().ends_with("data: [DONE]"), "{raw}");
    assert_eq!(app.job(&key, id).await["status"], "running");
    let out = complete(
        &app,
        &key,
        json!({"model": base, "prompt": PROMPT, "max_tokens": 16, "ignore_eos": true}),
    )
    .await;
    assert_eq!(out["usage"]["completion_tokens"], 16);
    assert_eq!(app.job(&key, id).await["status"], "running");
    let (status, _) = app
        .post(&key, &format!("/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 200);

    // A job that succeeds is usable by its suffix at once.
    let data = app.upload(&key, &rows(4)).await;
    let mut quick = quick_job(&data);
    quick["suffix"] = json!("fresh");
    let job = app.create_job(&key, &quick).await;
    let done = app.wait_finished(&key, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let out = complete(
        &app,
        &key,
        json!({"model": "fresh", "prompt": PROMPT, "max_tokens": 8}),
    )
    .await;
    assert_eq!(out["model"], "fresh");
    app.stop().await;
}
