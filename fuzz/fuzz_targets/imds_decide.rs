//! iamlinkd's request → answer decision, driven by real HTTP/1.1 request heads.
//!
//! Input: one line of pod facts, then a request head as a pod would send it:
//!
//! ```text
//! v1 role=arn:aws:iam::123456789012:role/web allow=/a,/b
//! GET /latest/meta-data/iam/security-credentials/web HTTP/1.1
//! x-aws-ec2-metadata-token: @token
//! ```
//!
//! Facts words: `cc` (the pod dialled the container-credentials address, else the metadata
//! address), `v1` (IMDSv1 allowed, else only v2), `role=<arn>` (else no role), `denied` (the
//! role is refused by policy), `pending` (the pod is not known yet), `allow=<paths>`
//! (comma-separated proxy_allow; absent: the config's default list). The head is parsed with
//! httparse and turned into hyper's types as hyper does, skipping what hyper would refuse. A header
//! value starting with `@token`, `@other`, `@expired` or `@forged` is replaced by a real token:
//! issued for this pod's binding, for another binding, expired, or with its expiry altered.
//!
//! Beyond "no panic", every decision is checked against what the request and facts allow.
#![no_main]

use std::cell::Cell;
use std::sync::OnceLock;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Uri};
use iamlinkd::config::Config;
use iamlinkd::request::identify::Destination;
use iamlinkd::request::imds::{decide, Decision, Facts, CONTAINER_CREDENTIALS_PATH, TOKEN_PATH};
use iamlinkd::request::proxy::not_plain;
use iamlinkd::role::{Grant, Resolution, Role, Source};
use iamlinkd::request::tokens::{parse_ttl, TokenError, Tokens, TOKEN_HEADER, TTL_HEADER};
use libfuzzer_sys::fuzz_target;

const CREDENTIALS_PATH: &str = "/latest/meta-data/iam/security-credentials";
const INFO_PATH: &str = "/latest/meta-data/iam/info";
const NOW: u64 = 1_700_000_000;
/// `containerID/ifname/createdBoottimeNs`, as iamlinkd binds tokens.
const BINDING: &str = "4f3c9a2e1b7d/eth0/8123456789";
/// The same attachment, recreated: its tokens must not work for the pod above.
const OTHER_BINDING: &str = "4f3c9a2e1b7d/eth0/8123456790";

struct Fixture {
    tokens: Tokens,
    default_allow: Vec<String>,
    /// (placeholder, token) pairs, the valid one first.
    placeholders: [(&'static str, String); 4],
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tokens = Tokens::new().expect("random key");
        let valid = tokens.issue(BINDING, 21600, NOW);
        let (expiry, sig) = valid.split_once('.').unwrap();
        let forged = format!("{}.{sig}", expiry.parse::<u64>().unwrap() + 1000);
        let placeholders = [
            ("@token", valid),
            ("@other", tokens.issue(OTHER_BINDING, 21600, NOW)),
            ("@expired", tokens.issue(BINDING, 60, NOW - 61)),
            ("@forged", forged),
        ];
        let default_allow = Config::parse("listen = \"198.18.0.1:8181\"").expect("minimal config").proxy_allow;
        Fixture { tokens, default_allow, placeholders }
    })
}

/// `FUZZ_DEBUG=1` prints each decision, to see what the seeds reach.
fn debug() -> bool {
    static D: OnceLock<bool> = OnceLock::new();
    *D.get_or_init(|| std::env::var_os("FUZZ_DEBUG").is_some())
}

