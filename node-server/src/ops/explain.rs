//! `iamlinkd explain <target>` and `iamlinkd status`: what the node knows about a pod, or about
//! all of them, and what is wrong. The store and the kernel are read directly ([`diagnose`]), so
//! both work while the daemon is down; the role and the credential cache, which only the running
//! daemon knows, are asked of it on its local socket ([`local_api`]) and marked unknown when it
//! does not answer.
//!
//! Exit codes: 0 nothing wrong, 1 problems found (each printed), 2 the target matches nothing.
//! What cannot be read from here (a pod's netns that containerd mounts where this process does
//! not see it) is reported as unknown, apart from the problems, and is none.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use iamlink_common::plumbing::{Finding, Part, Plumbing, PodSide, SlotChain};
use iamlink_common::{intercept, PodRecord, Store};
use serde::Serialize;

use crate::config::Config;
use crate::install::adopt::NotAdopted;
use crate::ops::attachments::{self, InterfaceAttachments};
use crate::ops::diagnose::{self, NodeView, RuleSetState, Target};
use crate::ops::local_api::{self, Asked, PodAnswer, StatusAnswer};

/// What `explain` and `status` concluded, and so their exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing wrong: exit 0.
    Healthy,
    /// Problems, each named in the output: exit 1.
    Problems,
    /// Nothing matches the target: exit 2.
    NotFound,
}

impl Verdict {
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Healthy => 0,
            Verdict::Problems => 1,
            Verdict::NotFound => 2,
        }
    }
}

