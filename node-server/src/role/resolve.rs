//! Which role a pod gets, decided from facts gathered elsewhere (the pod record, the Kubernetes
//! view, the config) without I/O, so that every precedence rule is cheap to test.
//!
//! Precedence, first match wins:
//! 1. the pod's `iam.amazonaws.com/role` annotation (kube2iam, kiam), from the API or, until the
//!    API has the pod, from the runtime at ADD;
//! 2. its service account's `eks.amazonaws.com/role-arn` annotation (IRSA);
//! 3. a `[[roles.association]]` for its namespace and service account (EKS Pod Identity style);
//! 4. a `[[roles.pod]]` entry for its namespace and name, then for its namespace;
//! 5. `roles.default`.
//!
//! A pod's `iamlink.io/target-role` chains from its `iam.amazonaws.com/role`: the target is
//! assumed with that role's credentials, and the namespace policy must allow both.
//!
//! The namespace policy then applies to the chosen role, whatever its source.
//!
//! Until the view has listed a resource since the daemon started, the facts come from the
//! snapshot the daemon kept of its last view ([`crate::role::kube_view`]); what neither knows is never
//! filled in by a lower-precedence source: the answer is pending (503) instead.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use iamlink_common::annotation::{self, MAX_ROLE_ARN};
use iamlink_common::{PodRef, EXTERNAL_ID_ANNOTATION, ROLE_ANNOTATION, TARGET_ROLE_ANNOTATION};

use crate::config::Association;
use crate::config::RolesConfig;
use crate::creds::token::TokenSource;
use crate::role::arn::{partition_refusal, valid_external_id, ArnError, Role};
use crate::role::policy;
use crate::role::session_options::SessionOptions;

/// The IRSA service-account annotation: the role's full ARN.
pub const IRSA_ROLE_ANNOTATION: &str = "eks.amazonaws.com/role-arn";
/// The IRSA token lifetime in seconds, used here as the session duration.
pub const IRSA_EXPIRATION_ANNOTATION: &str = "eks.amazonaws.com/token-expiration";
/// The longest token expiration kept: more digits than any number of seconds it may hold.
pub const MAX_EXPIRATION: usize = 20;

/// Where a pod's role came from, logged and audited with every answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    PodAnnotation,
    RuntimeAnnotation,
    ServiceAccount,
    Association,
    Config,
    Default,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::PodAnnotation => "pod annotation",
            Source::RuntimeAnnotation => "runtime pod annotation",
            Source::ServiceAccount => "service account annotation",
            Source::Association => "association",
            Source::Config => "config",
            Source::Default => "default role",
        }
    }
}

/// A role a pod may have, and how to assume it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub role: Role,
    pub source: Source,
    /// As the source wrote it (a name or an ARN): what the namespace policy matches.
    pub requested: String,
    /// The pod's `iam.amazonaws.com/external-id`; unset: the config's.
    pub external_id: Option<String>,
    /// The service account's token expiration; unset: the config's.
    pub duration_seconds: Option<u32>,
    /// What the session carries besides the role (chain, policy, tags, name); boxed, so that
    /// a refusal (the `Err` beside a grant) stays small.
    pub session: Box<SessionOptions>,
    /// The pod's `iam.amazonaws.com/role` as written, when its `iamlink.io/target-role` makes it
    /// the first hop of a chain: the namespace policy must allow it too.
    pub chained_from: Option<String>,
}

/// A pod's EKS Pod Identity token and the service account it runs as (its claims must say so).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub service_account: String,
    pub token: TokenSource,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    Granted(Grant),
    /// Nothing names a role for this pod.
    NoRole,
    /// A rule forbids the answer (403): namespace policy, sources that disagree, a bad annotation.
    Denied {
        outcome: &'static str,
        requested: String,
        reason: String,
    },
    /// Not decidable yet (503, SDKs retry): the API view has not bound the pod.
    Pending(String),
    /// EKS Pod Identity: the role is the one EKS names when the pod's token is exchanged
    /// ([`crate::role::pod_identity`] says when this outranks the sources above).
    PodIdentity(PodIdentity),
}

