//! Chaining iamlink into the node's CNI config, and the only code that writes the CNI config and
//! bin directories.
//!
//! containerd and CRI-O use the first file in lexical order of the config directory with
//! extension `.conf`, `.conflist` or `.json`; iamlink goes last into its `plugins`. The entry is
//! derived from iamlinkd's own config, so plugin and daemon cannot disagree. Primary plugins
//! rewrite their file when they restart (aws-vpc-cni by temp file + rename, Calico in place), so
//! the daemon can keep iamlink chained ([`keep_chained`]); it writes only when the entry is
//! missing or wrong, which is what keeps it from fighting the other writer.
//!
//! Files are parsed into `serde_json::Value`s whose maps keep their key order (this crate enables
//! serde_json's `preserve_order`), so a rewritten file differs from the primary's by the iamlink
//! entry only.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use iamlink_common::atomic_file;
use iamlink_common::netconf::{NetconfEntry, PLUGIN_TYPE as PLUGIN_NAME};
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::Config;
use crate::dir_watch::{notified, watch_dir};

/// The extensions libcni's `ConfFiles` lists for containerd and CRI-O.
const CONFIG_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];
/// Safety net behind inotify (unavailable, overflowed, or the directory appeared late).
const CHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum CniConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not valid JSON: {source}; left untouched: fix it or let its plugin rewrite it")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error(
        "no CNI network config (*.conf, *.conflist, *.json) in {0}: the node's primary CNI (aws-vpc-cni, \
         Calico) writes it when it starts; run install-cni after it, or set [cni] manage = true so that \
         iamlinkd chains iamlink when it appears (or fix [cni] conf_dir)"
    )]
    NoConfig(PathBuf),
    #[error("cannot read the iamlink plugin binary {path}: {source}; set [cni] plugin_path")]
    Plugin { path: PathBuf, source: io::Error },
}

type Result<T> = std::result::Result<T, CniConfigError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CniConfigError + '_ {
    move |source| CniConfigError::Io { path: path.to_path_buf(), source }
}

fn invalid(path: &Path, msg: impl Into<String>) -> CniConfigError {
    CniConfigError::Invalid { path: path.to_path_buf(), msg: msg.into() }
}

/// The iamlink netconf entry derived from iamlinkd's config ([`Config::netconf_beside`]), as a
/// JSON object in the struct's key order; `agent`: the EKS Pod Identity agent is on the node.
pub fn iamlink_entry(config: &Config, agent: bool) -> Result<Map<String, Value>> {
    let not_json = |msg: String| invalid(&config.store_dir, format!("cannot be written into a netconf: {msg}"));
    match serde_json::to_value(config.netconf_beside(agent)) {
        Ok(Value::Object(entry)) => Ok(entry),
        Ok(other) => Err(not_json(format!("the entry is not a JSON object: {other}"))),
        Err(e) => Err(not_json(e.to_string())),
    }
}

fn is_iamlink(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_NAME)
}

/// A conflist iamlink cannot be chained into.
#[derive(Debug, thiserror::Error)]
pub enum Unchainable {
    #[error("has no \"plugins\" list")]
    NoPlugins,
    #[error("has no plugin before iamlink, which must follow the one that creates the pod's interface")]
    NothingBefore,
}

/// `list` with `entry` as its last plugin; an existing iamlink entry is brought up to date where
/// it stands (its other keys kept) and duplicates are dropped. Equal to `list` when it was right.
pub fn chained(list: &Value, entry: &Map<String, Value>) -> std::result::Result<Value, Unchainable> {
    let mut list = list.clone();
    let plugins = list.get_mut("plugins").and_then(Value::as_array_mut).ok_or(Unchainable::NoPlugins)?;
    let mut seen = false;
    plugins.retain_mut(|plugin| {
        if !is_iamlink(plugin) {
            return true;
        }
        if std::mem::replace(&mut seen, true) {
            return false;
        }
        if let Some(existing) = plugin.as_object_mut() {
            for key in NetconfEntry::KEYS {
                match entry.get(key) {
                    Some(value) => existing.insert(key.into(), value.clone()),
                    None => existing.shift_remove(key),
                };
            }
        }
        true
    });
    if !seen {
        plugins.push(Value::Object(entry.clone()));
    }
    if plugins.first().is_some_and(is_iamlink) {
        return Err(Unchainable::NothingBefore);
    }
    Ok(list)
}