/// Long enough for a busy daemon, short enough for an operator waiting at a prompt.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the daemon answered, and why not.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DaemonContact {
    pub socket: PathBuf,
    pub answering: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DaemonContact {
    fn not_answering_line(&self) -> String {
        format!(
            "iamlinkd is not answering on {}: role and credential state unknown (daemon down?)",
            self.socket.display()
        )
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodReport {
    pub record: PodRecord,
    pub record_file: PathBuf,
    #[serde(flatten)]
    pub plumbing: Plumbing,
    /// The daemon's answer; `None` when it did not answer.
    pub daemon: Option<PodAnswer>,
    /// What is attached to the host interface (tcx, tc, XDP, netkit) and whether the guard is first.
    pub attachments: InterfaceAttachments,
    pub problems: Vec<String>,
    /// Parts of the plumbing that could not be read from here: unknown, not problems.
    pub unchecked: Vec<String>,
}

/// Findings split into problems and what could not be checked, as sentences.
fn split(found: &[Finding]) -> (Vec<String>, Vec<String>) {
    let (unchecked, problems): (Vec<&Finding>, Vec<&Finding>) = found.iter().partition(|f| f.is_unchecked());
    let texts = |fs: Vec<&Finding>| fs.iter().map(ToString::to_string).collect();
    (texts(problems), texts(unchecked))
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrphanEntry {
    pub host_interface: String,
    pub slot: u32,
    pub problem: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExplainReport {
    pub target: String,
    pub daemon: DaemonContact,
    pub rule_set: RuleSetState,
    pub pods: Vec<PodReport>,
    pub orphan_entries: Vec<OrphanEntry>,
    /// Node-wide problems that affect these pods (the rule set).
    pub node_problems: Vec<String>,
}

impl ExplainReport {
    pub fn has_problems(&self) -> bool {
        !self.node_problems.is_empty()
            || !self.orphan_entries.is_empty()
            || self.pods.iter().any(|p| !p.problems.is_empty())
    }
}

/// The daemon's view's problems: credentials it cannot get.
fn daemon_findings(answer: &PodAnswer) -> Vec<String> {
    match (&answer.role, &answer.credentials) {
        (Some(role), Some(c)) if !c.usable => match &c.error {
            Some(e) => vec![format!("no usable credentials for {role}: STS failed: {e}")],
            None if c.cached => vec![format!("the cached credentials for {role} are (nearly) expired")],
            None => vec![],
        },
        _ => vec![],
    }
}

fn pod_path(record: &PodRecord) -> String {
    format!("/v1/pods/{}", record.key())
}

/// `iamlinkd explain <target>`; prints the report and returns the exit code.
pub async fn explain(config: &Config, target: &str, json: bool) -> Verdict {
    let target = match Target::parse(target) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("iamlinkd explain: {e}");
            return Verdict::NotFound;
        }
    };
    let store = Store::existing(&config.store_dir);
    let view = match NodeView::read(&store) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("iamlinkd explain: cannot read the store: {e}");
            return Verdict::Problems;
        }
    };
    let matched: Vec<&PodRecord> = view.records.iter().filter(|r| target.matches(r, &diagnose::same_file)).collect();
    let orphan_entries: Vec<OrphanEntry> = view
        .orphan_entries()
        .into_iter()
        .filter(|e| target.entry_name() == Some(e.ifname.as_str()))
        .map(|e| OrphanEntry {
            problem: diagnose::orphan_entry_finding(&e.ifname, e.slot),
            host_interface: e.ifname,
            slot: e.slot,
        })
        .collect();
    if matched.is_empty() && orphan_entries.is_empty() {
        eprintln!(
            "iamlinkd explain: nothing matches {target}: no pod record in {} has that network namespace, host \
             interface or namespace/pod ({} records), and no interception entry has that name",
            view.store_dir.display(),
            view.records.len()
        );
        for bad in &view.unreadable {
            eprintln!("  (unreadable record: {bad})");
        }
        return Verdict::NotFound;
    }

    let socket = store.api_socket();
    let mut daemon = DaemonContact { socket: socket.clone(), answering: true, error: None };
    let rules = crate::install::pod_identity::rule_set_here(config).await;
    let mut pods = vec![];
    let node = iamlink_common::netlink::Netlink::here();
    for record in matched {
        let plumbing = diagnose::plumbing(&store, &view, &rules, config.mark_mask, record).await;
        let (mut problems, unchecked) = split(&diagnose::findings(&plumbing, record, &view.rule_set));
        let attachments = read_attachments(&node, record).await;
        problems.extend(attachments.problem());
        let answer = if daemon.answering {
            match local_api::ask::<PodAnswer>(&socket, &pod_path(record), ASK_TIMEOUT).await {
                Asked::Answer(a) => Some(a),
                Asked::NotFound => None,
                Asked::NotAnswering(e) => {
                    daemon = DaemonContact { answering: false, error: Some(e), ..daemon };
                    None
                }
            }
        } else {
            None
        };
        problems.extend(answer.iter().flat_map(daemon_findings));
        let record_file = store.record_path(&record.container_id, &record.ifname);
        pods.push(PodReport {
            record: record.clone(),
            record_file,
            plumbing,
            daemon: answer,
            attachments,
            problems,
            unchecked,
        });
    }
    let report = ExplainReport {
        target: target.to_string(),
        daemon,
        node_problems: view.rule_set_findings(),
        rule_set: view.rule_set.clone(),
        pods,
        orphan_entries,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print!("{}", render_explain(&report, config.mark_mask));
    }
    if report.has_problems() {
        Verdict::Problems
    } else {
        Verdict::Healthy
    }
}

/// The record's interface attachments, or why the node's netlink socket could not be opened.
async fn read_attachments(
    node: &Result<iamlink_common::netlink::Netlink, iamlink_common::netlink::NetlinkError>,
    record: &PodRecord,
) -> InterfaceAttachments {
    match node {
        Ok(net) => attachments::read(net, record).await,
        Err(e) => InterfaceAttachments {
            pod: record.pod.to_string(),
            container_id: record.container_id.clone(),
            host_interface: record.host_interface.name.clone(),
            ebpf_guard: record.ebpf_guard,
            attached: None,
            error: Some(e.to_string()),
        },
    }
}

