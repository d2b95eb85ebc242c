//! The claims of a bound service-account token, checked against the pod that is asking: its
//! UID, namespace, service account, the node (when the token names one), the exchange's
//! audience, and an expiry far enough ahead for STS to accept it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;

use super::Refusal;
use crate::creds::session_name::NameFields;

/// A token that expires sooner than this is not sent: STS could reject it on arrival, and
/// kubelet rotates tokens long before (at 80 % of their lifetime).
pub const MIN_REMAINING_SECONDS: u64 = 60;

/// What the token must say to be this pod's: the pod's names (the same a session name is made
/// of) and the exchange's audience.
#[derive(Clone, Debug)]
pub struct Expected<'a> {
    pub pod: NameFields<'a>,
    pub audience: &'a str,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    aud: Audience,
    exp: Option<u64>,
    nbf: Option<u64>,
    #[serde(default)]
    sub: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<Bound>,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
    #[default]
    None,
}

#[derive(Deserialize)]
struct Bound {
    #[serde(default)]
    namespace: String,
    pod: Option<Named>,
    serviceaccount: Option<Named>,
    node: Option<Named>,
}

#[derive(Deserialize)]
struct Named {
    #[serde(default)]
    name: String,
    #[serde(default)]
    uid: String,
}

/// Ok when `token`'s claims name the expected pod and audience and it is valid at `now` (Unix
/// seconds) for at least [`MIN_REMAINING_SECONDS`]; else why not.
pub fn check(token: &str, expected: &Expected, now: u64) -> Result<(), Refusal> {
    let payload = token.split('.').nth(1).filter(|_| token.split('.').count() == 3);
    let claims: Claims = payload
        .and_then(|p| URL_SAFE_NO_PAD.decode(p.trim_end_matches('=')).ok())
        .and_then(|json| serde_json::from_slice(&json).ok())
        .ok_or_else(|| Refusal::new("the pod's token is not a JWT with readable claims"))?;
    let bound =
        claims.kubernetes.ok_or_else(|| Refusal::new("the token is not bound to a pod (no kubernetes.io claim)"))?;
    let pod = bound.pod.ok_or_else(|| Refusal::new("the token is not bound to a pod (no kubernetes.io.pod)"))?;
    let want = &expected.pod;
    if pod.uid != want.pod_uid || pod.name != want.pod || bound.namespace != want.namespace {
        return Err(Refusal::new(format!(
            "the token belongs to pod {}/{} (UID {}), not this pod {}/{} (UID {})",
            bound.namespace, pod.name, pod.uid, want.namespace, want.pod, want.pod_uid
        )));
    }
    let sa = bound.serviceaccount.map(|s| s.name).unwrap_or_default();
    let sub = format!("system:serviceaccount:{}:{}", want.namespace, want.service_account);
    if sa != want.service_account || claims.sub != sub {
        return Err(Refusal::new(format!(
            "the token is for service account {sa:?} ({}), the pod runs as {:?}",
            claims.sub, want.service_account
        )));
    }
    if let Some(node) = bound.node.filter(|n| !n.name.is_empty()) {
        if node.name != want.node {
            return Err(Refusal::new(format!("the token is bound to node {:?}, this is {:?}", node.name, want.node)));
        }
    }
    let audiences = match claims.aud {
        Audience::One(a) => vec![a],
        Audience::Many(a) => a,
        Audience::None => vec![],
    };
    if !audiences.iter().any(|a| a == expected.audience) {
        return Err(Refusal::new(format!("the token's audience {audiences:?} is not {:?}", expected.audience)));
    }
    let exp = claims.exp.ok_or_else(|| Refusal::new("the token has no expiry"))?;
    if exp < now + MIN_REMAINING_SECONDS {
        let ago = now.saturating_sub(exp);
        return Err(Refusal::new(match ago {
            0 => format!("the token expires in {} s, too soon to exchange", exp - now),
            _ => format!("the token expired {ago} s ago (kubelet has not rotated it)"),
        }));
    }
    if claims.nbf.is_some_and(|nbf| nbf > now + MIN_REMAINING_SECONDS) {
        return Err(Refusal::new("the token is not valid yet"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;

    fn token(claims: serde_json::Value) -> String {
        format!("{}.{}.c2ln", URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#), URL_SAFE_NO_PAD.encode(claims.to_string()))
    }

    fn claims() -> serde_json::Value {
        json!({
            "aud": ["sts.amazonaws.com"], "exp": NOW + 3600, "iat": NOW, "nbf": NOW, "iss": "https://oidc",
            "sub": "system:serviceaccount:team-t:app",
            "kubernetes.io": {"namespace": "team-t", "pod": {"name": "app-0", "uid": "u-1"},
                              "serviceaccount": {"name": "app", "uid": "s-1"}, "node": {"name": "node-1", "uid": "n"}}
        })
    }

    fn expected() -> Expected<'static> {
        Expected {
            pod: NameFields {
                namespace: "team-t",
                pod: "app-0",
                pod_uid: "u-1",
                service_account: "app",
                node: "node-1",
            },
            audience: "sts.amazonaws.com",
        }
    }

    fn with(path: &[&str], value: serde_json::Value) -> String {
        let mut c = claims();
        let mut at = &mut c;
        for p in &path[..path.len() - 1] {
            at = at.get_mut(*p).unwrap();
        }
        at[path[path.len() - 1]] = value;
        token(c)
    }

    #[test]
    fn this_pods_token_passes() {
        assert_eq!(check(&token(claims()), &expected(), NOW), Ok(()));
        assert_eq!(check(&with(&["aud"], json!("sts.amazonaws.com")), &expected(), NOW), Ok(()));
    }

    #[test]
    fn another_pods_token_is_refused_whatever_differs() {
        for t in [
            with(&["kubernetes.io", "pod", "uid"], json!("u-2")),
            with(&["kubernetes.io", "pod", "name"], json!("app-1")),
            with(&["kubernetes.io", "namespace"], json!("team-x")),
            with(&["kubernetes.io", "serviceaccount", "name"], json!("admin")),
            with(&["sub"], json!("system:serviceaccount:team-t:admin")),
            with(&["kubernetes.io", "node", "name"], json!("node-2")),
        ] {
            assert!(check(&t, &expected(), NOW).is_err(), "{t}");
        }
    }

    #[test]
    fn wrong_audience_expired_unbound_or_garbage_is_refused() {
        let e = check(&with(&["aud"], json!(["pods.eks.amazonaws.com"])), &expected(), NOW).unwrap_err();
        assert!(e.reason.contains("audience"), "{e}");
        let e = check(&with(&["exp"], json!(NOW - 10)), &expected(), NOW).unwrap_err();
        assert!(e.reason.contains("expired 10 s ago"), "{e}");
        assert!(check(&with(&["exp"], json!(NOW + 30)), &expected(), NOW).is_err());
        let mut unbound = claims();
        unbound.as_object_mut().unwrap().remove("kubernetes.io");
        assert!(check(&token(unbound), &expected(), NOW).is_err());
        for garbage in ["", "a.b", "a.%%%.c", "a.b.c.d"] {
            assert!(check(garbage, &expected(), NOW).is_err(), "{garbage}");
        }
    }

    #[test]
    fn a_token_without_a_node_claim_passes_on_any_node() {
        let mut c = claims();
        c["kubernetes.io"].as_object_mut().unwrap().remove("node");
        assert_eq!(check(&token(c), &expected(), NOW), Ok(()));
    }
}
