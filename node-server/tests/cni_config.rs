//! Chaining iamlink into the node's CNI config, against temp directories that hold what
//! aws-vpc-cni, Calico and a single-plugin `.conf` write (tests/fixtures/cni). No root, no network.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

use iamlinkd::config::Config;
use iamlinkd::install::cni_config::{chained_network, keep_chained, wait_for_config, CniConfigError, Installer};

/// A node's CNI directories and an iamlinkd config pointing at them.
struct Node {
    dir: TempDir,
    conf: PathBuf,
    bin: PathBuf,
    plugin: PathBuf,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (conf, bin) = (dir.path().join("net.d"), dir.path().join("bin"));
        fs::create_dir(&conf).unwrap();
        fs::create_dir(&bin).unwrap();
        let plugin = dir.path().join("iamlink-build");
        fs::write(&plugin, b"#!/bin/sh\necho iamlink v1\n").unwrap();
        fs::set_permissions(&plugin, fs::Permissions::from_mode(0o644)).unwrap();
        let node = Node { dir, conf, bin, plugin };
        fs::write(node.config_path(), node.config_text()).unwrap();
        node
    }

    fn config_text(&self) -> String {
        format!(
            "listen = \"198.18.0.1:8181\"\nlisten6 = \"[fd00:198:18::1]:8181\"\n\
             [cni]\nconf_dir = {:?}\nbin_dir = {:?}\nplugin_path = {:?}\nlog_file = \"/var/log/iamlink/cni.log\"\n",
            self.conf, self.bin, self.plugin
        )
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("iamlinkd.toml")
    }

    fn config(&self) -> Config {
        Config::parse(&self.config_text()).unwrap()
    }

    fn installer(&self) -> Installer {
        Installer::new(&self.config(), false).unwrap()
    }

    /// The installer with its binary in place, as install-cni leaves it.
    fn installed(&self) -> Installer {
        let installer = self.installer();
        installer.install_binary().unwrap();
        installer
    }

    fn put(&self, fixture: &str, as_name: &str) -> PathBuf {
        let path = self.conf.join(as_name);
        fs::write(&path, fixture_text(fixture)).unwrap();
        path
    }

    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(&self.conf).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }
}

fn fixture_text(name: &str) -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cni").join(name)).unwrap()
}

fn fixture(name: &str) -> Value {
    serde_json::from_str(&fixture_text(name)).unwrap()
}

fn read(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// What iamlinkd's config above must turn into.
fn entry() -> Value {
    json!({
        "type": "iamlink",
        "daemonAddress": "198.18.0.1:8181",
        "daemonAddress6": "[fd00:198:18::1]:8181",
        "storeDir": "/run/iamlink",
        "markMask": "0x307f",
        "credentialsAddress": "169.254.170.23",
        "logFile": "/var/log/iamlink/cni.log",
        "capabilities": { "io.kubernetes.cri.pod-annotations": true }
    })
}

/// Equal as JSON and in key order: serde_json keeps insertion order in this crate.
fn assert_same_text(a: &Value, b: &Value) {
    assert_eq!(serde_json::to_string(a).unwrap(), serde_json::to_string(b).unwrap());
}

fn plugins(v: &Value) -> &Vec<Value> {
    v["plugins"].as_array().unwrap()
}

/// Object keys in the order the text spells them (the fixtures have no escaped quotes), so that
/// key order is checked on the file itself, not through a map type.
fn keys_in_text_order(text: &str) -> Vec<&str> {
    let pieces: Vec<&str> = text.split('"').collect();
    (1..pieces.len())
        .step_by(2)
        .filter(|&i| pieces.get(i + 1).is_some_and(|p| p.trim_start().starts_with(':')))
        .map(|i| pieces[i])
        .collect()
}

/// The file holds the fixture with exactly the iamlink entry appended; every other plugin, their
/// order, the list's keys and the order of all keys are kept.
fn assert_appended(path: &Path, fixture_name: &str) {
    let (text, original) = (fs::read_to_string(path).unwrap(), fixture(fixture_name));
    let result: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(plugins(&result).len(), plugins(&original).len() + 1);
    assert_eq!(plugins(&result)[..plugins(&original).len()], plugins(&original)[..]);
    assert_eq!(plugins(&result).last(), Some(&entry()));
    let mut without = result.clone();
    without["plugins"].as_array_mut().unwrap().pop();
    assert_eq!(without, original);
    let (fixture_text, entry) = (fixture_text(fixture_name), serde_json::to_string(&entry()).unwrap());
    let mut keys = keys_in_text_order(&fixture_text);
    keys.extend(keys_in_text_order(&entry));
    assert_eq!(keys_in_text_order(&text), keys);
}

fn stamp(path: &Path) -> (u64, i64, i64, Vec<u8>) {
    let m = fs::metadata(path).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec(), fs::read(path).unwrap())
}