fn ago_or_in(t: &str) -> String {
    let Ok(when) = humantime::parse_rfc3339(t) else { return String::new() };
    let now = SystemTime::now();
    let round = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string();
    match when.duration_since(now) {
        Ok(ahead) => format!(" (in {})", round(ahead)),
        Err(e) => format!(" ({} ago)", round(e.duration())),
    }
}

/// The explanation as an operator reads it: one block per pod, one line per fact.
pub fn render_explain(report: &ExplainReport, mask: iamlink_common::MarkMask) -> String {
    let mut out = String::new();
    let line = |out: &mut String, label: &str, text: &str| {
        let _ = writeln!(out, "  {label:<13} {text}");
    };
    if !report.daemon.answering {
        let _ = writeln!(out, "{}", report.daemon.not_answering_line());
        if let Some(e) = &report.daemon.error {
            let _ = writeln!(out, "  ({e})");
        }
        out.push('\n');
    }
    for (i, pod) in report.pods.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let (p, r) = (&pod.plumbing, &pod.record);
        let _ = writeln!(out, "pod {}", r.pod);
        line(&mut out, "uid", if r.pod.uid.is_empty() { "(not passed by the runtime)" } else { &r.pod.uid });
        line(&mut out, "container", &format!("{} (interface {}, network {})", r.container_id, r.ifname, r.network));
        let held = match (&p.slot_held_by, p.slot_linked) {
            (_, true) => String::new(),
            (Some(holder), false) => format!(", HELD BY {holder}"),
            (None, false) => ", NOT LINKED".to_string(),
        };
        line(
            &mut out,
            "record",
            &format!(
                "{} (slot {}{held}, {} {})",
                pod.record_file.display(),
                r.slot,
                if r.adopted { "adopted at" } else { "created" },
                r.created
            ),
        );
        line(&mut out, "netns", &r.netns);
        line(&mut out, "addresses", &r.ips.join(", "));
        let host = &r.host_interface;
        let host_state = match p.host.index_now {
            _ if p.host.error.is_some() => format!("unknown: {}", p.host.error.as_deref().unwrap_or_default()),
            Some(i) if i == host.index => "present".to_string(),
            Some(i) => format!("MISMATCH: that name now has index {i}"),
            None => "GONE".to_string(),
        };
        line(&mut out, "host iface", &format!("{} (index {}): {host_state}", host.name, host.index));
        match &p.pod {
            PodSide::Routes { routes } if routes.is_empty() => line(&mut out, "pod routes", "(none needed)"),
            PodSide::Routes { routes } => {
                for (n, route) in routes.iter().enumerate() {
                    let mut text = route.dst.to_string();
                    if let Some(via) = route.via {
                        let _ = write!(text, " via {via}");
                    }
                    match &route.dev {
                        Some(dev) => {
                            let _ = write!(text, " dev {dev}");
                        }
                        None => text.push_str(": no route"),
                    }
                    text.push_str(if route.ok { ": ok" } else { ": MISSING" });
                    line(&mut out, if n == 0 { "pod routes" } else { "" }, &text);
                }
            }
            PodSide::NoInterface => line(&mut out, "pod routes", &format!("unknown: no {} in the pod", r.ifname)),
            PodSide::NetnsUnavailable { error } => {
                line(&mut out, "pod routes", &format!("unknown: cannot enter {} from here: {error}", r.netns))
            }
            PodSide::Unreadable { error } => line(&mut out, "pod routes", &format!("unknown: {error}")),
        }
        let entry = match (p.entry, &report.rule_set) {
            (_, RuleSetState::Missing) => "MISSING: no rule set".to_string(),
            (Some(s), _) if s == r.slot => match p.slot_chain {
                Some(SlotChain { mark: Some(m), expected_mark, .. }) if m == expected_mark => {
                    format!("{} → slot-{s} (mark {m:#x} of mask {mask}): ok", host.name)
                }
                Some(SlotChain { mark: Some(m), expected_mark, mark_read_as }) => format!(
                    "{} → slot-{s}: WRONG MARK (slot-{s} sets {m:#x}, read as slot {}; slot {s} is {expected_mark:#x} \
                     of mask {mask})",
                    host.name,
                    mark_read_as.unwrap_or(0),
                ),
                Some(SlotChain { mark: None, .. }) => format!("{} → slot-{s}: MISSING slot chain", host.name),
                None => format!("{} → slot-{s}", host.name),
            },
            (Some(s), _) if !p.slot_linked => format!("{} → slot-{s}: the record holds no slot", host.name),
            (Some(s), _) => format!("{} → slot-{s}: WRONG SLOT (the record holds slot-{})", host.name, r.slot),
            (None, _) if !p.slot_linked => format!("none for {} (the record holds no slot)", host.name),
            (None, _) => format!("MISSING: no entry for {} in the pods map", host.name),
        };
        line(&mut out, "interception", &entry);
        for (label, text) in pod.attachments.lines() {
            line(&mut out, label, &text);
        }
        match &pod.daemon {
            None if !report.daemon.answering => {
                line(&mut out, "role", "unknown (iamlinkd not answering)");
                line(&mut out, "credentials", "unknown (iamlinkd not answering)");
            }
            None => line(&mut out, "role", "unknown (iamlinkd cannot read this record)"),
            Some(a) => {
                let role = match &a.role {
                    Some(arn) => format!("{arn} ({})", a.resolution),
                    None => a.resolution.clone(),
                };
                line(&mut out, "role", &role);
                if let Some(mode) = &a.mode {
                    line(&mut out, "mode", mode);
                }
                if a.role.is_some() || a.credentials.is_some() {
                    line(&mut out, "credentials", &credentials_text(a));
                }
            }
        }
        if pod.problems.is_empty() {
            line(&mut out, "problems", "none");
        } else {
            for (n, problem) in pod.problems.iter().enumerate() {
                line(&mut out, if n == 0 { "PROBLEMS" } else { "" }, problem);
            }
        }
    }
    for orphan in &report.orphan_entries {
        if !report.pods.is_empty() || out.ends_with("\n\n") {
            out.push('\n');
        }
        let _ = writeln!(out, "interception entry {} → slot-{} (no pod record)", orphan.host_interface, orphan.slot);
        line(&mut out, "PROBLEMS", &orphan.problem);
    }
    if !report.node_problems.is_empty() {
        out.push('\n');
        for problem in &report.node_problems {
            let _ = writeln!(out, "node: {problem}");
        }
    }
    out
}