/// What the Kubernetes API view says about the pod behind a record.
#[derive(Clone, Copy, Debug)]
pub enum ApiPod<'a> {
    /// No Kubernetes source configured: roles come from the config only.
    Off,
    /// The view holds no object for this record (not listed yet); the reason.
    Unbound(&'a str),
    /// The view's object of that namespace and name has another UID: it is another pod (deleted
    /// and recreated, or the view lags behind); the reason.
    OtherUid(&'a str),
    /// The object whose namespace, name and UID match the record.
    Bound {
        annotations: &'a BTreeMap<String, String>,
        service_account: &'a str,
        service_account_annotations: ServiceAccountFacts<'a>,
    },
}

/// What is known of a bound pod's service account.
#[derive(Clone, Copy, Debug)]
pub enum ServiceAccountFacts<'a> {
    /// Its annotations, from the view or, before service accounts were first listed, the snapshot.
    Known(&'a BTreeMap<String, String>),
    /// Service accounts were listed and this one is not among them: it has no annotations.
    Absent,
    /// Service accounts not listed since the start and the snapshot lacks this one; the reason.
    /// Its IRSA role may exist, so nothing below it may answer.
    Unknown(&'a str),
}

/// What is known of the pod's namespace policy.
#[derive(Clone, Copy, Debug)]
pub enum NamespaceFacts<'a> {
    /// No Kubernetes source configured: roles come from the config, no policy applies.
    Off,
    /// The namespace's annotations in the view (empty: none, or the namespace is not in it).
    View(&'a BTreeMap<String, String>),
    /// Namespaces not listed since the start: the annotations from the daemon's snapshot
    /// (empty when the snapshot lacks the namespace, which then has no policy).
    Snapshot(&'a BTreeMap<String, String>),
    /// Namespaces not listed since the start and no snapshot: unchecked (the API being down must
    /// not take roles away), except under `require_namespace_permission`: pending.
    Unknown,
}

/// Everything [`Roles::resolve`] looks at.
#[derive(Clone, Copy, Debug)]
pub struct PodFacts<'a> {
    pub pod: &'a PodRef,
    /// The IAM annotations the runtime passed at ADD, when it passed any and they are trusted.
    pub runtime: Option<&'a BTreeMap<String, String>>,
    pub api: ApiPod<'a>,
    pub namespace: NamespaceFacts<'a>,
}

pub struct Roles {
    config: RolesConfig,
    require_namespace_permission: bool,
    /// `roles.base_arn`, or the daemon's own account's role prefix once discovered.
    base_arn: OnceLock<String>,
    policies: policy::Compiled,
    /// The STS endpoint's partition: a role ARN of another one is refused (STS would refuse it).
    partition: Option<&'static str>,
}

impl Roles {
    pub fn new(config: RolesConfig, require_namespace_permission: bool) -> Self {
        let base_arn = OnceLock::new();
        if let Some(base) = &config.base_arn {
            let _ = base_arn.set(base.clone());
        }
        Roles { config, require_namespace_permission, base_arn, policies: policy::Compiled::default(), partition: None }
    }

    /// Roles of `partition` only (the STS endpoint's); `None`: any.
    pub fn in_partition(self, partition: Option<&'static str>) -> Self {
        Roles { partition, ..self }
    }

    /// Sets the base ARN discovered from the daemon's identity; a configured one stays.
    pub fn discovered_base_arn(&self, base: String) {
        let _ = self.base_arn.set(base);
    }

    pub fn base_arn(&self) -> Option<&str> {
        self.base_arn.get().map(String::as_str)
    }

    pub fn resolve(&self, facts: &PodFacts) -> Resolution {
        let mut grant = match self.choose(facts) {
            Ok(Some(grant)) => grant,
            Ok(None) => return Resolution::NoRole,
            Err(refusal) => return refusal,
        };
        if let ApiPod::Bound { annotations, service_account, .. } = facts.api {
            grant.session.service_account = Some(service_account.to_string());
            let namespace = match facts.namespace {
                NamespaceFacts::View(a) | NamespaceFacts::Snapshot(a) => Some(a),
                NamespaceFacts::Off | NamespaceFacts::Unknown => None,
            };
            if let Err((outcome, reason)) = grant.session.annotated(annotations, namespace) {
                return Resolution::Denied { outcome, requested: grant.requested, reason };
            }
        }
        let require = self.require_namespace_permission;
        let (namespace, provenance) = match facts.namespace {
            NamespaceFacts::Off => return Resolution::Granted(grant),
            NamespaceFacts::View(annotations) => (annotations, ""),
            NamespaceFacts::Snapshot(annotations) => {
                (annotations, " (policy from iamlinkd's snapshot: namespaces not listed since it started)")
            }
            NamespaceFacts::Unknown if require => {
                return Resolution::Pending(
                    "namespaces not listed since iamlinkd started and no snapshot of their policies; \
                     require_namespace_permission holds every role until they are"
                        .into(),
                )
            }
            NamespaceFacts::Unknown => return Resolution::Granted(grant),
        };
        let to_arn = |name: &str| self.base_arn().map(|b| format!("{b}{name}"));
        let first = grant.chained_from.as_deref().zip(grant.session.via.as_ref());
        let checks = first.into_iter().map(|(requested, role)| (requested, role, "")).chain([(
            grant.requested.as_str(),
            &grant.role,
            if first.is_some() { " (the pod's iamlink.io/target-role)" } else { "" },
        )]);
        for (requested, role, which) in checks {
            if let Err(denied) = policy::permits(&self.policies, namespace, role, requested, require, to_arn) {
                return Resolution::Denied {
                    outcome: "denied by policy",
                    requested: requested.to_string(),
                    reason: format!("{}{which}{provenance}", denied.0),
                };
            }
        }
        Resolution::Granted(grant)
    }

    fn choose(&self, facts: &PodFacts) -> Result<Option<Grant>, Resolution> {
        match facts.api {
            ApiPod::Off => self.configured(facts.pod),
            ApiPod::OtherUid(why) => Err(Resolution::Pending(why.to_string())),
            // Only the pod's own annotation outranks what the view would add; anything else is a guess.
            ApiPod::Unbound(why) => match facts.runtime {
                Some(runtime)
                    if runtime.contains_key(ROLE_ANNOTATION) || runtime.contains_key(TARGET_ROLE_ANNOTATION) =>
                {
                    self.annotated(Source::RuntimeAnnotation, runtime).map(Some)
                }
                _ => Err(Resolution::Pending(why.to_string())),
            },
            ApiPod::Bound { annotations, service_account, service_account_annotations } => {
                if let Some(runtime) = facts.runtime {
                    disagreement(runtime, annotations)?;
                }
                if annotations.contains_key(ROLE_ANNOTATION) || annotations.contains_key(TARGET_ROLE_ANNOTATION) {
                    return self.annotated(Source::PodAnnotation, annotations).map(Some);
                }
                let sa = match service_account_annotations {
                    ServiceAccountFacts::Known(annotations) => Some(annotations),
                    ServiceAccountFacts::Absent => None,
                    ServiceAccountFacts::Unknown(why) => return Err(Resolution::Pending(why.to_string())),
                };
                if let Some(arn) = sa.and_then(|a| a.get(IRSA_ROLE_ANNOTATION)) {
                    let duration = sa.and_then(|a| a.get(IRSA_EXPIRATION_ANNOTATION)).and_then(|d| session_duration(d));
                    return self.grant(Source::ServiceAccount, arn, None, duration).map(Some);
                }
                let association = self
                    .config
                    .association
                    .iter()
                    .find(|a| a.namespace == facts.pod.namespace && a.service_account == service_account);
                if let Some(a) = association {
                    return self.associated(a).map(Some);
                }
                self.configured(facts.pod)
            }
        }
    }

    /// The pod's annotated role, or its `iamlink.io/target-role` assumed with that role's
    /// credentials (the pod's external ID on the first hop, as for its own role). A target alone
    /// is refused: what it would be assumed with is the pod's to name, never a lower source's.
    fn annotated(&self, source: Source, annotations: &BTreeMap<String, String>) -> Result<Grant, Resolution> {
        let target = annotations.get(TARGET_ROLE_ANNOTATION);
        let Some(role) = annotations.get(ROLE_ANNOTATION) else {
            return Err(Resolution::Denied {
                outcome: "invalid role",
                requested: target.cloned().unwrap_or_default(),
                reason: format!(
                    "{TARGET_ROLE_ANNOTATION} needs {ROLE_ANNOTATION}: the target is assumed with that role's credentials"
                ),
            });
        };
        let first = self.grant(source, role, external_id(Some(annotations)), None)?;
        let Some(target) = target else { return Ok(first) };
        let mut grant = self.grant(source, target, None, None).map_err(|refusal| match refusal {
            Resolution::Denied { outcome, requested, reason } => {
                Resolution::Denied { outcome, requested, reason: format!("{TARGET_ROLE_ANNOTATION}: {reason}") }
            }
            other => other,
        })?;
        grant.external_id = first.external_id;
        grant.session.via = Some(first.role);
        grant.chained_from = Some(first.requested);
        Ok(grant)
    }

    /// An association's grant: its role, or its target assumed with its role's credentials.
    fn associated(&self, a: &Association) -> Result<Grant, Resolution> {
        let Some(target) = &a.target_role else {
            let mut grant = self.grant(Source::Association, &a.role, None, None)?;
            grant.session = Box::new(SessionOptions::of_association(a, None));
            return Ok(grant);
        };
        let first = self.grant(Source::Association, &a.role, None, None)?;
        let mut grant = self.grant(Source::Association, target, None, None)?;
        grant.session = Box::new(SessionOptions::of_association(a, Some(first.role)));
        Ok(grant)
    }

    /// The most specific `[[roles.pod]]` entry: namespace and name, then namespace; then the default.
    fn configured(&self, pod: &PodRef) -> Result<Option<Grant>, Resolution> {
        let pods = &self.config.pod;
        let exact = pods.iter().find(|p| p.namespace == pod.namespace && p.name.as_deref() == Some(&pod.name));
        let namespace = || pods.iter().find(|p| p.namespace == pod.namespace && p.name.is_none());
        match exact.or_else(namespace) {
            Some(entry) => self.grant(Source::Config, &entry.role, None, None).map(Some),
            None => match &self.config.default {
                Some(role) => self.grant(Source::Default, role, None, None).map(Some),
                None => Ok(None),
            },
        }
    }

    fn grant(
        &self,
        source: Source,
        requested: &str,
        external_id: Option<&String>,
        duration_seconds: Option<u32>,
    ) -> Result<Grant, Resolution> {
        let denied =
            |reason: String| Resolution::Denied { outcome: "invalid role", requested: requested.into(), reason };
        if let Some(bytes) = annotation::oversized(requested) {
            return Err(denied(format!(
                "the {} is {bytes} bytes long, longer than any role ARN ({MAX_ROLE_ARN})",
                source.as_str()
            )));
        }
        let role = Role::parse(requested, self.base_arn()).map_err(|e| match e {
            ArnError::Invalid(_) => denied(e.to_string()),
            ArnError::NoBase(_) => Resolution::Pending(format!(
                "role {requested:?} is a name and the base ARN is not known yet (roles.base_arn unset, \
                 sts:GetCallerIdentity not answered)"
            )),
        })?;
        if let Some(why) = self.partition.and_then(|p| partition_refusal(role.arn(), p)) {
            return Err(denied(format!("the {} {why}", source.as_str())));
        }
        if let Some(id) = external_id.filter(|id| !valid_external_id(id)) {
            return Err(Resolution::Denied {
                outcome: "invalid external id",
                requested: requested.into(),
                reason: format!("{EXTERNAL_ID_ANNOTATION} {id:?} must be 2-1224 characters of [\\w+=,.@:/-]"),
            });
        }
        Ok(Grant {
            role,
            source,
            requested: requested.to_string(),
            external_id: external_id.cloned(),
            duration_seconds,
            session: Box::default(),
            chained_from: None,
        })
    }
}

fn external_id(annotations: Option<&BTreeMap<String, String>>) -> Option<&String> {
    annotations.and_then(|a| a.get(EXTERNAL_ID_ANNOTATION))
}

/// The runtime's snapshot and the API must name the same role and external ID, or neither is believed.
fn disagreement(runtime: &BTreeMap<String, String>, api: &BTreeMap<String, String>) -> Result<(), Resolution> {
    for key in [ROLE_ANNOTATION, EXTERNAL_ID_ANNOTATION, TARGET_ROLE_ANNOTATION] {
        let (at_add, now) = (runtime.get(key), api.get(key));
        if at_add != now {
            return Err(Resolution::Denied {
                outcome: "annotations disagree",
                requested: now.or(at_add).cloned().unwrap_or_default(),
                reason: format!(
                    "the runtime passed {key}={} at network setup and the API says {}; recreate the pod to change it",
                    at_add.map_or("(none)".into(), |v| format!("{v:?}")),
                    now.map_or("(none)".into(), |v| format!("{v:?}")),
                ),
            });
        }
    }
    Ok(())
}

/// IRSA token lifetimes are 3600..=86400 s; STS sessions last 900..=43200 s.
fn session_duration(seconds: &str) -> Option<u32> {
    seconds.trim().parse::<u32>().ok().map(|s| s.clamp(900, 43200))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Association, PodRole};

    const BASE: &str = "arn:aws:iam::123456789012:role/";

    fn pod(ns: &str, name: &str) -> PodRef {
        PodRef { namespace: ns.into(), name: name.into(), uid: "u1".into() }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn roles() -> Roles {
        Roles::new(
            RolesConfig {
                base_arn: Some(BASE.into()),
                default: None,
                pod: vec![
                    PodRole { namespace: "a".into(), name: None, role: "ns-a".into() },
                    PodRole { namespace: "a".into(), name: Some("web".into()), role: "web".into() },
                    PodRole { namespace: "b".into(), name: None, role: "arn:aws:iam::123456789012:role/path/b".into() },
                ],
                association: vec![Association {
                    namespace: "a".into(),
                    service_account: "builder".into(),
                    role: "assoc".into(),
                    target_role: None,
                    external_id: None,
                    session_policy: None,
                    session_tags: true,
                    session_name: None,
                }],
                ..RolesConfig::default()
            },
            false,
        )
    }

    fn static_only(pod: &PodRef) -> PodFacts<'_> {
        PodFacts { pod, runtime: None, api: ApiPod::Off, namespace: NamespaceFacts::Off }
    }

    fn granted(r: Resolution) -> Grant {
        match r {
            Resolution::Granted(g) => g,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    #[test]
    fn most_specific_config_entry_wins_and_names_join_the_base_arn() {
        let r = roles();
        let web = pod("a", "web");
        assert_eq!(granted(r.resolve(&static_only(&web))).role.arn(), format!("{BASE}web"));
        let other = pod("a", "other");
        assert_eq!(granted(r.resolve(&static_only(&other))).role.name(), "ns-a");
        let b = pod("b", "x");
        let g = granted(r.resolve(&static_only(&b)));
        assert_eq!((g.role.name(), g.source), ("b", Source::Config));
        assert_eq!(r.resolve(&static_only(&pod("c", "x"))), Resolution::NoRole, "no default configured");
    }

    #[test]
    fn an_annotated_role_of_another_partition_than_the_endpoints_is_refused_with_the_reason() {
        let r = roles().in_partition(Some("aws-cn"));
        let web = pod("a", "web");
        let none = BTreeMap::new();
        let facts = |annotations| PodFacts {
            pod: &web,
            runtime: None,
            api: ApiPod::Bound {
                annotations,
                service_account: "default",
                service_account_annotations: ServiceAccountFacts::Known(&none),
            },
            namespace: NamespaceFacts::Off,
        };
        let cn = map(&[(ROLE_ANNOTATION, "arn:aws-cn:iam::123456789012:role/cn")]);
        assert_eq!(granted(r.resolve(&facts(&cn))).role.name(), "cn");
        let aws = map(&[(ROLE_ANNOTATION, "arn:aws:iam::123456789012:role/other")]);
        match r.resolve(&facts(&aws)) {
            Resolution::Denied { reason, .. } => {
                assert!(reason.contains("pod annotation") && reason.contains("partition aws-cn"), "{reason}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let moon = map(&[(ROLE_ANNOTATION, "arn:aws-moon:iam::123456789012:role/m")]);
        assert!(
            matches!(r.resolve(&facts(&moon)), Resolution::Denied { reason, .. } if reason.contains("not an AWS partition"))
        );
    }

    #[test]
    fn default_role_applies_only_when_configured() {
        let r = Roles::new(
            RolesConfig { base_arn: Some(BASE.into()), default: Some("d".into()), ..Default::default() },
            false,
        );
        let p = pod("x", "y");
        let g = granted(r.resolve(&static_only(&p)));
        assert_eq!((g.role.arn(), g.source), ("arn:aws:iam::123456789012:role/d", Source::Default));
    }

    #[test]
    fn precedence_pod_annotation_then_service_account_then_association_then_config() {
        let r = roles();
        let web = pod("a", "web");
        let irsa = map(&[(IRSA_ROLE_ANNOTATION, "arn:aws:iam::123456789012:role/irsa")]);
        let pod_ann = map(&[(ROLE_ANNOTATION, "annotated")]);
        let none = BTreeMap::new();
        let facts = |annotations, service_account, sa: Option<_>| PodFacts {
            pod: &web,
            runtime: None,
            api: ApiPod::Bound {
                annotations,
                service_account,
                service_account_annotations: sa.map_or(ServiceAccountFacts::Absent, ServiceAccountFacts::Known),
            },
            namespace: NamespaceFacts::Off,
        };
        let g = granted(r.resolve(&facts(&pod_ann, "builder", Some(&irsa))));
        assert_eq!((g.role.name(), g.source), ("annotated", Source::PodAnnotation));
        let g = granted(r.resolve(&facts(&none, "builder", Some(&irsa))));
        assert_eq!((g.role.name(), g.source), ("irsa", Source::ServiceAccount));
        let g = granted(r.resolve(&facts(&none, "builder", Some(&none))));
        assert_eq!((g.role.name(), g.source), ("assoc", Source::Association));
        let g = granted(r.resolve(&facts(&none, "default", None)));
        assert_eq!((g.role.name(), g.source), ("web", Source::Config));
    }

    #[test]
    fn an_annotation_kept_as_invalid_is_refused_never_another_role() {
        // The service account "builder" of namespace "a" has an association and the namespace a
        // configured role: the lower sources an over-long annotation must not fall through to.
        let no_base = || Roles::new(RolesConfig { base_arn: None, ..roles().config }, false);
        let web = pod("a", "web");
        let marker = annotation::bounded(&format!("{BASE}admin{}", "0".repeat(250 * 1024)), MAX_ROLE_ARN);
        let sa = map(&[(IRSA_ROLE_ANNOTATION, &marker)]);
        let on_pod = map(&[(ROLE_ANNOTATION, &marker)]);
        let none = BTreeMap::new();
        for (annotations, sa, runtime) in [(&none, &sa, None), (&on_pod, &none, None), (&on_pod, &none, Some(&on_pod))]
        {
            let api = ApiPod::Bound {
                annotations,
                service_account: "builder",
                service_account_annotations: ServiceAccountFacts::Known(sa),
            };
            let facts = PodFacts { pod: &web, runtime, api, namespace: NamespaceFacts::Off };
            for r in [roles(), no_base()] {
                match r.resolve(&facts) {
                    Resolution::Denied { outcome: "invalid role", reason, .. } => {
                        assert!(reason.contains(&format!("{} bytes", 250 * 1024 + BASE.len() + 5)), "{reason}")
                    }
                    other => panic!("expected 403 for {marker}, got {other:?}"),
                }
            }
        }
    }

    #[test]
    fn irsa_token_expiration_becomes_the_session_duration() {
        let r = roles();
        let p = pod("z", "p");
        let none = BTreeMap::new();
        for (expiration, want) in [("7200", Some(7200)), ("86400", Some(43200)), ("60", Some(900)), ("soon", None)] {
            let sa = map(&[
                (IRSA_ROLE_ANNOTATION, "arn:aws:iam::123456789012:role/irsa"),
                (IRSA_EXPIRATION_ANNOTATION, expiration),
            ]);
            let api = ApiPod::Bound {
                annotations: &none,
                service_account: "sa",
                service_account_annotations: ServiceAccountFacts::Known(&sa),
            };
            let g = granted(r.resolve(&PodFacts { pod: &p, runtime: None, api, namespace: NamespaceFacts::Off }));
            assert_eq!(g.duration_seconds, want, "{expiration}");
        }
    }

    #[test]
    fn unbound_pod_is_pending_unless_the_runtime_named_its_role() {
        let r = roles();
        let web = pod("a", "web");
        let unbound = ApiPod::Unbound("pod not in the API view yet");
        let facts = PodFacts { pod: &web, runtime: None, api: unbound, namespace: NamespaceFacts::Off };
        assert_eq!(
            r.resolve(&facts),
            Resolution::Pending("pod not in the API view yet".into()),
            "never the config's guess"
        );
        let runtime = map(&[(ROLE_ANNOTATION, "from-runtime"), (EXTERNAL_ID_ANNOTATION, "ext-1")]);
        let g = granted(r.resolve(&PodFacts { runtime: Some(&runtime), ..facts }));
        assert_eq!(
            (g.role.name(), g.source, g.external_id.as_deref()),
            ("from-runtime", Source::RuntimeAnnotation, Some("ext-1"))
        );
        let empty = BTreeMap::new();
        assert!(matches!(r.resolve(&PodFacts { runtime: Some(&empty), ..facts }), Resolution::Pending(_)));
        // An object of another UID is another pod: not even the runtime's annotation is served.
        let other = PodFacts { runtime: Some(&runtime), api: ApiPod::OtherUid("UID differs"), ..facts };
        assert_eq!(r.resolve(&other), Resolution::Pending("UID differs".into()));
    }

    #[test]
    fn runtime_and_api_must_agree() {
        let r = roles();
        let web = pod("a", "web");
        let runtime = map(&[(ROLE_ANNOTATION, "old")]);
        let api = map(&[(ROLE_ANNOTATION, "new")]);
        let bound = ApiPod::Bound {
            annotations: &api,
            service_account: "default",
            service_account_annotations: ServiceAccountFacts::Absent,
        };
        let facts = PodFacts { pod: &web, runtime: Some(&runtime), api: bound, namespace: NamespaceFacts::Off };
        match r.resolve(&facts) {
            Resolution::Denied { outcome, reason, .. } => {
                assert_eq!(outcome, "annotations disagree");
                assert!(reason.contains("\"old\"") && reason.contains("\"new\""), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let same = PodFacts { runtime: Some(&api), ..facts };
        assert_eq!(granted(r.resolve(&same)).source, Source::PodAnnotation);
    }

    #[test]
    fn namespace_policy_applies_to_every_source() {
        let r = roles();
        let web = pod("a", "web");
        let policy = map(&[(policy::PERMITTED_ANNOTATION, "ns-a")]);
        let facts = PodFacts { pod: &web, runtime: None, api: ApiPod::Off, namespace: NamespaceFacts::View(&policy) };
        match r.resolve(&facts) {
            Resolution::Denied { outcome, requested, reason } => {
                assert_eq!((outcome, requested.as_str()), ("denied by policy", "web"));
                assert!(reason.contains("ns-a"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let other = pod("a", "other");
        assert_eq!(granted(r.resolve(&PodFacts { pod: &other, ..facts })).role.name(), "ns-a");
    }

    /// `roles()` plus a default role: the lowest-precedence guess a pod must never get by accident.
    fn roles_with_default(require_namespace_permission: bool) -> Roles {
        let mut config = roles().config;
        config.default = Some("guess".into());
        Roles::new(config, require_namespace_permission)
    }

    #[test]
    fn before_the_first_namespace_list_the_snapshot_policy_applies() {
        let web = pod("locked", "web");
        let runtime = map(&[(ROLE_ANNOTATION, "admin")]);
        let policy = map(&[(policy::PERMITTED_ANNOTATION, "web")]);
        let unbound = ApiPod::Unbound("pods not listed yet");
        let facts =
            PodFacts { pod: &web, runtime: Some(&runtime), api: unbound, namespace: NamespaceFacts::Snapshot(&policy) };
        for require in [false, true] {
            match roles_with_default(require).resolve(&facts) {
                Resolution::Denied { outcome: "denied by policy", requested, reason } => {
                    assert_eq!(requested, "admin");
                    assert!(reason.contains("\"web\"") && reason.contains("snapshot"), "{reason}");
                }
                other => panic!("require={require}: {other:?}"),
            }
        }
        let permitted = map(&[(ROLE_ANNOTATION, "web")]);
        let g = granted(roles().resolve(&PodFacts { runtime: Some(&permitted), ..facts }));
        assert_eq!((g.role.name(), g.source), ("web", Source::RuntimeAnnotation));
    }

    #[test]
    fn a_namespace_missing_from_the_snapshot_has_no_policy_so_require_refuses() {
        let p = pod("new-ns", "p");
        let runtime = map(&[(ROLE_ANNOTATION, "web")]);
        let empty = BTreeMap::new();
        let facts = PodFacts {
            pod: &p,
            runtime: Some(&runtime),
            api: ApiPod::Unbound("pods not listed yet"),
            namespace: NamespaceFacts::Snapshot(&empty),
        };
        assert_eq!(granted(roles_with_default(false).resolve(&facts)).role.name(), "web");
        assert!(matches!(
            roles_with_default(true).resolve(&facts),
            Resolution::Denied { outcome: "denied by policy", .. }
        ));
    }

    #[test]
    fn no_namespace_list_and_no_snapshot_is_unchecked_unless_permission_is_required() {
        let p = pod("a", "p");
        let runtime = map(&[(ROLE_ANNOTATION, "web")]);
        let facts = PodFacts {
            pod: &p,
            runtime: Some(&runtime),
            api: ApiPod::Unbound("pods not listed yet"),
            namespace: NamespaceFacts::Unknown,
        };
        assert_eq!(granted(roles_with_default(false).resolve(&facts)).role.name(), "web");
        match roles_with_default(true).resolve(&facts) {
            Resolution::Pending(why) => assert!(why.contains("require_namespace_permission"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Nothing to check when nothing names a role.
        let none = BTreeMap::new();
        let api = ApiPod::Bound {
            annotations: &none,
            service_account: "sa",
            service_account_annotations: ServiceAccountFacts::Absent,
        };
        let nothing = PodFacts { pod: &pod("z", "p"), runtime: None, api, namespace: NamespaceFacts::Unknown };
        assert_eq!(roles().resolve(&nothing), Resolution::NoRole);
    }

    #[test]
    fn an_unknown_service_account_is_pending_never_the_association_config_or_default() {
        let r = roles_with_default(false);
        let none = BTreeMap::new();
        // "builder" has an association, "a" a [[roles.pod]] entry, and there is a default: all guesses.
        for (ns, name, sa) in [("a", "web", "builder"), ("a", "other", "x"), ("z", "p", "x")] {
            let p = pod(ns, name);
            let api = ApiPod::Bound {
                annotations: &none,
                service_account: sa,
                service_account_annotations: ServiceAccountFacts::Unknown("service accounts not listed"),
            };
            let facts = PodFacts { pod: &p, runtime: None, api, namespace: NamespaceFacts::Off };
            assert_eq!(r.resolve(&facts), Resolution::Pending("service accounts not listed".into()), "{ns}/{name}");
        }
        // The pod's own annotation outranks the service account: it still answers.
        let p = pod("a", "web");
        let ann = map(&[(ROLE_ANNOTATION, "annotated")]);
        let api = ApiPod::Bound {
            annotations: &ann,
            service_account: "builder",
            service_account_annotations: ServiceAccountFacts::Unknown("service accounts not listed"),
        };
        let g = granted(r.resolve(&PodFacts { pod: &p, runtime: None, api, namespace: NamespaceFacts::Off }));
        assert_eq!((g.role.name(), g.source), ("annotated", Source::PodAnnotation));
    }

    #[test]
    fn a_known_service_account_without_irsa_falls_through_and_an_absent_one_too() {
        let r = roles();
        let p = pod("a", "web");
        let none = BTreeMap::new();
        for sa in [ServiceAccountFacts::Known(&none), ServiceAccountFacts::Absent] {
            let api = ApiPod::Bound { annotations: &none, service_account: "builder", service_account_annotations: sa };
            let g = granted(r.resolve(&PodFacts { pod: &p, runtime: None, api, namespace: NamespaceFacts::Off }));
            assert_eq!((g.role.name(), g.source), ("assoc", Source::Association), "{sa:?}");
        }
    }

    #[test]
    fn annotations_that_are_not_roles_are_refused() {
        let r = roles();
        let p = pod("x", "p");
        for bad in [
            "../admin",
            "a b",
            "arn:aws:iam::123:role/x",
            "arn:aws:s3:::bucket",
            "arn:aws:iam::123456789012:user/u",
            "",
        ] {
            let ann = map(&[(ROLE_ANNOTATION, bad)]);
            let api = ApiPod::Bound {
                annotations: &ann,
                service_account: "sa",
                service_account_annotations: ServiceAccountFacts::Absent,
            };
            let res = r.resolve(&PodFacts { pod: &p, runtime: None, api, namespace: NamespaceFacts::Off });
            assert!(matches!(res, Resolution::Denied { outcome: "invalid role", .. }), "{bad:?}: {res:?}");
        }
        let ann = map(&[(ROLE_ANNOTATION, "ok"), (EXTERNAL_ID_ANNOTATION, "x")]);
        let api = ApiPod::Bound {
            annotations: &ann,
            service_account: "sa",
            service_account_annotations: ServiceAccountFacts::Absent,
        };
        let res = r.resolve(&PodFacts { pod: &p, runtime: None, api, namespace: NamespaceFacts::Off });
        assert!(matches!(res, Resolution::Denied { outcome: "invalid external id", .. }), "{res:?}");
    }

    #[test]
    fn names_wait_for_a_discovered_base_arn() {
        let r = Roles::new(RolesConfig::default(), false);
        let p = pod("x", "p");
        let ann = map(&[(ROLE_ANNOTATION, "web")]);
        let api = ApiPod::Bound {
            annotations: &ann,
            service_account: "sa",
            service_account_annotations: ServiceAccountFacts::Absent,
        };
        let facts = PodFacts { pod: &p, runtime: None, api, namespace: NamespaceFacts::Off };
        assert!(matches!(r.resolve(&facts), Resolution::Pending(_)));
        r.discovered_base_arn(BASE.into());
        assert_eq!(granted(r.resolve(&facts)).role.arn(), format!("{BASE}web"));
    }

    /// A pod bound in the view with `annotations`, its namespace's `policy` annotations.
    fn bound<'a>(
        p: &'a PodRef,
        annotations: &'a BTreeMap<String, String>,
        runtime: Option<&'a BTreeMap<String, String>>,
        policy: &'a BTreeMap<String, String>,
    ) -> PodFacts<'a> {
        let api = ApiPod::Bound {
            annotations,
            service_account: "sa",
            service_account_annotations: ServiceAccountFacts::Absent,
        };
        PodFacts { pod: p, runtime, api, namespace: NamespaceFacts::View(policy) }
    }

    const TARGET: &str = "arn:aws:iam::210987654321:role/reports-reader";

    #[test]
    fn a_target_role_annotation_chains_from_the_pods_role_with_its_external_id_on_the_first_hop() {
        let p = pod("x", "p");
        let ann =
            map(&[(ROLE_ANNOTATION, "first"), (TARGET_ROLE_ANNOTATION, TARGET), (EXTERNAL_ID_ANNOTATION, "ext-1")]);
        let none = BTreeMap::new();
        let g = granted(roles().resolve(&bound(&p, &ann, None, &none)));
        assert_eq!((g.role.arn(), g.source, g.requested.as_str()), (TARGET, Source::PodAnnotation, TARGET));
        assert_eq!(g.session.via.as_ref().map(Role::arn), Some(format!("{BASE}first").as_str()));
        assert_eq!((g.external_id.as_deref(), g.session.external_id.as_deref()), (Some("ext-1"), None));
        // A name is joined to the base ARN, like the role annotation's.
        let by_name = map(&[(ROLE_ANNOTATION, "first"), (TARGET_ROLE_ANNOTATION, "second")]);
        assert_eq!(granted(roles().resolve(&bound(&p, &by_name, None, &none))).role.arn(), format!("{BASE}second"));
        // The runtime's annotations chain the same way before the view has the pod.
        let unbound =
            PodFacts { api: ApiPod::Unbound("not listed"), runtime: Some(&ann), ..bound(&p, &ann, None, &none) };
        let g = granted(roles().resolve(&unbound));
        assert_eq!((g.role.arn(), g.source), (TARGET, Source::RuntimeAnnotation));
        assert!(g.session.via.is_some());
    }

    #[test]
    fn the_namespace_policy_must_allow_both_roles_of_an_annotated_chain() {
        let p = pod("x", "p");
        let ann = map(&[(ROLE_ANNOTATION, "first"), (TARGET_ROLE_ANNOTATION, TARGET)]);
        let only_first = map(&[(policy::ALLOWED_ROLES_ANNOTATION, r#"["first"]"#)]);
        match roles().resolve(&bound(&p, &ann, None, &only_first)) {
            Resolution::Denied { outcome: "denied by policy", requested, reason } => {
                assert_eq!(requested, TARGET);
                assert!(reason.contains("reports-reader") && reason.contains(TARGET_ROLE_ANNOTATION), "{reason}");
            }
            other => panic!("a forbidden target must be refused, got {other:?}"),
        }
        let only_target = map(&[(policy::ALLOWED_ROLES_ANNOTATION, &format!(r#"["{TARGET}"]"#))]);
        match roles().resolve(&bound(&p, &ann, None, &only_target)) {
            Resolution::Denied { outcome: "denied by policy", requested, .. } => assert_eq!(requested, "first"),
            other => panic!("a forbidden first role must be refused, got {other:?}"),
        }
        let both = map(&[(policy::ALLOWED_ROLES_ANNOTATION, &format!(r#"["first", "{TARGET}"]"#))]);
        assert_eq!(granted(roles().resolve(&bound(&p, &ann, None, &both))).role.arn(), TARGET);
    }

    #[test]
    fn a_target_without_a_role_or_that_is_not_a_role_is_refused_never_chained_from_another_source() {
        // "a"/"web" has a configured role and "builder" an association: neither may be the first hop.
        let p = pod("a", "web");
        let none = BTreeMap::new();
        let alone = map(&[(TARGET_ROLE_ANNOTATION, TARGET)]);
        for facts in [
            bound(&p, &alone, None, &none),
            PodFacts { api: ApiPod::Unbound("not listed"), runtime: Some(&alone), ..bound(&p, &alone, None, &none) },
        ] {
            match roles().resolve(&facts) {
                Resolution::Denied { outcome: "invalid role", reason, .. } => {
                    assert!(reason.contains("needs iam.amazonaws.com/role"), "{reason}")
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        for bad in ["arn:aws:iam::123:role/x", "arn:aws:s3:::bucket", "a b"] {
            let ann = map(&[(ROLE_ANNOTATION, "first"), (TARGET_ROLE_ANNOTATION, bad)]);
            match roles().resolve(&bound(&p, &ann, None, &none)) {
                Resolution::Denied { outcome: "invalid role", requested, reason } => {
                    assert_eq!(requested, bad);
                    assert!(reason.starts_with(TARGET_ROLE_ANNOTATION), "{reason}");
                }
                other => panic!("{bad:?}: expected a refusal, got {other:?}"),
            }
        }
    }

    #[test]
    fn runtime_and_api_must_agree_on_the_target_role() {
        let p = pod("x", "p");
        let none = BTreeMap::new();
        let runtime = map(&[(ROLE_ANNOTATION, "first")]);
        let api = map(&[(ROLE_ANNOTATION, "first"), (TARGET_ROLE_ANNOTATION, TARGET)]);
        match roles().resolve(&bound(&p, &api, Some(&runtime), &none)) {
            Resolution::Denied { outcome: "annotations disagree", reason, .. } => {
                assert!(reason.contains(TARGET_ROLE_ANNOTATION) && reason.contains("(none)"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(granted(roles().resolve(&bound(&p, &api, Some(&api), &none))).role.arn(), TARGET);
    }
}
