//! How every listener of iamlinkd (pods, metrics, the local API) serves connections, so that no
//! client can hold the descriptors the others need:
//! - a cap on each listener's open connections ([`ConnectionCap`]): at the cap a new connection
//!   is closed at once, counted in `iamlink_connections_refused_total` and logged at most once
//!   every few seconds;
//! - a header-read timeout on a real timer ([`http1`]), which also bounds idle keep-alive
//!   connections: hyper starts it whenever it waits for a request head;
//! - the descriptor budget the caps are sized from ([`Caps`]): the soft `RLIMIT_NOFILE` raised to
//!   the hard limit at start, the caps kept under it with a reserve for the rest of the daemon;
//! - the one accept loop, which waits out a failed accept (EMFILE and friends) instead of
//!   spinning on it, and logs it once per burst.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

/// Long enough for a closing connection to free a descriptor, short enough to go unnoticed.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// A client must send a whole request head within this after connecting or after its previous
/// answer (slowloris, idle keep-alive connections).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests iamlinkd serves are a few hundred bytes; larger heads are refused (431) before any work.
const MAX_HEAD: usize = 16 * 1024;
/// At most one log line per listener and kind of trouble in this time, whatever the rate.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Descriptors the daemon needs besides its listeners' connections: the listeners themselves,
/// the guard's and the release netlink sockets, the Kubernetes watches, the store, its lock and
/// directory watches, the log and audit files, the runtime's epoll and signal descriptors.
pub const RESERVE: u64 = 256;
/// Scrapes need a handful; the rest is what a flood could take.
pub const METRICS_CONNECTIONS: usize = 32;
/// The node's own metrics clients (kubelet's probes), apart from the others so that pods, which
/// reach the node's address too, cannot take their places and have the daemon restarted.
pub const NODE_METRICS_CONNECTIONS: usize = 8;
/// The plugin's prefetch and release messages (one per ADD and DEL, in parallel on a busy node)
/// and operators' `explain` and `status`.
pub const LOCAL_API_CONNECTIONS: usize = 128;
/// Each pod connection may wait on one more descriptor: the real metadata service's or STS's.
const DESCRIPTORS_PER_POD_CONNECTION: u64 = 2;
/// The usual default soft limit: a hard limit below it leaves too few descriptors to serve a node.
const MIN_LIMIT: u64 = 1024;

/// A listening socket.
pub trait Listener: Send + 'static {
    type Stream: Send + 'static;
    type Peer: Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Peer)>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    type Peer = std::net::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(TcpStream, std::net::SocketAddr)>> + Send {
        TcpListener::accept(self)
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    type Peer = tokio::net::unix::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(UnixStream, tokio::net::unix::SocketAddr)>> + Send {
        UnixListener::accept(self)
    }
}

/// How many times something happened since it was last logged, so that a flood is one line
/// every [`LOG_EVERY`] instead of one per connection.
#[derive(Default)]
struct Occurrences(Mutex<(u64, Option<Instant>)>);

impl Occurrences {
    /// Counts one at `now`; `Some(n)` when a line is due, `n` the occurrences it reports.
    fn note(&self, now: Instant) -> Option<u64> {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (count, last) = &mut *state;
        *count += 1;
        if last.is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY) {
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(count))
    }
}

/// The open connections one listener may have (or several sharing one budget: the pods' IPv4
/// and IPv6 listeners). Clones share the count.
#[derive(Clone)]
pub struct ConnectionCap {
    what: &'static str,
    places: Arc<Semaphore>,
    max: usize,
    refused: Counter,
    refusals: Arc<Occurrences>,
    accept_failures: Arc<Occurrences>,
}

/// One admitted connection's place under its cap; dropping it frees the place.
pub type Place = OwnedSemaphorePermit;

impl ConnectionCap {
    /// `refused` counts the connections closed at the cap.
    pub fn new(what: &'static str, max: usize, refused: Counter) -> Self {
        ConnectionCap {
            what,
            places: Arc::new(Semaphore::new(max)),
            max,
            refused,
            refusals: Arc::default(),
            accept_failures: Arc::default(),
        }
    }

