//! Accepting connections with the kernel's identity of their ingress interface: the SYN's mark,
//! copied to the socket because `net.ipv4.tcp_fwmark_accept=1` in this namespace, and the
//! address the client dialled before the interception rule's DNAT (conntrack's original tuple).

use std::convert::Infallible;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use iamlink_common::record::boottime_ns;

use crate::app::App;
use crate::creds::cache::AssumeRole;
use crate::request::identify::{Conn, Destination};
use crate::request::imds;
use crate::serve::{accept_loop, http1, ConnectionCap};

/// A pod over its rate waits this long for its 429: a flood costs the daemon little work per
/// second and the pod's own connections, not the other pods' share.
const RATE_LIMITED_DELAY: Duration = Duration::from_millis(200);
const SYSCTL: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

/// Makes accepted sockets carry their SYN's mark; without it every connection is anonymous.
///
/// A value already 1 is left alone: in the DaemonSet `/proc/sys` is read-only and the privileged
/// init container has set it.
pub fn enable_fwmark_accept() -> std::io::Result<()> {
    if std::fs::read_to_string(SYSCTL).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(SYSCTL, b"1")
}

/// The destination `stream`'s client dialled, before NAT: SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST
/// for IPv6) reads conntrack's original tuple. ENOENT: conntrack has no entry, not NATed. Any
/// other failure is logged and counts as not NATed too, so the connection carries no identity.
fn original_destination(stream: &TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
    let read = match peer {
        SocketAddr::V4(_) => getsockopt(stream, sockopt::OriginalDst).map(|a| {
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), u16::from_be(a.sin_port)))
        }),
        SocketAddr::V6(_) => getsockopt(stream, sockopt::Ip6tOriginalDst).map(|a| {
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(a.sin6_addr.s6_addr), u16::from_be(a.sin6_port), 0, 0))
        }),
    };
    match read {
        Ok(addr) => Some(addr),
        Err(Errno::ENOENT) => None,
        Err(e) => {
            warn!(%peer, error = %e, "cannot read the connection's original destination; it carries no identity");
            None
        }
    }
}

/// The CLOCK_BOOTTIME at which `stream`'s handshake completed, from TCP_INFO's
/// `tcpi_last_data_sent`: the kernel stamps it when it creates the accepted socket, and only
/// data we send refreshes it (nothing before accept), so no segment of the client's moves it.
/// 0 (older than any record: refused) when TCP_INFO cannot be read.
fn established_at(stream: &TcpStream, peer: SocketAddr, now: u64) -> u64 {
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a zeroed tcp_info and `len` its size; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len)
    };
    if rc != 0 {
        warn!(%peer, error = %std::io::Error::last_os_error(), "cannot read TCP_INFO; the connection is refused");
        return 0;
    }
    // SAFETY: a tcp_info is plain integers; zeroed and partly overwritten by the kernel, it is valid.
    let info = unsafe { info.assume_init() };
    now.saturating_sub(u64::from(info.tcpi_last_data_sent) * 1_000_000)
}

/// Serves pods on `listener`; `cap` bounds the connections of all pods together (shared by the
/// IPv4 and IPv6 listeners), [`Limits`](crate::request::limits::Limits) each pod's.
pub async fn serve<S: AssumeRole>(app: Arc<App<S>>, listener: TcpListener, cap: ConnectionCap) {
    let rules = app.config.rule_set();
    let intercepted: Vec<IpAddr> = rules.addresses.clone();
    accept_loop(cap, listener, |stream, peer, overall| {
        let accepted_at = boottime_ns();
        // The table was just created or deleted by someone: its marks are read only once the
        // guard has checked their layout. Closed unanswered; SDKs retry.
        if !app.health.interception_verified() {
            debug!(%peer, "interception rule set not verified; closing");
            app.metrics.answer("rule set not verified");
            return;
        }
        let mark = match getsockopt(&stream, sockopt::Mark) {
            Ok(m) => m,
            Err(e) => {
                warn!(%peer, error = %e, "cannot read socket mark; dropping connection");
                return;
            }
        };
        let original_dst = original_destination(&stream, peer);
        let to = Destination::of(original_dst, &intercepted, &rules);
        // Not through the rule: nobody, whatever the mark, for the limits too.
        let slot = Conn::slot_of(mark, to, app.config.mark_mask);
        let Some(place) = app.limits.admit_connection(slot) else {
            debug!(%peer, ?slot, "pod has too many open connections; closing");
            return;
        };
        let established_at = established_at(&stream, peer, accepted_at);
        let conn = Conn { mark, slot, accepted_at, established_at, peer, original_dst, to };
        let app = app.clone();
        tokio::spawn(async move {
            let _places = (overall, place);
            let service = service_fn(move |req| {
                let app = app.clone();
                async move {
                    if !app.limits.allow_request(slot) {
                        debug!(%peer, ?slot, "rate limited");
                        app.metrics.answer("rate limited");
                        tokio::time::sleep(RATE_LIMITED_DELAY).await;
                        return Ok::<_, Infallible>(imds::rate_limited());
                    }
                    Ok(imds::answer(&app, &conn, &req).await)
                }
            });
            let served = http1().serve_connection(TokioIo::new(stream), service).await;
            if let Err(e) = served {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    })
    .await
}