fn credentials_text(a: &PodAnswer) -> String {
    let Some(c) = &a.credentials else { return "nothing cached yet (fetched at the pod's first request)".into() };
    let mut parts = vec![];
    if let Some(exp) = &c.expiration {
        let state = if c.usable { "cached" } else { "cached but (nearly) expired" };
        parts.push(format!("{state}, expires {exp}{}", ago_or_in(exp)));
    }
    if let Some(t) = &c.last_updated {
        parts.push(format!("last refreshed {t}{}", ago_or_in(t)));
    }
    if let Some(e) = &c.error {
        let retry = c.retry_at.as_deref().map(|t| format!(", next try {t}")).unwrap_or_default();
        parts.push(format!("STS failing ({} attempts{retry}): {e}", c.failed_attempts));
    }
    if c.fetching {
        parts.push("an STS call is under way".into());
    }
    if parts.is_empty() {
        "nothing cached yet".into()
    } else {
        parts.join("; ")
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub store_dir: PathBuf,
    pub daemon: DaemonContact,
    /// The daemon's own counts, when it answered.
    pub daemon_status: Option<StatusAnswer>,
    pub rule_set: RuleSetState,
    pub records: usize,
    pub unreadable_records: usize,
    pub interception_entries: usize,
    pub records_without_entry: usize,
    pub entries_without_record: usize,
    pub host_interface_gone: usize,
    pub pod_routes_missing: usize,
    /// Pods whose routes could not be read from here (their netns out of sight): not missing.
    pub pod_routes_unknown: usize,
    /// Every problem on the node, each naming its pod or entry.
    pub problems: Vec<String>,
    /// What could not be checked from here, each naming its pod: unknown, not problems.
    pub unchecked: Vec<String>,
    /// Running pods iamlinkd found without a record at its last start and did not adopt (each
    /// also among the problems): their metadata requests are refused.
    pub not_adopted: Vec<NotAdopted>,
    /// Per pod interface, what is attached to it (tcx, tc, XDP, netkit).
    pub interfaces: Vec<InterfaceAttachments>,
}

/// What the pods' findings add up to in `iamlinkd status`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    host_interface_gone: usize,
    pod_routes_missing: usize,
    pod_routes_unknown: usize,
}

