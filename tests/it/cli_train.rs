//! The training CLI end to end on the tiny model: train, apply the adapter in `generate` and
//! `eval`, merge it into a dense model, resume, and reject bad input by name.

use crate::helpers::{tiny, tuneshop};
use std::path::Path;

const PROMPT: &str = "hello world";
const ANSWER: &str = " the capital of france is paris.";

fn run_ok(args: &[&str]) -> (String, String) {
    let out = tuneshop(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?} failed:\n{stderr}");
    (stdout, stderr)
}

fn write_data(dir: &Path) -> String {
    let path = dir.join("train.jsonl");
    let row = serde_json::json!({ "prompt": PROMPT, "completion": ANSWER });
    std::fs::write(&path, format!("{row}\n")).unwrap();
    path.to_str().unwrap().to_string()
}

fn train_args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out,
        "--epochs",
        "40",
        "--learning-rate",
        "3e-2",
        "--batch-size",
        "1",
        "--target-modules",
        "all-linear",
        "--lora-dropout",
        "0",
        "--checkpoint-every",
        "10",
        "--seed",
        "3",
    ]
}

fn generate(model: &str, adapter: Option<&str>) -> String {
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        PROMPT,
        "--max-tokens",
        "12",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a]);
    }
    run_ok(&args).0
}

fn eval_loss(model: &str, data: &str, adapter: Option<&str>) -> f64 {
    let mut args = vec!["eval", "--model", model, "--data", data];
    if let Some(a) = adapter {
        args.extend(["--adapter", a]);
    }
    let report: serde_json::Value = serde_json::from_str(run_ok(&args).0.trim()).unwrap();
    report["loss"].as_f64().unwrap()
}

#[test]
fn train_then_generate_eval_and_merge_with_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny().gguf_quantized.to_str().unwrap().to_string();
    let data = write_data(dir.path());
    let out = dir.path().join("adapter");
    let out_s = out.to_str().unwrap();

    let (_, stderr) = run_ok(&train_args(&model, &data, out_s));
    assert!(
        stderr.contains("step 40/40"),
        "progress is reported: {stderr}"
    );
    assert!(
        stderr.contains("tok/s") && stderr.contains("ETA"),
        "{stderr}"
    );
    assert!(out.join("adapter_config.json").is_file());
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(out.join("checkpoints/checkpoint-40").is_dir());

    let base_text = generate(&model, None);
    let tuned_text = generate(&model, Some(out_s));
    assert!(
        tuned_text.starts_with(ANSWER),
        "the adapter reproduces the memorized answer, got {tuned_text:?} (base: {base_text:?})"
    );
    assert!(
        !base_text.starts_with(ANSWER),
        "the base model alone does not: {base_text:?}"
    );

    let before = eval_loss(&model, &data, None);
    let after = eval_loss(&model, &data, Some(out_s));
    assert!(after < before / 4.0, "eval loss {before} -> {after}");

    let merged = dir.path().join("merged");
    run_ok(&[
        "merge",
        "--model",
        &model,
        "--adapter",
        out_s,
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(merged.join("config.json").is_file() && merged.join("tokenizer.json").is_file());
    let merged_text = generate(merged.to_str().unwrap(), None);
    assert!(
        merged_text.starts_with(ANSWER),
        "the merged model answers too: {merged_text:?}"
    );
}

#[test]
fn resume_continues_from_the_latest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny().gguf_quantized.to_str().unwrap().to_string();
    let data = write_data(dir.path());
    let full = dir.path().join("full");
    run_ok(&train_args(&model, &data, full.to_str().unwrap()));

    // A second run whose last checkpoints are removed, as if it died after step 20.
    let cut = dir.path().join("cut");
    run_ok(&train_args(&model, &data, cut.to_str().unwrap()));
    for step in [30, 40] {
        std::fs::remove_dir_all(cut.join(format!("checkpoints/checkpoint-{step}"))).unwrap();
    }
    std::fs::remove_file(cut.join("adapter_model.safetensors")).unwrap();
    let mut args = train_args(&model, &data, cut.to_str().unwrap());
    args.push("--resume");
    let (_, stderr) = run_ok(&args);
    assert!(
        stderr.contains("resuming from") && stderr.contains("(step 20)"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(full.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(cut.join("adapter_model.safetensors")).unwrap(),
        "a resumed run ends with the same adapter bytes as an uninterrupted one"
    );
}

#[test]
fn bad_training_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny().gguf_quantized.to_str().unwrap().to_string();
    let data = write_data(dir.path());
    let out = dir.path().join("out");
    let out_s = out.to_str().unwrap();
    let fails = |args: &[&str], needle: &str| {
        let o = tuneshop(args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in {stderr}"
        );
    };
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\"}\n",
    )
    .unwrap();
    fails(
        &[
            "train",
            "--model",
            &model,
            "--data",
            bad.to_str().unwrap(),
            "--out",
            out_s,
        ],
        "line 2",
    );
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    fails(
        &[
            "train",
            "--model",
            &model,
            "--data",
            empty.to_str().unwrap(),
            "--out",
            out_s,
        ],
        "empty",
    );
    fails(
        &[
            "train",
            "--model",
            &model,
            "--data",
            &data,
            "--out",
            out_s,
            "--target-modules",
            "q_proj,mlp",
        ],
        "mlp",
    );
    fails(
        &[
            "train", "--model", &model, "--data", &data, "--out", out_s, "--lora-r", "0",
        ],
        "lora_r",
    );
    fails(
        &[
            "generate",
            "--model",
            &model,
            "--prompt",
            "hi",
            "--adapter",
            dir.path().to_str().unwrap(),
        ],
        "adapter_config.json",
    );
}