/// `list` without any iamlink entry.
pub fn unchained(list: &Value) -> Value {
    let mut list = list.clone();
    if let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) {
        plugins.retain(|p| !is_iamlink(p));
    }
    list
}

/// A single-plugin config as the conflist runtimes make of it: name and version move to the list.
pub fn conf_to_conflist(conf: &Value) -> Value {
    let mut plugin = conf.as_object().cloned().unwrap_or_default();
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(value) = plugin.shift_remove(key) {
            list.insert(key.into(), value);
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(plugin)]));
    Value::Object(list)
}

fn is_config_file(name: &str) -> bool {
    Path::new(name).extension().and_then(|e| e.to_str()).is_some_and(|e| CONFIG_EXTENSIONS.contains(&e))
}

fn is_conflist(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "conflist")
}

/// The config files in lexical (byte) order, as libcni's `ConfFiles` and `sort.Strings` give them:
/// directories are skipped, everything else with a config extension counts.
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = vec![];
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let is_dir = entry.file_type().map_err(io_err(&entry.path()))?.is_dir();
        if !is_dir && entry.file_name().to_str().is_some_and(is_config_file) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// The file the runtime uses: the first config file.
pub fn config_file(dir: &Path) -> Result<PathBuf> {
    config_files(dir)?.into_iter().next().ok_or_else(|| CniConfigError::NoConfig(dir.to_path_buf()))
}

/// The name of the network the runtime uses (its first config file) when iamlink is chained in
/// it: only its attachments have a DEL that goes through iamlink. `None`: not chained.
pub fn chained_network(dir: &Path) -> Result<Option<String>> {
    let (_, list) = read_json(&config_file(dir)?)?;
    let ours = list["plugins"].as_array().is_some_and(|ps| ps.iter().any(|p| p["type"] == PLUGIN_NAME));
    Ok(list["name"].as_str().filter(|_| ours).map(str::to_string))
}

fn read_json(path: &Path) -> Result<(Vec<u8>, Value)> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|source| CniConfigError::Json { path: path.to_path_buf(), source })?;
    if !value.is_object() {
        return Err(invalid(path, "is not a JSON object"));
    }
    Ok((bytes, value))
}

/// Whether `path` still holds `bytes`: a primary plugin that rewrote it while we worked wins,
/// and its change event brings us back.
fn unchanged(path: &Path, bytes: &[u8]) -> bool {
    fs::read(path).is_ok_and(|now| now == bytes)
}

fn render(value: &Value) -> Vec<u8> {
    let mut text = serde_json::to_vec_pretty(value).expect("a Value always serializes");
    text.push(b'\n');
    text
}

/// Replaces `path` by temp file + fsync + rename in the same directory, so the runtime (which
/// reloads on directory events) never reads a partial file. The temp name ends in no config
/// extension, so libcni never lists it.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    atomic_file::write(path, bytes, mode).map_err(|e| CniConfigError::Io { path: path.to_path_buf(), source: e })
}

fn mode_of(path: &Path) -> Result<u32> {
    Ok(fs::metadata(path).map_err(io_err(path))?.permissions().mode() & 0o7777)
}

/// Chains iamlink into the CNI config and keeps it there; built from iamlinkd's config.
#[derive(Clone, Debug)]
pub struct Installer {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// The binary copied into `bin_dir`.
    pub plugin_path: PathBuf,
    pub entry: Map<String, Value>,
}