impl Tally {
    /// Counts one pod: a part found wrong, or (apart) a part that could not be read.
    fn add(&mut self, found: &[Finding]) {
        let any = |part, unchecked| found.iter().any(|f| f.part() == part && f.is_unchecked() == unchecked);
        self.host_interface_gone += usize::from(any(Part::HostInterface, false));
        self.pod_routes_missing += usize::from(any(Part::PodRoutes, false));
        self.pod_routes_unknown += usize::from(any(Part::PodRoutes, true));
    }
}

/// `iamlinkd status`; prints the summary and returns the exit code (1: problems, including a
/// daemon that does not answer).
pub async fn status(config: &Config, json: bool) -> Verdict {
    let store = Store::existing(&config.store_dir);
    let view = match NodeView::read(&store) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("iamlinkd status: cannot read the store: {e}");
            return Verdict::Problems;
        }
    };
    let socket = store.api_socket();
    let (daemon, daemon_status) = match local_api::ask::<StatusAnswer>(&socket, "/v1/status", ASK_TIMEOUT).await {
        Asked::Answer(s) => (DaemonContact { socket, answering: true, error: None }, Some(s)),
        Asked::NotFound => (DaemonContact { socket, answering: false, error: Some("no status endpoint".into()) }, None),
        Asked::NotAnswering(e) => (DaemonContact { socket, answering: false, error: Some(e) }, None),
    };
    let rules = crate::install::pod_identity::rule_set_here(config).await;
    let mut problems = view.rule_set_findings();
    if !daemon.answering {
        problems.push(format!(
            "iamlinkd is not answering on {} (daemon down?): pods' connections are refused",
            daemon.socket.display()
        ));
    }
    problems.extend(view.unreadable.iter().map(|e| format!("unreadable record (its pod gets 404): {e}")));
    let (mut without_entry, mut tally, mut unchecked) = (0, Tally::default(), vec![]);
    let node = iamlink_common::netlink::Netlink::here();
    let mut interfaces = vec![];
    for record in &view.records {
        let attached = read_attachments(&node, record).await;
        problems.extend(attached.problem());
        interfaces.push(attached);
        let p = diagnose::plumbing(&store, &view, &rules, config.mark_mask, record).await;
        // A record that holds no slot has no entry by the rule: its problem is the slot.
        without_entry += usize::from(p.slot_linked && p.entry != Some(record.slot));
        let found = diagnose::findings(&p, record, &view.rule_set);
        tally.add(&found);
        let (pod_problems, pod_unchecked) = split(&found);
        problems.extend(pod_problems.iter().map(|f| format!("{}: {f}", record.pod)));
        unchecked.extend(pod_unchecked.iter().map(|f| format!("{}: {f}", record.pod)));
    }
    let orphans = view.orphan_entries();
    problems.extend(orphans.iter().map(|e| diagnose::orphan_entry_finding(&e.ifname, e.slot)));
    let not_adopted = store.read_not_adopted::<Vec<NotAdopted>>().unwrap_or_else(|e| {
        problems.push(format!("cannot read the pods not adopted: {e}"));
        None
    });
    // A pod adopted since (a later start) or gone (its runtime's DEL removed its cache entry, in a
    // cache directory seen from here) is none.
    let not_adopted: Vec<NotAdopted> = not_adopted
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !view.records.iter().any(|r| r.container_id == n.container_id && r.ifname == n.ifname))
        .filter(|n| n.file.exists() || !n.file.parent().is_some_and(|d| d.is_dir()))
        .collect();
    problems.extend(not_adopted.iter().map(|n| {
        format!("{}: running without a record, not adopted at {} (its requests are refused): {}", n.pod, n.at, n.reason)
    }));
    let report = StatusReport {
        store_dir: view.store_dir.clone(),
        daemon,
        daemon_status,
        rule_set: view.rule_set.clone(),
        records: view.records.len(),
        unreadable_records: view.unreadable.len(),
        interception_entries: view.entries.len(),
        records_without_entry: without_entry,
        entries_without_record: orphans.len(),
        host_interface_gone: tally.host_interface_gone,
        pod_routes_missing: tally.pod_routes_missing,
        pod_routes_unknown: tally.pod_routes_unknown,
        problems,
        unchecked,
        not_adopted,
        interfaces,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print!("{}", render_status(&report));
    }
    if report.problems.is_empty() {
        Verdict::Healthy
    } else {
        Verdict::Problems
    }
}