fn substitute(value: &[u8], f: &Fixture) -> Vec<u8> {
    for (name, token) in &f.placeholders {
        if let Some(rest) = value.strip_prefix(name.as_bytes()) {
            return [token.as_bytes(), rest].concat();
        }
    }
    value.to_vec()
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some(nl) = data.iter().position(|&b| b == b'\n') else { return };
    let Ok(facts_line) = std::str::from_utf8(&data[..nl]) else { return };
    let head = &data[nl + 1..];

    let mut imdsv1 = false;
    let mut to = Destination::Metadata;
    let mut role = None;
    let (mut denied, mut pending) = (false, false);
    let mut proxy_allow = f.default_allow.clone();
    for word in facts_line.split(' ') {
        if word == "v1" {
            imdsv1 = true;
        } else if word == "cc" {
            to = Destination::Credentials;
        } else if word == "denied" {
            denied = true;
        } else if word == "pending" {
            pending = true;
        } else if let Some(arn) = word.strip_prefix("role=") {
            role = Role::parse(arn, None).ok();
        } else if let Some(list) = word.strip_prefix("allow=") {
            proxy_allow = list.split(',').filter(|p| !p.is_empty()).map(String::from).collect();
        }
    }

    // The request head, as hyper's HTTP/1 server reads it.
    let mut parsed_headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut parsed_headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else { return };
    let (Some(method), Some(target)) = (req.method, req.path) else { return };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else { return };
    let Ok(uri) = target.parse::<Uri>() else { return };
    let path = uri.path();
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else { return };
        let Ok(value) = HeaderValue::from_bytes(&substitute(h.value, f)) else { return };
        headers.append(name, value);
    }

    // The verifier: a real Tokens bound to BINDING; remembers whether it accepted a token.
    let accepted = Cell::new(None::<bool>);
    let verify = |token: &str| -> Result<(), TokenError> {
        let r = f.tokens.verify(token, BINDING, NOW);
        if r.is_ok() {
            assert!(f.tokens.verify(token, OTHER_BINDING, NOW).is_err(), "token {token:?} valid for two bindings");
            for (name, other) in &f.placeholders[1..] {
                assert_ne!(token, other, "{name} token accepted");
            }
        }
        accepted.set(Some(accepted.get().unwrap_or(true) && r.is_ok()));
        r
    };
    let resolution = match (&role, denied, pending) {
        (_, _, true) => Resolution::Pending("not listed yet".into()),
        (Some(r), true, _) => {
            Resolution::Denied { outcome: "denied by policy", requested: r.arn().to_string(), reason: "policy".into() }
        }
        (Some(r), false, _) => Resolution::Granted(Grant {
            role: r.clone(),
            source: Source::Config,
            requested: r.arn().to_string(),
            external_id: None,
            duration_seconds: None,
        }),
        (None, _, _) => Resolution::NoRole,
    };
    // Only a granted role may ever reach an answer.
    let role = if let Resolution::Granted(_) = resolution { role } else { None };
    let facts = Facts { to, imdsv1, proxy_allow: &proxy_allow, role: &resolution, verify_token: &verify };
    let decision = decide(&method, path, &headers, &facts);

    if debug() {
        eprintln!(
            "{method} {path} to={to:?} imdsv1={imdsv1} role={:?} token={:?} -> {decision:?}",
            role.as_ref().map(|r| r.arn()),
            accepted.get()
        );
    }

    let get_or_head = method == Method::GET || method == Method::HEAD;
    let token_sent = headers.contains_key(TOKEN_HEADER);
    let token_ok = accepted.get() == Some(true);
    // The container-credentials address answers only its own protocol, which has no IMDSv2
    // tokens; every GET on the metadata address passes the token gate.
    let imds_path = to == Destination::Metadata;
    if to == Destination::Credentials {
        let authorized = headers.get("authorization").is_some_and(|v| !v.as_bytes().trim_ascii().is_empty());
        assert!(
            matches!(decision, Decision::Refuse { .. }) || (authorized && path == CONTAINER_CREDENTIALS_PATH),
            "{method} {path} on the credentials address (authorized: {authorized}) got {decision:?}"
        );
    }
    if token_sent && get_or_head && imds_path {
        assert!(accepted.get().is_some(), "{method} with a token but the token was not verified: {decision:?}");
    }
    if get_or_head && imds_path && !matches!(decision, Decision::Refuse { .. }) {
        assert!(
            token_ok || (imdsv1 && !token_sent),
            "{method} {path} answered without an accepted token: {decision:?}"
        );
    }
    if path.contains("user-data") {
        let explicitly_allowed = match &decision {
            Decision::Proxy => proxy_allow.iter().any(|p| p.contains("user-data")),
            Decision::Credentials(g) => g.role.name().contains("user-data"),
            _ => false,
        };
        assert!(matches!(decision, Decision::Refuse { .. }) || explicitly_allowed, "{method} {path} got {decision:?}");
    }
    match &decision {
        Decision::Refuse { status, .. } => {
            let expected_5xx = pending && *status == hyper::StatusCode::SERVICE_UNAVAILABLE;
            assert!(status.is_client_error() || expected_5xx, "refused with {status}");
        }
        Decision::Token { ttl } => {
            assert_eq!(method, Method::PUT);
            assert_eq!(path, TOKEN_PATH);
            assert!(!headers.contains_key("x-forwarded-for"), "forwarded token request answered");
            let header = headers.get(TTL_HEADER).and_then(|v| v.to_str().ok());
            assert_eq!(parse_ttl(header), Some(*ttl));
            assert!((1..=21600).contains(ttl));
        }
        Decision::RoleName(r) => {
            assert!(get_or_head, "{method} listed the role");
            assert!(path == CREDENTIALS_PATH || path == format!("{CREDENTIALS_PATH}/"), "role listed at {path}");
            assert_eq!(Some(r), role.as_ref());
        }
        Decision::Credentials(Grant { role: r, .. }) => {
            assert!(get_or_head, "{method} got credentials");
            assert_eq!(Some(r), role.as_ref(), "credentials of a role that is not the pod's");
            assert_eq!(path, format!("{CREDENTIALS_PATH}/{}", r.name()), "credentials at {path}");
        }
        Decision::ContainerCredentials(Grant { role: r, .. }) => {
            assert!(get_or_head, "{method} got container credentials");
            assert_eq!(to, Destination::Credentials, "container credentials on the metadata address");
            assert_eq!(Some(r), role.as_ref(), "credentials of a role that is not the pod's");
            assert_eq!(path, CONTAINER_CREDENTIALS_PATH, "container credentials at {path}");
        }
        Decision::Info(r) => {
            assert!(get_or_head, "{method} got info");
            assert_eq!(path, INFO_PATH);
            assert_eq!(Some(r), role.as_ref());
        }
        Decision::Proxy => {
            assert!(get_or_head, "{method} proxied");
            assert!(proxy_allow.iter().any(|p| p == path), "{path} proxied but not in proxy_allow");
            assert_eq!(not_plain(path), None, "{path} proxied but not plain");
        }
    }
});