    /// A place for one more connection, or `None` at the cap (counted, and logged rarely).
    pub fn admit(&self) -> Option<Place> {
        match self.places.clone().try_acquire_owned() {
            Ok(place) => Some(place),
            Err(_) => {
                self.refused.inc();
                if let Some(n) = self.refusals.note(Instant::now()) {
                    warn!(
                        listener = self.what,
                        cap = self.max,
                        refused = n,
                        "connection cap reached: new connections are closed at once"
                    );
                }
                None
            }
        }
    }

    fn accept_failed(&self, e: &io::Error) {
        if let Some(n) = self.accept_failures.note(Instant::now()) {
            warn!(listener = self.what, error = %e, failures = n, "accept failed; retrying");
        }
    }
}

/// Which cap an accepted connection takes its place under.
pub trait Admission<S, P>: Send + 'static {
    /// A place for the connection, or `None`: it is closed at once.
    fn admit(&self, stream: &S, peer: &P) -> Option<Place>;
    /// Logs a failed accept (rarely).
    fn accept_failed(&self, e: &io::Error);
}

impl<S, P> Admission<S, P> for ConnectionCap {
    fn admit(&self, _: &S, _: &P) -> Option<Place> {
        ConnectionCap::admit(self)
    }
    fn accept_failed(&self, e: &io::Error) {
        ConnectionCap::accept_failed(self, e)
    }
}

/// Two caps: one for the node's own clients (a connection from one of the node's addresses to
/// another, as a kubelet's probe of a host-network pod is, or over loopback), one for the rest.
pub struct NodeApart {
    pub node: ConnectionCap,
    pub others: ConnectionCap,
}

impl NodeApart {
    /// Whether a connection from `peer` to `local` comes from the node itself: a handshake from a
    /// spoofed node address cannot complete, its SYN-ACK goes to the node.
    fn from_the_node(local: Option<SocketAddr>, peer: &SocketAddr) -> bool {
        peer.ip().is_loopback() || local.is_some_and(|l| l.ip() == peer.ip())
    }
}

impl Admission<TcpStream, SocketAddr> for NodeApart {
    fn admit(&self, stream: &TcpStream, peer: &SocketAddr) -> Option<Place> {
        match Self::from_the_node(stream.local_addr().ok(), peer) {
            true => self.node.admit(),
            false => self.others.admit(),
        }
    }
    fn accept_failed(&self, e: &io::Error) {
        self.others.accept_failed(e)
    }
}

/// Hands every accepted connection, with its place under its cap, to `handle` for the daemon's
/// lifetime; a connection over its cap is closed before `handle` sees it.
pub async fn accept_loop<L: Listener>(
    cap: impl Admission<L::Stream, L::Peer>,
    listener: L,
    mut handle: impl FnMut(L::Stream, L::Peer, Place),
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if let Some(place) = cap.admit(&stream, &peer) {
                    handle(stream, peer, place);
                }
            }
            Err(e) => {
                cap.accept_failed(&e);
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// The HTTP/1 server every listener uses: the header-read timeout on tokio's timer (without a
/// timer hyper silently ignores it) and the bound on a request head.
pub fn http1() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_buf_size(MAX_HEAD);
    builder
}

/// The connection caps of the daemon's listeners, sized from its descriptor limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    pub pods: usize,
    pub metrics: usize,
    pub node_metrics: usize,
    pub local_api: usize,
}

/// Why the caps cannot be sized.
#[derive(Debug, thiserror::Error)]
#[error(
    "the descriptor limit (RLIMIT_NOFILE) is {0}, below the {MIN_LIMIT} iamlinkd needs to serve pods: raise the hard \
     limit (LimitNOFILE in the runtime's service, ulimit -Hn)"
)]
pub struct TooFewDescriptors(u64);

