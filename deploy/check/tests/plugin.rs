//! The plugin binary the DaemonSet copies onto nodes (`scripts/build-static-plugin`, run by
//! `scripts/setup`): the container runtime runs it on the node, against whatever libc the node
//! has, so it must need none. No interpreter, no shared library, no NSS function; and it runs
//! from an empty root filesystem, answering VERSION and refusing bad input with CNI error JSON.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use iamlink_deploy_check::elf;
use iamlink_deploy_check::target_dir;
use serde_json::Value;

/// glibc functions that go through NSS: in a static binary they load libnss_*.so modules of the
/// node's glibc at run time, which may be missing or of another version.
const NSS_FUNCTIONS: &[&str] = &[
    "getaddrinfo",
    "gethostbyname",
    "gethostbyname2",
    "gethostbyname_r",
    "gethostbyname2_r",
    "gethostbyaddr",
    "gethostbyaddr_r",
    "getnameinfo",
    "getpwnam",
    "getpwnam_r",
    "getpwuid",
    "getpwuid_r",
    "getpwent",
    "getgrnam",
    "getgrnam_r",
    "getgrgid",
    "getgrgid_r",
    "getgrouplist",
    "initgroups",
    "getservbyname",
    "getservbyname_r",
    "getservbyport",
    "getprotobyname",
    "getspnam",
];

/// The static plugin, built by scripts/build-static-plugin.
fn static_plugin() -> PathBuf {
    let path = target_dir().join("x86_64-unknown-linux-gnu/release/iamlink");
    assert!(
        path.is_file(),
        "{} is missing: run `bash scripts/setup` (or `bash scripts/build-static-plugin`)",
        path.display()
    );
    path
}

fn facts(path: &Path) -> elf::Facts {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    elf::read(&data).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_plugin_for_nodes_has_no_interpreter_and_needs_no_shared_library() {
    let plugin = static_plugin();
    let f = facts(&plugin);
    assert_eq!(f.interpreter, None, "{}: a dynamic loader is named", plugin.display());
    assert!(f.needed.is_empty(), "{}: needs shared libraries {:?}", plugin.display(), f.needed);
}

#[test]
fn the_elf_reader_sees_a_dynamic_binary_for_what_it_is() {
    // This test binary is linked the ordinary way: the reader must find its loader and libc.
    let f = facts(&std::env::current_exe().unwrap());
    assert!(f.interpreter.as_deref().is_some_and(|i| i.contains("ld-linux")), "{:?}", f.interpreter);
    assert!(f.needed.iter().any(|n| n.starts_with("libc.so")), "{:?}", f.needed);
    assert!(f.defined.iter().any(|s| s == "main"), "the symbol table is read");
}

#[test]
fn the_plugin_for_nodes_calls_no_nss_function() {
    let plugin = static_plugin();
    let f = facts(&plugin);
    // The linker keeps only what is reachable: a function in the symbol table may be called.
    assert!(f.has_symtab, "{}: stripped, so this cannot be checked; keep the symbol table", plugin.display());
    assert!(f.defined.iter().any(|s| s == "malloc"), "glibc is linked in, with its symbols");
    let called: Vec<&String> = f.defined.iter().filter(|s| NSS_FUNCTIONS.contains(&s.as_str())).collect();
    assert!(called.is_empty(), "{}: NSS functions linked in: {called:?}", plugin.display());
}

/// Runs `binary` as `/plugin` in an otherwise empty root directory (chroot: no loader, no libc,
/// no /etc, no /proc) and a network namespace of its own (so nothing it might do reaches the
/// node's network), with only `vars` in its environment and `stdin` on its standard input.
fn run_in_empty_root(binary: &Path, vars: &[(&str, &str)], stdin: &str) -> Output {
    let root = tempfile::Builder::new().prefix("empty-root-").tempdir_in(target_dir()).expect("a scratch directory");
    std::fs::copy(binary, root.path().join("plugin")).expect("copy the binary into the empty root");
    let mut child = Command::new("unshare")
        .args(["--net", "chroot"])
        .arg(root.path())
        .arg("/plugin")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare and chroot (util-linux, coreutils; as root)");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).expect("write stdin");
    let output = child.wait_with_output().expect("wait");
    let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["plugin"], "the plugin created files in the empty root");
    output
}

fn json(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("stdout is not one JSON object ({e}): {stdout:?}; stderr: {}", String::from_utf8_lossy(&output.stderr))
    })
}

#[test]
fn the_plugin_answers_version_from_an_empty_root() {
    let output = run_in_empty_root(&static_plugin(), &[("CNI_COMMAND", "VERSION")], "");
    assert!(output.status.success(), "{output:?}");
    let answer = json(&output);
    let supported: Vec<&str> =
        answer["supportedVersions"].as_array().expect("supportedVersions").iter().filter_map(Value::as_str).collect();
    for version in ["0.3.1", "0.4.0", "1.0.0"] {
        assert!(supported.contains(&version), "{version} (Calico, aws-vpc-cni, containerd): {answer}");
    }
    assert!(answer["cniVersion"].as_str().is_some_and(|v| supported.contains(&v)), "{answer}");
}

#[test]
fn a_dynamically_linked_plugin_would_not_start_there() {
    // What the empty root proves: this ordinary binary cannot even be started in it.
    let output = run_in_empty_root(&std::env::current_exe().unwrap(), &[("CNI_COMMAND", "VERSION")], "");
    assert_eq!(output.status.code(), Some(127), "exec fails without the loader: {output:?}");
}

#[test]
fn the_plugin_refuses_bad_input_with_cni_error_json_from_an_empty_root() {
    // Not JSON at all: decoding failure (code 6), in the newest version it speaks.
    let output = run_in_empty_root(&static_plugin(), &[("CNI_COMMAND", "ADD")], "not json");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let error = json(&output);
    assert_eq!(error["code"], 6, "{error}");
    assert!(error["msg"].as_str().is_some_and(|m| !m.is_empty()), "{error}");

    // A config without the runtime's variables: invalid environment (code 4), answered in the
    // caller's cniVersion; this goes past config parsing, logging and the async runtime's start.
    let conf = r#"{"cniVersion":"0.4.0","name":"k8s-pod-network","type":"iamlink"}"#;
    let output = run_in_empty_root(&static_plugin(), &[("CNI_COMMAND", "ADD")], conf);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let error = json(&output);
    assert_eq!((error["cniVersion"].as_str(), error["code"].as_u64()), (Some("0.4.0"), Some(4)), "{error}");
    assert!(error["msg"].as_str().is_some_and(|m| m.contains("CNI_CONTAINERID")), "{error}");
}