#[test]
fn iamlink_goes_last_into_aws_and_calico_conflists_and_nothing_else_changes() {
    for name in ["10-aws.conflist", "10-calico.conflist"] {
        let node = Node::new();
        let path = node.put(name, name);
        assert_eq!(node.installed().chain().unwrap(), Some(path.clone()));
        assert_appended(&path, name);
        assert_eq!(read(&path)["cniVersion"], fixture(name)["cniVersion"]);
        assert_eq!(node.entries(), vec![name.to_string()], "no temp file left behind");
    }
    let node = Node::new();
    let path = node.put("10-aws.conflist", "10-aws.conflist");
    node.installed().chain().unwrap();
    let aws = read(&path);
    assert_eq!((aws["cniVersion"].as_str(), aws["disableCheck"].as_bool()), (Some("0.4.0"), Some(true)));
    assert_eq!(aws["plugins"][1]["ipam"]["dataDir"], "/run/cni/v4pd/egress-v6-ipam");
}

/// Adoption reads only the attachments of the network whose DEL goes through iamlink.
#[test]
fn the_chained_network_is_the_first_files_and_only_once_iamlink_is_in_it() {
    let node = Node::new();
    assert!(matches!(chained_network(&node.conf), Err(CniConfigError::NoConfig(_))));
    let path = node.put("10-aws.conflist", "10-aws.conflist");
    assert_eq!(chained_network(&node.conf).unwrap(), None, "not chained yet");
    node.installed().chain().unwrap();
    assert_eq!(chained_network(&node.conf).unwrap().as_deref(), read(&path)["name"].as_str());
}

#[test]
fn a_second_install_writes_nothing() {
    let node = Node::new();
    let path = node.put("10-calico.conflist", "10-calico.conflist");
    let installer = node.installed();
    installer.chain().unwrap();
    let before = stamp(&path);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(installer.chain().unwrap(), None);
    assert_eq!(stamp(&path), before);
}

#[test]
fn iamlink_returns_after_the_primary_rewrites_its_file() {
    let node = Node::new();
    let path = node.put("10-aws.conflist", "10-aws.conflist");
    let installer = node.installed();
    installer.chain().unwrap();
    node.put("10-aws.conflist", "10-aws.conflist.tmp");
    fs::rename(node.conf.join("10-aws.conflist.tmp"), &path).unwrap();
    assert_eq!(read(&path), fixture("10-aws.conflist"));
    assert_eq!(installer.chain().unwrap(), Some(path.clone()));
    assert_appended(&path, "10-aws.conflist");
}

#[test]
fn an_outdated_entry_is_updated_where_it_stands_and_duplicates_go() {
    let node = Node::new();
    let mut list = fixture("10-calico.conflist");
    let old = json!({"type": "iamlink", "daemonAddress": "10.0.0.9:8181", "capabilities": {"x": true}, "x": 1});
    list["plugins"].as_array_mut().unwrap().insert(1, old);
    list["plugins"].as_array_mut().unwrap().push(json!({"type": "iamlink"}));
    let path = node.conf.join("10-calico.conflist");
    fs::write(&path, serde_json::to_vec(&list).unwrap()).unwrap();
    node.installed().chain().unwrap();
    let result = read(&path);
    assert_eq!(plugins(&result).len(), 4);
    let ours = &result["plugins"][1];
    assert_eq!(ours["daemonAddress"], "198.18.0.1:8181");
    assert_eq!(ours["x"], 1, "keys iamlinkd does not manage are kept");
    let mut managed = ours.clone();
    managed.as_object_mut().unwrap().remove("x");
    assert_eq!(managed, entry());
    assert_eq!(result["plugins"][3]["type"], "portmap");
}