impl Caps {
    /// Caps that, all full at once, with each pod connection waiting on one more descriptor and
    /// [`RESERVE`] for the rest of the daemon, stay under `limit`. `pods_wanted` (0: as many as
    /// fit) bounds the pods' share further.
    pub fn for_limit(limit: u64, pods_wanted: u32) -> Result<Caps, TooFewDescriptors> {
        if limit < MIN_LIMIT {
            return Err(TooFewDescriptors(limit));
        }
        let others = (METRICS_CONNECTIONS + NODE_METRICS_CONNECTIONS + LOCAL_API_CONNECTIONS) as u64;
        let fit = (limit - RESERVE - others) / DESCRIPTORS_PER_POD_CONNECTION;
        let pods = match u64::from(pods_wanted) {
            0 => fit,
            wanted => wanted.min(fit),
        };
        Ok(Caps {
            pods: usize::try_from(pods).unwrap_or(usize::MAX),
            metrics: METRICS_CONNECTIONS,
            node_metrics: NODE_METRICS_CONNECTIONS,
            local_api: LOCAL_API_CONNECTIONS,
        })
    }
}

/// Raises the soft descriptor limit to the hard one (a container's soft limit is often 1024,
/// whatever the hard one) and returns the soft limit in force.
pub fn raise_descriptor_limit() -> io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_at_its_cap_refuses_and_counts_until_a_place_is_freed() {
        let refused = Counter::default();
        let cap = ConnectionCap::new("test", 2, refused.clone());
        let a = cap.admit().expect("first place");
        let _b = cap.admit().expect("second place");
        assert!(cap.admit().is_none(), "a third connection over a cap of 2");
        assert!(cap.clone().admit().is_none(), "clones share the cap");
        assert_eq!(refused.get(), 2);
        drop(a);
        assert!(cap.admit().is_some(), "a closed connection frees its place");
    }

    #[test]
    fn separate_caps_do_not_share_places() {
        let pods = ConnectionCap::new("pods", 1, Counter::default());
        let metrics = ConnectionCap::new("metrics", 1, Counter::default());
        let _held = metrics.admit().expect("metrics place");
        assert!(metrics.admit().is_none());
        assert!(pods.admit().is_some(), "a full metrics listener leaves the pods' places alone");
    }

    #[test]
    fn the_nodes_own_connections_have_places_of_their_own() {
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        let node = Some(at("198.18.0.1:9101"));
        assert!(NodeApart::from_the_node(node, &at("198.18.0.1:40000")), "kubelet probing the node's address");
        assert!(NodeApart::from_the_node(node, &at("127.0.0.1:40000")), "loopback");
        assert!(!NodeApart::from_the_node(node, &at("198.18.64.2:40000")), "a pod");
        assert!(!NodeApart::from_the_node(None, &at("198.18.0.1:40000")), "unknown local address: not the node");
    }

    #[test]
    fn a_flood_of_refusals_is_one_line_per_interval_counting_them_all() {
        let log = Occurrences::default();
        let t0 = Instant::now();
        assert_eq!(log.note(t0), Some(1), "the first is logged at once");
        let quiet: Vec<_> = (1..1000).map(|i| log.note(t0 + Duration::from_millis(i))).collect();
        assert!(quiet.iter().all(Option::is_none), "no line within the interval");
        assert_eq!(log.note(t0 + LOG_EVERY), Some(1000), "the next line counts every one since the last");
    }

    #[test]
    fn caps_with_their_connections_upstream_and_the_reserve_stay_under_the_limit() {
        for limit in [MIN_LIMIT, 4096, 65536, 1 << 20] {
            let caps = Caps::for_limit(limit, 0).unwrap();
            let used = caps.pods as u64 * DESCRIPTORS_PER_POD_CONNECTION
                + caps.metrics as u64
                + caps.node_metrics as u64
                + caps.local_api as u64
                + RESERVE;
            assert!(used <= limit, "{caps:?} use {used} of {limit}");
            assert!(caps.pods >= 64, "{limit}: {caps:?} leaves pods too little");
        }
    }

    #[test]
    fn the_configured_pod_cap_applies_only_below_what_fits() {
        assert_eq!(Caps::for_limit(1 << 20, 4096).unwrap().pods, 4096);
        let fit = Caps::for_limit(1024, 0).unwrap().pods;
        assert_eq!(Caps::for_limit(1024, 100_000).unwrap().pods, fit);
    }

    #[test]
    fn a_limit_too_small_to_serve_is_refused_with_the_fix() {
        let e = Caps::for_limit(256, 0).unwrap_err().to_string();
        assert!(e.contains("256") && e.contains("LimitNOFILE"), "{e}");
    }
}
