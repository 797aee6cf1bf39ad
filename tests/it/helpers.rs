//! Shared fixtures: the tiny generated model, the real default model, the CLI binary.

use candle_core::Tensor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use tuneshop::model::default_model::{self, DEFAULT_MODEL};
use tuneshop::model::tiny::TinyModel;
use tuneshop::model::{self, BaseModel, LoadOptions};

/// The tiny random model, written once per test run.
pub fn tiny() -> &'static TinyModel {
    static TINY: OnceLock<TinyModel> = OnceLock::new();
    TINY.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir").keep();
        model::tiny::write(&dir, 42).expect("write the tiny model")
    })
}

pub fn load(path: &Path) -> BaseModel {
    model::load(path, &LoadOptions::default()).expect("load model")
}

pub fn load_dequantized(path: &Path) -> BaseModel {
    let opts = LoadOptions {
        dequantize: true,
        ..LoadOptions::default()
    };
    model::load(path, &opts).expect("load model")
}

/// The default model, fetched (once) into the test data directory like `serve` would.
pub fn real_model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let data = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tuneshop-data");
        default_model::resolve(DEFAULT_MODEL, &data).expect("fetch the default model")
    })
    .clone()
}

pub fn real_model() -> &'static BaseModel {
    static MODEL: OnceLock<BaseModel> = OnceLock::new();
    MODEL.get_or_init(|| load(&real_model_path()))
}

/// Runs the `tuneshop` binary.
pub fn tuneshop(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tuneshop"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tuneshop")
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits `[len, vocab]` of every position of one sequence, in one forward pass.
pub fn full_logits(m: &BaseModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let input = Tensor::from_vec(
        tokens.to_vec(),
        (1, tokens.len()),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let logits = m.llama.forward(&input, &tuneshop::model::NoLora).unwrap();
    logits.squeeze(0).unwrap().to_vec2().unwrap()
}

/// A directory with the PyPI package `spec` (`name==version`), installed with pip on first use;
/// `ready` says whether a directory already holds it.
pub fn pip_package(spec: &str, ready: impl Fn(&Path) -> bool) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("py-{}", spec.replace("==", "-")));
    if !ready(&dir) {
        let out = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&dir)
            .arg(spec)
            .output()
            .expect("run pip");
        assert!(
            out.status.success(),
            "pip could not install {spec}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(ready(&dir), "{spec} installed but not usable");
    }
    dir
}

/// Whether python3 can import `modules` from `dir`.
pub fn importable(dir: &Path, modules: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .env("PYTHONPATH", dir)
        .status()
        .is_ok_and(|s| s.success())
}
