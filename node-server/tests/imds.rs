//! The request path from an accepted connection to the answer, without a network: a store in a
//! temp dir, a fake STS, and requests as hyper hands them to the service.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::BodyExt;
use hyper::{Method, Request, StatusCode};

use iamlink_common::record::{boottime_ns, now_rfc3339};
use iamlink_common::{HostInterface, HostInterfaceSource, PodRecord, PodRef, Slot, Store};
use iamlinkd::app::App;
use iamlinkd::config::Config;
use iamlinkd::creds::cache::{AssumeRole, Credentials, SessionKey, StsError};
use iamlinkd::request::identify::{Conn, Destination};
use iamlinkd::request::imds::answer;
use iamlinkd::request::tokens::Tokens;

/// Issues credentials whose session token names the role, so answers can be traced; fails for
/// roles named "broken".
#[derive(Default)]
struct FakeSts {
    calls: AtomicUsize,
}

impl AssumeRole for FakeSts {
    async fn assume_role(&self, key: &SessionKey) -> Result<Credentials, StsError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if key.role_arn.ends_with("/broken") {
            return Err(StsError::new("AccessDenied"));
        }
        Ok(Credentials {
            access_key_id: format!("ASIAFAKE{n}"),
            secret_access_key: "secret".into(),
            session_token: format!("token-for:{}:{}", key.role_arn, key.session_name),
            expiration: SystemTime::now() + Duration::from_secs(3600),
            last_updated: SystemTime::now(),
            assumed_role: None,
        })
    }
}

struct Bench {
    app: Arc<App<FakeSts>>,
    _dir: tempfile::TempDir,
}

const CONFIG: &str = r#"
listen = "198.18.0.1:8181"
store_dir = "STORE"
[roles]
base_arn = "arn:aws:iam::123456789012:role/"
[[roles.pod]]
namespace = "team-a"
name = "web"
role = "web-role"
[[roles.pod]]
namespace = "team-b"
role = "api-role"
[[roles.pod]]
namespace = "team-c"
role = "broken"
"#;

fn bench(extra: &str) -> Bench {
    bench_with("", extra)
}

/// A bench whose config has `top` keys before the tables and `extra` after them.
fn bench_with(top: &str, extra: &str) -> Bench {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{top}{}{extra}", CONFIG.replace("STORE", &dir.path().display().to_string()));
    let config = Config::parse(&text).unwrap();
    let store = Store::open(&config.store_dir).unwrap();
    let (health, _) = iamlinkd::health::Health::new();
    let app = App::new(config, store, FakeSts::default(), Tokens::new().unwrap(), "node-1".into(), None, health);
    Bench { app: Arc::new(app), _dir: dir }
}

impl Bench {
    /// Records a pod at `slot` and returns a connection from it, accepted after the record.
    fn pod(&self, slot: u32, namespace: &str, name: &str) -> Conn {
        let record = PodRecord {
            container_id: format!("c{slot}"),
            ifname: "eth0".into(),
            network: "net".into(),
            slot,
            host_interface: HostInterface {
                name: format!("veth{slot}"),
                index: slot + 10,
                source: HostInterfaceSource::PeerIfindex,
            },
            netns: format!("/var/run/netns/p{slot}"),
            pod: PodRef { namespace: namespace.into(), name: name.into(), uid: format!("uid-{slot}") },
            ips: vec!["198.18.64.2/24".into()],
            created: now_rfc3339(),
            // A pod whose record was written a second ago.
            created_boottime_ns: boottime_ns() - 1_000_000_000,
            runtime_annotations: None,
            adopted: false,
            pod_dnat: false,
            ebpf_guard: false,
        };
        let store = &self.app.store();
        let lock = store.lock().unwrap();
        store.insert(&lock, &record).unwrap();
        let mark = self.app.config().mark_mask.mark_for(slot);
        Conn {
            mark,
            slot: Conn::slot_of(mark, Some(Destination::Metadata), self.app.config().mark_mask),
            accepted_at: boottime_ns(),
            established_at: boottime_ns(),
            peer: "198.18.64.2:40000".parse().unwrap(),
            original_dst: Some("169.254.169.254:80".parse().unwrap()),
            to: Some(Destination::Metadata),
        }
    }

    /// The same pod's connection to the container-credentials address.
    fn to_credentials_address(conn: &Conn) -> Conn {
        Conn { original_dst: Some("169.254.170.23:80".parse().unwrap()), to: Some(Destination::Credentials), ..*conn }
    }