impl Installer {
    pub fn new(config: &Config, agent: bool) -> Result<Self> {
        let plugin_path = match &config.cni.plugin_path {
            Some(path) => path.clone(),
            None => {
                let exe = std::env::current_exe().map_err(|source| CniConfigError::Plugin {
                    path: PathBuf::from("(iamlinkd's own path)"),
                    source,
                })?;
                exe.with_file_name(PLUGIN_NAME)
            }
        };
        Ok(Installer {
            conf_dir: config.cni.conf_dir.clone(),
            bin_dir: config.cni.bin_dir.clone(),
            plugin_path,
            entry: iamlink_entry(config, agent)?,
        })
    }

    /// Where runtimes find the plugin.
    pub fn installed_binary(&self) -> PathBuf {
        self.bin_dir.join(PLUGIN_NAME)
    }

    /// Copies the plugin into the bin directory (mode 0755, atomically: a runtime may exec it at
    /// any moment). Returns false when the installed copy was already identical.
    pub fn install_binary(&self) -> Result<bool> {
        let plugin = fs::read(&self.plugin_path)
            .map_err(|source| CniConfigError::Plugin { path: self.plugin_path.clone(), source })?;
        let target = self.installed_binary();
        let same = fs::read(&target).is_ok_and(|installed| installed == plugin)
            && mode_of(&target).is_ok_and(|mode| mode == 0o755);
        if same {
            return Ok(false);
        }
        write_atomic(&target, &plugin, 0o755)?;
        Ok(true)
    }

    /// Puts the iamlink entry last into the config the runtime uses; a `.conf` becomes a
    /// `.conflist` of the same stem. Returns the file written, None when it was already right.
    /// Refuses while the binary is missing: the entry alone would fail every pod's ADD.
    pub fn chain(&self) -> Result<Option<PathBuf>> {
        let binary = self.installed_binary();
        if !binary.is_file() {
            return Err(invalid(&binary, "is missing, so iamlink is not chained (pods would fail); run install-cni"));
        }
        let path = config_file(&self.conf_dir)?;
        let (bytes, current) = read_json(&path)?;
        if is_conflist(&path) {
            let new = chained(&current, &self.entry).map_err(|e| invalid(&path, e.to_string()))?;
            if new == current || !unchanged(&path, &bytes) {
                return Ok(None);
            }
            write_atomic(&path, &render(&new), mode_of(&path)?)?;
            return Ok(Some(path));
        }
        if current.get("type").and_then(Value::as_str).is_none_or(str::is_empty) {
            return Err(invalid(&path, "has no \"type\" (containerd refuses it); name a conflist .conflist"));
        }
        let target = path.with_extension("conflist");
        self.keeps_first_place(&path, &target)?;
        let new = chained(&conf_to_conflist(&current), &self.entry).map_err(|e| invalid(&path, e.to_string()))?;
        if !unchanged(&path, &bytes) {
            return Ok(None);
        }
        write_atomic(&target, &render(&new), mode_of(&path)?)?;
        if unchanged(&path, &bytes) {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
        Ok(Some(target))
    }

    /// The converted file must still come first. An existing `<stem>.conflist` is replaced: the
    /// `.conf` shadowed it, so the runtime never used it (it is ours from an earlier conversion
    /// when the primary has rewritten its `.conf`).
    fn keeps_first_place(&self, conf: &Path, target: &Path) -> Result<()> {
        let files = config_files(&self.conf_dir)?;
        match files.iter().find(|f| *f != conf && *f != target && f.as_path() < target) {
            Some(other) => Err(invalid(
                conf,
                format!("as {} it would sort after {}; rename one of them", target.display(), other.display()),
            )),
            None => Ok(()),
        }
    }

    /// Removes every iamlink entry from the config files (the runtime's first file may have
    /// changed since install), then the binary. A file that cannot be read stops it before the
    /// binary goes: an entry left without its binary would fail every pod's ADD.
    /// A conflist converted from a `.conf` stays a conflist. Returns the files rewritten.
    pub fn uninstall(&self) -> Result<Vec<PathBuf>> {
        let files = match config_files(&self.conf_dir) {
            Err(CniConfigError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => vec![],
            files => files?,
        };
        let mut written = vec![];
        for path in files.into_iter().filter(|p| is_conflist(p)) {
            let (bytes, current) = read_json(&path)?;
            let new = unchained(&current);
            if new != current && unchanged(&path, &bytes) {
                write_atomic(&path, &render(&new), mode_of(&path)?)?;
                written.push(path);
            }
        }
        let binary = self.installed_binary();
        if let Err(e) = fs::remove_file(&binary) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(io_err(&binary)(e));
            }
        }
        Ok(written)
    }

