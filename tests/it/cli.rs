//! Bad input to the CLI: a clear message and a non-zero exit, never a panic.

use crate::helpers::{tiny, tuneshop};
use std::path::Path;
use tuneshop::model::gguf::{GgufWriter, MetaValue};

fn fails_with(args: &[&str], needle: &str) {
    let out = tuneshop(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: expected {needle:?} in {stderr}"
    );
}

fn generate_with(model: &Path, prompt: &str) -> Vec<String> {
    [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn missing_truncated_and_corrupt_models_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    fails_with(&args(&generate_with(&missing, "hi")), "not found");

    let bytes = std::fs::read(&tiny().gguf_quantized).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    fails_with(&args(&generate_with(&cut, "hi")), "truncated");

    let garbage = dir.path().join("garbage.gguf");
    let mut evil = b"GGUF".to_vec();
    evil.extend_from_slice(&3u32.to_le_bytes());
    evil.extend_from_slice(&[0xff; 64]);
    std::fs::write(&garbage, evil).unwrap();
    fails_with(&args(&generate_with(&garbage, "hi")), "corrupt");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "just text").unwrap();
    fails_with(&args(&generate_with(&text, "hi")), "neither a .gguf file");
}

#[test]
fn other_architectures_are_rejected_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt2.gguf");
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("gpt2".into()));
    w.write(&path).unwrap();
    fails_with(
        &args(&generate_with(&path, "hi")),
        "architecture `gpt2` is not supported",
    );

    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    let config = std::fs::read_to_string(tiny().hf_dir.join("config.json")).unwrap();
    std::fs::write(
        hf.join("config.json"),
        config.replace("\"llama\"", "\"falcon\""),
    )
    .unwrap();
    fails_with(
        &args(&generate_with(&hf, "hi")),
        "architecture `falcon` is not supported",
    );
}

#[test]
fn empty_and_too_long_prompts_are_clear_errors() {
    let model = &tiny().gguf_quantized;
    fails_with(&args(&generate_with(model, "")), "empty");
    let long = "the quick brown fox ".repeat(200);
    fails_with(&args(&generate_with(model, &long)), "context");
    let mut bad = generate_with(model, "hi");
    bad.extend(["--temperature".to_string(), "5".to_string()]);
    fails_with(&args(&bad), "temperature");
}

#[test]
fn generate_prints_a_completion() {
    let model = &tiny().gguf_quantized;
    let mut a = generate_with(model, "the capital");
    a.extend(["--max-tokens".to_string(), "8".to_string()]);
    let out = tuneshop(&args(&a));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());
}

#[test]
fn fetching_the_default_model_without_pip_says_what_to_do() {
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tuneshop"))
        .args(["generate", "--prompt", "hi", "--data-dir"])
        .arg(data.path())
        .env("PATH", data.path())
        .env_remove("TUNESHOP_BASE_MODEL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("pip") && stderr.contains("--model"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Nothing half-downloaded is left where the model belongs.
    assert!(!tuneshop::model::default_model::default_model_path(data.path()).exists());
}