    async fn call(&self, conn: &Conn, method: Method, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = answer(&self.app, conn, &req.body(()).unwrap()).await;
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn token(&self, conn: &Conn) -> String {
        let (status, token) =
            self.call(conn, Method::PUT, "/latest/api/token", &[("x-aws-ec2-metadata-token-ttl-seconds", "60")]).await;
        assert_eq!(status, StatusCode::OK);
        token
    }
}

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

#[tokio::test]
async fn a_pod_gets_its_own_role_and_credentials_json() {
    let b = bench("");
    let web = b.pod(3, "team-a", "web");
    let token = b.token(&web).await;
    let auth = [("x-aws-ec2-metadata-token", token.as_str())];
    assert_eq!(b.call(&web, Method::GET, CREDS, &auth).await, (StatusCode::OK, "web-role".into()));
    let (status, body) = b.call(&web, Method::GET, &format!("{CREDS}web-role"), &auth).await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    for field in ["Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey", "Token", "Expiration"] {
        assert!(json.get(field).is_some(), "{field} missing in {body}");
    }
    assert_eq!(json["Code"], "Success");
    assert_eq!(json["Type"], "AWS-HMAC");
    assert_eq!(json["Token"], "token-for:arn:aws:iam::123456789012:role/web-role:team-a.web");
    let (status, info) = b.call(&web, Method::GET, "/latest/meta-data/iam/info", &auth).await;
    assert_eq!(status, StatusCode::OK);
    assert!(info.contains("instance-profile/web-role"), "{info}");
}

#[tokio::test]
async fn the_container_credentials_endpoint_answers_for_the_same_pod() {
    let b = bench("");
    let web = b.pod(3, "team-a", "web");
    let web = Bench::to_credentials_address(&web);
    let (status, body) = b.call(&web, Method::GET, "/v1/credentials", &[("authorization", "anything")]).await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["AccountId"], "123456789012");
    assert_eq!(json["Token"], "token-for:arn:aws:iam::123456789012:role/web-role:team-a.web");
    for field in ["AccessKeyId", "SecretAccessKey", "Expiration"] {
        assert!(json.get(field).is_some(), "{field} missing in {body}");
    }
    let lonely = Bench::to_credentials_address(&b.pod(4, "team-z", "x"));
    let auth = [("authorization", "anything")];
    assert_eq!(b.call(&lonely, Method::GET, "/v1/credentials", &auth).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn container_credentials_need_an_authorization_header_and_their_own_address() {
    let b = bench("");
    let on_metadata = b.pod(3, "team-a", "web");
    let web = Bench::to_credentials_address(&on_metadata);
    for headers in [&[][..], &[("authorization", "")], &[("authorization", "  ")]] {
        let (status, body) = b.call(&web, Method::GET, "/v1/credentials", headers).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert!(body.contains("AWS_CONTAINER_AUTHORIZATION_TOKEN") && !body.contains("SecretAccessKey"), "{body}");
    }
    // A GET-only forgery through 169.254.169.254 reaches no container credentials either.
    let auth = [("authorization", "t")];
    let (status, body) = b.call(&on_metadata, Method::GET, "/v1/credentials", &auth).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("169.254.170.23"), "{body}");
    // The credentials address serves nothing of the metadata API, as the EKS agent's.
    assert_eq!(b.call(&web, Method::GET, CREDS, &auth).await.0, StatusCode::NOT_FOUND);
    assert_eq!(b.call(&web, Method::GET, &format!("{CREDS}web-role"), &auth).await.0, StatusCode::NOT_FOUND);
    let ttl = [("x-aws-ec2-metadata-token-ttl-seconds", "60")];
    assert_eq!(b.call(&web, Method::PUT, "/latest/api/token", &ttl).await.0, StatusCode::NOT_FOUND);
    assert_eq!(b.call(&web, Method::POST, "/v1/credentials", &auth).await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(b.call(&web, Method::GET, "/v1/credentials", &auth).await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_connection_that_did_not_come_through_the_rule_is_nobody_whatever_its_mark() {
    let b = bench("");
    let web = b.pod(3, "team-a", "web");
    let direct = Conn { original_dst: Some("198.18.0.1:8181".parse().unwrap()), to: None, ..web };
    let not_natted = Conn { original_dst: None, to: None, ..web };
    for conn in [direct, not_natted] {
        for (method, path, headers) in [
            (Method::GET, CREDS, &[][..]),
            (Method::GET, "/latest/meta-data/iam/security-credentials/web-role", &[]),
            (Method::GET, "/v1/credentials", &[("authorization", "t")]),
            (Method::PUT, "/latest/api/token", &[("x-aws-ec2-metadata-token-ttl-seconds", "60")]),
        ] {
            let (status, body) = b.call(&conn, method.clone(), path, headers).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path} via {:?}", conn.original_dst);
            assert!(body.contains("no pod identity") && body.contains("interception rule"), "{body}");
        }
    }
}

#[tokio::test]
async fn pods_never_see_each_others_roles_or_tokens() {
    let b = bench("");
    let web = b.pod(1, "team-a", "web");
    let api = b.pod(2, "team-b", "api-0");
    let web_token = b.token(&web).await;
    let (status, _) = b.call(&api, Method::GET, CREDS, &[("x-aws-ec2-metadata-token", &web_token)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a token is bound to the pod it was issued to");
    assert_eq!(b.call(&api, Method::GET, CREDS, &[]).await, (StatusCode::OK, "api-role".into()));
    let (status, _) = b.call(&api, Method::GET, &format!("{CREDS}web-role"), &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another pod's role name gets 404");
}

#[tokio::test]
async fn connections_without_a_current_pod_get_nothing() {
    let b = bench("");
    let nobody = Conn {
        mark: 0,
        slot: None,
        accepted_at: boottime_ns(),
        established_at: boottime_ns(),
        peer: "198.18.0.1:1".parse().unwrap(),
        original_dst: Some("169.254.169.254:80".parse().unwrap()),
        to: Some(Destination::Metadata),
    };
    let (status, body) = b.call(&nobody, Method::GET, CREDS, &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("no pod identity"), "{body}");

    let mask = b.app.config().mark_mask;
    let empty_slot = Conn { mark: mask.mark_for(9), slot: Slot::new(9), ..nobody };
    assert_eq!(b.call(&empty_slot, Method::GET, CREDS, &[]).await.0, StatusCode::NOT_FOUND);

    // A connection established before the record that now holds its slot was written.
    let early = Conn {
        mark: mask.mark_for(4),
        slot: Slot::new(4),
        accepted_at: boottime_ns() - 2_000_000_000,
        established_at: boottime_ns() - 2_000_000_000,
        ..nobody
    };
    b.pod(4, "team-a", "web");
    let (status, body) = b.call(&early, Method::GET, CREDS, &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("predates"), "{body}");
}

#[tokio::test]
async fn token_requests_are_checked_like_the_real_service() {
    let b = bench("");
    let web = b.pod(1, "team-a", "web");
    for ttl in ["0", "21601", "x", ""] {
        let (status, _) =
            b.call(&web, Method::PUT, "/latest/api/token", &[("x-aws-ec2-metadata-token-ttl-seconds", ttl)]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "ttl {ttl:?}");
    }
    assert_eq!(b.call(&web, Method::PUT, "/latest/api/token", &[]).await.0, StatusCode::BAD_REQUEST);
    let forwarded = [("x-aws-ec2-metadata-token-ttl-seconds", "60"), ("x-forwarded-for", "198.18.64.9")];
    assert_eq!(b.call(&web, Method::PUT, "/latest/api/token", &forwarded).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        b.call(&web, Method::GET, CREDS, &[("x-aws-ec2-metadata-token", "1.abc")]).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(b.call(&web, Method::POST, CREDS, &[]).await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(b.call(&web, Method::PUT, CREDS, &[]).await.0, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn imdsv1_can_be_refused() {
    let b = bench_with("imdsv1 = false\n", "");
    let web = b.pod(1, "team-a", "web");
    assert_eq!(b.call(&web, Method::GET, CREDS, &[]).await.0, StatusCode::UNAUTHORIZED);
    // Container-credentials clients send no IMDSv2 token; that endpoint asks for its own header.
    let container = Bench::to_credentials_address(&web);
    assert_eq!(b.call(&container, Method::GET, "/v1/credentials", &[("authorization", "t")]).await.0, StatusCode::OK);
    assert_eq!(b.call(&container, Method::GET, "/v1/credentials", &[]).await.0, StatusCode::UNAUTHORIZED);
    let token = b.token(&web).await;
    assert_eq!(b.call(&web, Method::GET, CREDS, &[("x-aws-ec2-metadata-token", &token)]).await.0, StatusCode::OK);
}

#[tokio::test]
async fn paths_that_are_not_served_get_404() {
    let b = bench("");
    let web = b.pod(1, "team-a", "web");
    for path in [
        "/latest/user-data",
        "/latest/meta-data/iam/security-credentials/iamlink-node-role",
        "/latest/meta-data/iam/security-credentials/../../user-data",
        "/latest/meta-data/iam/security-credentials/web-role/",
        "/latest/meta-data/iam/security-credentials/web%2Drole",
        "/latest/meta-data/placement/region/../../iam/security-credentials/",
        "/latest/meta-data/",
        "/",
    ] {
        assert_eq!(b.call(&web, Method::GET, path, &[]).await.0, StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test]
async fn pods_without_a_role_or_whose_role_fails_get_a_clear_status() {
    let b = bench("");
    let lonely = b.pod(1, "team-z", "x");
    let (status, body) = b.call(&lonely, Method::GET, CREDS, &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("no role"), "{body}");
    let broken = b.pod(2, "team-c", "x");
    assert_eq!(b.call(&broken, Method::GET, &format!("{CREDS}broken"), &[]).await.0, StatusCode::SERVICE_UNAVAILABLE);
}