#[test]
fn the_first_config_file_in_lexical_order_is_the_one_changed() {
    let node = Node::new();
    let aws = node.put("10-aws.conflist", "10-aws.conflist");
    let other = node.put("10-calico.conflist", "05-other.conflist");
    // Not config files for libcni: other extensions, a directory, a temp file.
    fs::write(node.conf.join("00-notes.txt"), "{").unwrap();
    fs::write(node.conf.join("calico-kubeconfig"), "apiVersion: v1").unwrap();
    fs::create_dir(node.conf.join("01-dir.conf")).unwrap();
    node.put("10-aws.conflist", "02-aws.conflist.tmp");
    let aws_before = stamp(&aws);
    assert_eq!(node.installed().chain().unwrap(), Some(other.clone()));
    assert_appended(&other, "10-calico.conflist");
    assert_eq!(stamp(&aws), aws_before);
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist_in_its_place() {
    let node = Node::new();
    node.put("10-ptp.conf", "10-ptp.conf");
    node.put("10-aws.conflist", "20-aws.conflist");
    let installer = node.installed();
    let converted = node.conf.join("10-ptp.conflist");
    assert_eq!(installer.chain().unwrap(), Some(converted.clone()));
    assert_eq!(node.entries(), vec!["10-ptp.conflist", "20-aws.conflist"]);
    let mut ptp = fixture("10-ptp.conf");
    let ptp_plugin = {
        let o = ptp.as_object_mut().unwrap();
        o.shift_remove("cniVersion");
        o.shift_remove("name");
        ptp.clone()
    };
    let expected = json!({"cniVersion": "1.0.0", "name": "podnet", "plugins": [ptp_plugin, entry()]});
    assert_same_text(&read(&converted), &expected);
    let keys = keys_in_text_order(&fs::read_to_string(&converted).unwrap()).join(",");
    assert!(keys.starts_with("cniVersion,name,plugins,type,ipMasq,mtu,ipam,type,ranges,subnet"), "{keys}");
    assert_eq!(installer.chain().unwrap(), None);

    // The .conf's primary rewrites it: the .conf shadows our conflist, which is replaced.
    node.put("10-ptp.conf", "10-ptp.conf");
    assert_eq!(installer.chain().unwrap(), Some(converted.clone()));
    assert_eq!(node.entries(), vec!["10-ptp.conflist", "20-aws.conflist"]);
    assert_same_text(&read(&converted), &expected);
}

#[test]
fn a_conversion_that_would_lose_first_place_is_refused() {
    let node = Node::new();
    let conf = node.put("10-ptp.conf", "10-ptp.conf");
    node.put("10-aws.conflist", "10-ptp.conf.json");
    let e = node.installed().chain().unwrap_err().to_string();
    assert!(e.contains("10-ptp.conf.json") && e.contains("rename"), "{e}");
    assert_eq!(fs::read_to_string(&conf).unwrap(), fixture_text("10-ptp.conf"));
    assert_eq!(node.entries(), vec!["10-ptp.conf", "10-ptp.conf.json"]);
}

#[test]
fn uninstall_removes_only_iamlink_and_its_binary() {
    let node = Node::new();
    let aws = node.put("10-aws.conflist", "10-aws.conflist");
    let installer = node.installed();
    installer.chain().unwrap();
    assert_eq!(installer.uninstall().unwrap(), vec![aws.clone()]);
    let (after, original) = (fs::read_to_string(&aws).unwrap(), fixture_text("10-aws.conflist"));
    assert_eq!(keys_in_text_order(&after), keys_in_text_order(&original));
    assert_eq!(read(&aws), fixture("10-aws.conflist"));
    assert!(!installer.installed_binary().exists());
    let before = stamp(&aws);
    assert_eq!(installer.uninstall().unwrap(), Vec::<PathBuf>::new(), "nothing left to remove");
    assert_eq!(stamp(&aws), before);
}

#[test]
fn uninstall_leaves_a_converted_conf_as_a_valid_conflist() {
    let node = Node::new();
    node.put("10-ptp.conf", "10-ptp.conf");
    let installer = node.installed();
    installer.chain().unwrap();
    installer.uninstall().unwrap();
    assert_eq!(node.entries(), vec!["10-ptp.conflist"]);
    let list = read(&node.conf.join("10-ptp.conflist"));
    assert_eq!(plugins(&list).len(), 1);
    assert_eq!(list["plugins"][0]["type"], "ptp");
    assert_eq!((list["cniVersion"].as_str(), list["name"].as_str()), (Some("1.0.0"), Some("podnet")));
}

#[test]
fn a_malformed_config_is_refused_named_and_left_untouched() {
    let node = Node::new();
    let path = node.conf.join("10-aws.conflist");
    let broken = "{\"cniVersion\": \"0.4.0\", \"plugins\": [\n";
    fs::write(&path, broken).unwrap();
    let installer = node.installed();
    let e = installer.chain().unwrap_err();
    assert!(matches!(e, CniConfigError::Json { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&*path.to_string_lossy()) && msg.contains("line 2"), "{msg}");
    assert_eq!(fs::read_to_string(&path).unwrap(), broken);
    assert_eq!(node.entries(), vec!["10-aws.conflist"]);
    // Uninstall cannot tell whether the file holds iamlink, so the binary stays.
    assert!(installer.uninstall().is_err());
    assert!(installer.installed_binary().exists());
    assert_eq!(fs::read_to_string(&path).unwrap(), broken);
}

#[test]
fn a_conflist_without_plugins_or_a_conf_without_type_is_refused() {
    let node = Node::new();
    let path = node.conf.join("10-x.conflist");
    fs::write(&path, r#"{"cniVersion":"1.0.0","name":"x","type":"ptp"}"#).unwrap();
    let e = node.installed().chain().unwrap_err().to_string();
    assert!(e.contains("10-x.conflist") && e.contains("plugins"), "{e}");
    fs::remove_file(&path).unwrap();
    fs::write(node.conf.join("10-x.conf"), r#"{"cniVersion":"1.0.0","name":"x","plugins":[]}"#).unwrap();
    let e = node.installed().chain().unwrap_err().to_string();
    assert!(e.contains("10-x.conf") && e.contains("type"), "{e}");
}

#[test]
fn no_config_at_all_is_a_clear_error() {
    let node = Node::new();
    let e = node.installed().chain().unwrap_err();
    assert!(matches!(e, CniConfigError::NoConfig(_)), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&*node.conf.to_string_lossy()) && msg.contains("manage"), "{msg}");
}

#[test]
fn the_plugin_binary_is_copied_atomically_and_executable() {
    let node = Node::new();
    node.put("10-aws.conflist", "10-aws.conflist");
    let installer = node.installer();
    let target = installer.installed_binary();
    let e = installer.chain().unwrap_err().to_string();
    assert!(e.contains("missing"), "no entry without its binary: {e}");

    assert!(installer.install_binary().unwrap());
    assert_eq!(fs::read(&target).unwrap(), fs::read(&node.plugin).unwrap());
    assert_eq!(fs::metadata(&target).unwrap().permissions().mode() & 0o7777, 0o755);
    assert_eq!(fs::read_dir(&node.bin).unwrap().count(), 1, "no temp file left behind");
    let first = stamp(&target);
    assert!(!installer.install_binary().unwrap(), "an identical copy is not rewritten");
    assert_eq!(stamp(&target), first);

    // A new build replaces the file by rename: a runtime exec'ing the old one never sees a torn file.
    fs::write(&node.plugin, b"#!/bin/sh\necho iamlink v2\n").unwrap();
    assert!(installer.install_binary().unwrap());
    assert_ne!(stamp(&target).0, first.0);
    assert_eq!(fs::read(&target).unwrap(), b"#!/bin/sh\necho iamlink v2\n");

    let missing = Installer { plugin_path: node.dir.path().join("nope"), ..installer };
    let e = missing.install_binary().unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("plugin_path"), "{e}");
}

fn iamlinkd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_iamlinkd")).args(args).env_remove("IAMLINKD_CONFIG").output().unwrap()
}

#[test]
fn install_cni_on_the_command_line_chains_or_fails_loudly() {
    let node = Node::new();
    let path = node.put("10-aws.conflist", "10-aws.conflist");
    let config = node.config_path();
    let out = iamlinkd(&["install-cni", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_appended(&path, "10-aws.conflist");
    assert!(node.bin.join("iamlink").exists());

    fs::write(&path, "{ not json").unwrap();
    let out = iamlinkd(&["--config", config.to_str().unwrap(), "install-cni"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("10-aws.conflist") && stderr.contains("not valid JSON"), "{stderr}");
    assert_eq!(fs::read_to_string(&path).unwrap(), "{ not json");

    let out = iamlinkd(&["install-cni", "--config", node.dir.path().join("absent.toml").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent.toml"));
}

/// A mask on kube-proxy's masquerade bit stops iamlinkd before it listens, naming the bit, whose
/// it is and the override; with the override it starts.
#[test]
fn iamlinkd_refuses_a_mark_mask_on_kube_proxys_bits_unless_told_to_allow_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("iamlinkd.toml");
    fs::write(&config, "listen = \"198.18.0.1:8181\"\nmark_mask = 0x4000\n").unwrap();
    let out = iamlinkd(&["--check-config", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("mark_mask")
            && stderr.contains("0x4000 (kube-proxy's masquerade mark)")
            && stderr.contains("allow_mark_overlap = true"),
        "{stderr}"
    );
    fs::write(&config, "listen = \"198.18.0.1:8181\"\nmark_mask = 0x4000\nallow_mark_overlap = true\n").unwrap();
    let out = iamlinkd(&["--check-config", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn help_describes_the_subcommands() {
    let out = iamlinkd(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("install-cni") && help.contains("uninstall-cni") && help.contains("[cni]"), "{help}");
}

async fn within(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

fn has_iamlink(path: &Path) -> bool {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| plugins(&v).last() == Some(&entry()))
}

#[tokio::test]
async fn the_keeper_puts_iamlink_back_when_aws_vpc_cni_or_calico_rewrite_their_file() {
    let node = Node::new();
    let path = node.put("10-aws.conflist", "10-aws.conflist");
    let installer = node.installed();
    let (_agent, no_agent) = tokio::sync::watch::channel(false);
    let keeper = tokio::spawn(keep_chained(installer, node.config(), no_agent));
    assert!(within(Duration::from_secs(2), || has_iamlink(&path)).await, "chained at start");

    // aws-node restarts: writes 10-aws.conflist.tmp and renames it over the file.
    node.put("10-aws.conflist", "10-aws.conflist.tmp");
    fs::rename(node.conf.join("10-aws.conflist.tmp"), &path).unwrap();
    assert!(within(Duration::from_secs(2), || has_iamlink(&path)).await, "back after a rename");
    assert_appended(&path, "10-aws.conflist");

    // Calico's installer style: the file rewritten in place.
    fs::write(&path, fixture_text("10-aws.conflist")).unwrap();
    assert!(within(Duration::from_secs(2), || has_iamlink(&path)).await, "back after an in-place write");

    // Settled: neither inotify (our own rename) nor the periodic check writes again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settled = stamp(&path);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(stamp(&path), settled, "no write without a change");
    assert_eq!(node.entries(), vec!["10-aws.conflist"]);
    keeper.abort();
}

/// The EKS Pod Identity agent appearing on the node takes 169.254.170.23 out of the plugin's
/// entry (no pod route, no ip rule for it at ADD); its leaving puts it back.
#[tokio::test]
async fn the_keeper_leaves_the_credentials_address_out_of_the_entry_while_the_pod_identity_agent_runs() {
    let node = Node::new();
    let path = node.put("10-aws.conflist", "10-aws.conflist");
    let (agent, seen) = tokio::sync::watch::channel(false);
    let keeper = tokio::spawn(keep_chained(node.installed(), node.config(), seen));
    let credentials = |path: &Path| -> Option<String> {
        let v: Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
        plugins(&v).last()?.get("credentialsAddress")?.as_str().map(String::from)
    };
    let to_agent = |path: &Path| -> Option<bool> {
        let v: Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
        plugins(&v).last()?.get("podIdentityAgent")?.as_bool()
    };
    assert!(within(Duration::from_secs(2), || credentials(&path).as_deref() == Some("169.254.170.23")).await);
    agent.send_replace(true);
    assert!(within(Duration::from_secs(2), || credentials(&path).as_deref() == Some("")).await, "left to the agent");
    // Left to the agent, not turned off: the plugin's rule set sends older pods' credentials port on to it.
    assert_eq!(to_agent(&path), Some(true));
    agent.send_replace(false);
    assert!(within(Duration::from_secs(2), || credentials(&path).as_deref() == Some("169.254.170.23")).await);
    assert_eq!(to_agent(&path), None, "the key goes with the agent");
    keeper.abort();
}

#[tokio::test]
async fn install_cni_wait_returns_once_the_primary_cni_writes_its_config_and_not_before() {
    let node = Node::new();
    let dir = node.conf.clone();
    let waiter = tokio::spawn(async move { wait_for_config(&dir).await });
    // A file that is no network config does not end the wait.
    fs::write(node.conf.join("README"), "not a config").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "returned without a network config");
    let started = Instant::now();
    node.put("10-aws.conflist", "10-aws.conflist.tmp");
    fs::rename(node.conf.join("10-aws.conflist.tmp"), node.conf.join("10-aws.conflist")).unwrap();
    let found = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("still waiting").unwrap();
    assert_eq!(found.unwrap(), node.conf.join("10-aws.conflist"));
    assert!(started.elapsed() < Duration::from_millis(900), "woken by inotify, not the 1 s tick");
}