    /// One pass of [`keep_chained`]: the binary back if someone removed it, then the entry.
    fn ensure(&self) -> Result<Option<PathBuf>> {
        if !self.installed_binary().is_file() {
            self.install_binary()?;
            info!(path = %self.installed_binary().display(), "iamlink plugin binary was missing; installed again");
        }
        self.chain()
    }
}

/// How often `install-cni --wait` says it is still waiting for the primary CNI's config.
const STILL_WAITING_EVERY: Duration = Duration::from_secs(30);

/// Returns once `dir` holds a CNI network config: the primary CNI (aws-vpc-cni, Calico) writes it
/// when it starts, possibly after iamlink's pod. `install-cni --wait` waits here instead of
/// exiting non-zero, which would cost a CrashLoopBackOff delay of up to minutes after the config
/// appears. Woken by inotify, with a check every second as a safety net (and while the directory
/// does not exist yet).
pub async fn wait_for_config(dir: &Path) -> Result<PathBuf> {
    let mut watch = None;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    let mut said = None::<tokio::time::Instant>;
    loop {
        match config_file(dir) {
            Ok(path) => {
                if said.is_some() {
                    info!(file = %path.display(), "the primary CNI's config appeared");
                }
                return Ok(path);
            }
            Err(CniConfigError::NoConfig(_)) => {}
            Err(CniConfigError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if said.is_none_or(|t| t.elapsed() >= STILL_WAITING_EVERY) {
            info!(dir = %dir.display(), "waiting for the primary CNI's network config (*.conf, *.conflist, *.json)");
            said = Some(tokio::time::Instant::now());
        }
        if watch.is_none() {
            watch = watch_dir(dir, "cni-conf-wait");
        }
        changed_or_tick(&watch, &mut tick).await;
    }
}

/// The directory's next change, or the next tick (which alone wakes without a watcher).
async fn changed_or_tick(watch: &Option<Arc<Notify>>, tick: &mut tokio::time::Interval) {
    tokio::select! {
        _ = notified(watch) => {}
        _ = tick.tick() => {}
    }
}

/// Keeps iamlink chained: re-inserts it within moments of a primary plugin rewriting its file
/// (inotify, and a check every second as a safety net), and rewrites its entry when the EKS Pod
/// Identity agent comes or goes (`agent`). Writes only when the entry is missing or wrong; each
/// distinct error is logged once.
pub async fn keep_chained(mut installer: Installer, config: Config, mut agent: tokio::sync::watch::Receiver<bool>) {
    let watch = watch_dir(&installer.conf_dir, "cni-conf-watch");
    if watch.is_none() {
        warn!(dir = %installer.conf_dir.display(), "cannot watch the CNI config directory; checking it every second");
    }
    let mut tick = tokio::time::interval(CHECK_EVERY);
    let mut last_error = None;
    loop {
        let agent_changed = tokio::select! {
            _ = changed_or_tick(&watch, &mut tick) => false,
            _ = crate::install::pod_identity::changed(&mut agent) => true,
        };
        if agent_changed {
            match iamlink_entry(&config, *agent.borrow()) {
                Ok(entry) => installer.entry = entry,
                Err(e) => warn!(error = %e, "cannot derive the plugin's entry for the EKS Pod Identity agent's change"),
            }
        }
        match installer.ensure() {
            Ok(written) => {
                if let Some(path) = written {
                    info!(file = %path.display(), "chained iamlink into the CNI config (it was missing or out of date)");
                }
                last_error = None;
            }
            Err(e) => {
                let e = e.to_string();
                if last_error.as_ref() != Some(&e) {
                    warn!(error = %e, "cannot chain iamlink into the CNI config; will retry when it changes");
                    last_error = Some(e);
                }
            }
        }
    }
}
