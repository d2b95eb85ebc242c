//! Checks of what `deploy/` installs, shared by the tests under `tests/`:
//!
//! - [`objects`]: a rendered install (the source files, `kubectl kustomize`, `helm template`) read
//!   as typed Kubernetes objects with no key lost;
//! - [`checks`]: what must hold of every rendering (the DaemonSet, RBAC and iamlinkd's config
//!   agree with each other and with iamlinkd);
//! - [`tools`]: the helm and kubectl clients `scripts/setup` installs, and the renderings they make;
//! - [`elf`]: the few ELF facts that say whether the plugin binary runs on any node's libc.

pub mod checks;
pub mod daemon;
pub mod elf;
pub mod objects;
pub mod tools;

use std::path::{Path, PathBuf};

/// The repository's root (this crate is `deploy/check`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// `deploy/` in the repository.
pub fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

/// Cargo's target directory, found from the running test binary (`<target>/<profile>/deps/<test>`)
/// so that `CARGO_TARGET_DIR` and `--target-dir` are honoured.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.ancestors().nth(3).expect("<target>/<profile>/deps/<test binary>").to_path_buf()
}