pub fn render_status(s: &StatusReport) -> String {
    let mut out = String::new();
    let line = |out: &mut String, label: &str, text: &str| {
        let _ = writeln!(out, "{label:<26} {text}");
    };
    match (&s.daemon_status, s.daemon.answering) {
        (Some(d), true) => {
            let up = humantime::format_duration(Duration::from_secs(d.uptime_seconds));
            line(
                &mut out,
                "iamlinkd",
                &format!("answering on {} (pid {}, version {}, up {up})", s.daemon.socket.display(), d.pid, d.version),
            );
            line(
                &mut out,
                "",
                &format!(
                    "{} pods with a role, {} with usable credentials, {} failing; {} cache entries",
                    d.with_role, d.credentials_usable, d.credentials_failing, d.cache_entries
                ),
            );
            if let Some(endpoint) = &d.sts_endpoint {
                line(&mut out, "STS endpoint", endpoint);
            }
        }
        _ => {
            let _ = writeln!(out, "{}", s.daemon.not_answering_line());
            if let Some(e) = &s.daemon.error {
                line(&mut out, "", &format!("({e})"));
            }
        }
    }
    let rule_set = match &s.rule_set {
        RuleSetState::Installed => format!("installed (table inet {})", intercept::TABLE),
        RuleSetState::Incomplete(chains) => format!("INCOMPLETE: missing chain(s) {}", chains.join(", ")),
        RuleSetState::Missing => format!("NOT INSTALLED (no table inet {})", intercept::TABLE),
        RuleSetState::Unreadable(e) => format!("unreadable: {e}"),
    };
    line(&mut out, "rule set", &rule_set);
    line(
        &mut out,
        "records",
        &format!("{} in {} ({} unreadable)", s.records, s.store_dir.display(), s.unreadable_records),
    );
    line(&mut out, "interception entries", &s.interception_entries.to_string());
    line(&mut out, "records without entry", &s.records_without_entry.to_string());
    line(&mut out, "entries without record", &s.entries_without_record.to_string());
    line(&mut out, "host interface gone", &s.host_interface_gone.to_string());
    line(&mut out, "pod routes missing", &s.pod_routes_missing.to_string());
    let unknown = match s.pod_routes_unknown {
        0 => "0".to_string(),
        n => format!("{n} (pod netns not readable from here)"),
    };
    line(&mut out, "pod routes unknown", &unknown);
    line(&mut out, "pods not adopted", &s.not_adopted.len().to_string());
    for i in s.interfaces.iter().filter(|i| {
        i.attached
            .as_ref()
            .is_some_and(|a| a.tcx_ingress.as_ref().is_some_and(|p| !p.is_empty()) || !a.foreign().is_empty())
    }) {
        let text = i.lines().into_iter().map(|(l, t)| format!("{l} {t}")).collect::<Vec<_>>().join("; ");
        line(&mut out, &format!("{} ({})", i.host_interface, i.pod), &text);
    }
    if s.problems.is_empty() {
        line(&mut out, "problems", "none");
    } else {
        let _ = writeln!(out, "PROBLEMS");
        for p in &s.problems {
            let _ = writeln!(out, "  {p}");
        }
    }
    if !s.unchecked.is_empty() {
        let _ = writeln!(out, "could not check (not problems)");
        for u in &s.unchecked {
            let _ = writeln!(out, "  {u}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::local_api::CredentialState;
    use iamlink_common::plumbing::{HostLink, PodRoute};
    use iamlink_common::{HostInterface, HostInterfaceSource, MarkMask, PodRef};

    fn report(answering: bool, entry: Option<u32>) -> ExplainReport {
        let record = PodRecord {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            network: "net".into(),
            slot: 1,
            host_interface: HostInterface { name: "veth1".into(), index: 7, source: HostInterfaceSource::PeerIfindex },
            netns: "/var/run/netns/cni-1".into(),
            pod: PodRef { namespace: "team-a".into(), name: "web".into(), uid: "u-1".into() },
            ips: vec!["198.18.64.2/24".into()],
            created: "2025-01-01T00:00:00Z".into(),
            created_boottime_ns: 1,
            runtime_annotations: None,
            adopted: false,
            pod_dnat: false,
            ebpf_guard: false,
        };
        let plumbing = Plumbing {
            slot_linked: true,
            slot_held_by: None,
            slot_error: None,
            entry,
            slot_chain: Some(SlotChain { mark: Some(1), expected_mark: 1, mark_read_as: Some(1) }),
            host: HostLink { index_now: Some(7), name_of_index: None, error: None },
            pod: PodSide::Routes {
                routes: vec![PodRoute {
                    dst: "169.254.169.254".parse().unwrap(),
                    routed: true,
                    via: Some("198.18.64.1".parse().unwrap()),
                    dev: Some("eth0".into()),
                    ok: true,
                }],
            },
        };
        let problems =
            diagnose::findings(&plumbing, &record, &RuleSetState::Installed).iter().map(ToString::to_string).collect();
        let daemon = answering.then(|| PodAnswer {
            pod: "team-a/web".into(),
            role: Some("arn:aws:iam::123456789012:role/web".into()),
            resolution: "granted by config".into(),
            mode: Some("legacy".into()),
            credentials: Some(CredentialState {
                cached: true,
                usable: true,
                expiration: Some("2999-01-01T00:00:00Z".into()),
                last_updated: Some("2025-01-01T00:00:00Z".into()),
                error: None,
                failed_attempts: 0,
                retry_at: None,
                fetching: false,
            }),
        });
        ExplainReport {
            target: "team-a/web".into(),
            daemon: DaemonContact {
                socket: "/run/iamlink/iamlinkd.sock".into(),
                answering,
                error: (!answering).then(|| "connection refused".into()),
            },
            rule_set: RuleSetState::Installed,
            pods: vec![PodReport {
                record,
                record_file: "/run/iamlink/records/c1.eth0.json".into(),
                plumbing,
                daemon,
                attachments: InterfaceAttachments {
                    pod: "team-a/web".into(),
                    container_id: "c1".into(),
                    host_interface: "veth1".into(),
                    ebpf_guard: false,
                    attached: None,
                    error: Some("interface gone".into()),
                },
                problems,
                unchecked: vec![],
            }],
            orphan_entries: vec![],
            node_problems: vec![],
        }
    }

    #[test]
    fn a_healthy_pod_reads_as_one_block_with_its_role_and_cache() {
        let r = report(true, Some(1));
        assert!(!r.has_problems());
        let text = render_explain(&r, MarkMask::default());
        for want in [
            "pod team-a/web",
            "uid           u-1",
            "host iface    veth1 (index 7): present",
            "pod routes    169.254.169.254 via 198.18.64.1 dev eth0: ok",
            "interception  veth1 → slot-1 (mark 0x1 of mask 0x307f): ok",
            "role          arn:aws:iam::123456789012:role/web (granted by config)",
            "credentials   cached, expires 2999-01-01T00:00:00Z",
            "problems      none",
        ] {
            assert!(text.contains(want), "{want:?} missing in:\n{text}");
        }
    }

    #[test]
    fn with_the_daemon_down_the_plumbing_is_still_shown_and_the_role_unknown() {
        let r = report(false, None);
        assert!(r.has_problems());
        let text = render_explain(&r, MarkMask::default());
        assert!(text.starts_with(
            "iamlinkd is not answering on /run/iamlink/iamlinkd.sock: role and credential state unknown (daemon down?)"
        ));
        assert!(text.contains("role          unknown (iamlinkd not answering)"), "{text}");
        assert!(text.contains("interception  MISSING: no entry for veth1"), "{text}");
        assert!(text.contains("PROBLEMS      record without interception entry"), "{text}");
    }

    #[test]
    fn a_pod_netns_out_of_sight_counts_as_unknown_routes_not_missing_ones() {
        let unreadable = Finding::PodNetnsUnreadable { netns: "/run/x".into(), reason: "No such file".into() };
        let missing = Finding::PodRouteMissing { addr: "169.254.169.254".parse().unwrap() };
        let mut tally = Tally::default();
        tally.add(std::slice::from_ref(&unreadable));
        assert_eq!(tally, Tally { host_interface_gone: 0, pod_routes_missing: 0, pod_routes_unknown: 1 });
        tally.add(&[missing.clone(), missing.clone()]);
        assert_eq!(tally, Tally { host_interface_gone: 0, pod_routes_missing: 1, pod_routes_unknown: 1 });
        let (problems, unchecked) = split(&[unreadable, missing]);
        assert_eq!((problems.len(), unchecked.len()), (1, 1));
        assert!(problems[0].starts_with("pod route missing") && unchecked[0].starts_with("cannot look into"));
    }

    #[test]
    fn status_shows_unknown_routes_apart_from_problems() {
        let s = StatusReport {
            store_dir: "/run/iamlink".into(),
            daemon: DaemonContact { socket: "/run/iamlink/iamlinkd.sock".into(), answering: false, error: None },
            daemon_status: None,
            rule_set: RuleSetState::Installed,
            records: 1,
            unreadable_records: 0,
            interception_entries: 1,
            records_without_entry: 0,
            entries_without_record: 0,
            host_interface_gone: 0,
            pod_routes_missing: 0,
            pod_routes_unknown: 1,
            problems: vec![],
            unchecked: vec!["team-a/web: cannot look into the pod's network namespace /run/x: gone".into()],
            not_adopted: vec![],
            interfaces: vec![],
        };
        let text = render_status(&s);
        for want in [
            "pod routes missing         0\n",
            "pod routes unknown         1 (pod netns not readable from here)\n",
            "problems                   none\n",
            "could not check (not problems)\n  team-a/web: cannot look into",
        ] {
            assert!(text.contains(want), "{want:?} missing in:\n{text}");
        }
    }

    #[test]
    fn sts_failures_without_usable_credentials_are_problems() {
        let mut a = report(true, Some(1)).pods.remove(0).daemon.unwrap();
        assert!(daemon_findings(&a).is_empty());
        if let Some(c) = a.credentials.as_mut() {
            c.usable = false;
            c.error = Some("AccessDenied".into());
        }
        assert!(daemon_findings(&a)[0].contains("STS failed: AccessDenied"));
    }
}
