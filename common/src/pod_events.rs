//! What the plugin tells iamlinkd over the daemon's local socket (`Store::api_socket`), and a
//! small blocking client for it: no HTTP library in the plugin, every step bounded.
//!
//! A message names a record by its key and nothing else. It is a hint to read the store now
//! (the record is already written, or still there), never a source of identity: the daemon
//! acts only on what the record it reads says, exactly as if inotify had woken it.
//!
//! - `POST /v1/pods/<key>/prefetch?wait_ms=N` (ADD, after the record is written): start the
//!   pod's STS call now; answer once the credentials are cached, or after N ms, or at once when
//!   the pod has no role. [`PrefetchAnswer`].
//! - `POST /v1/pods/<key>/release?deadline_ns=D` (DEL, under the store lock, before the record
//!   is removed): remove the record's interception entry on iamlinkd's open netlink socket,
//!   reading the rule set only before `D` (`CLOCK_BOOTTIME`), when the plugin stops waiting.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use serde::{Deserialize, Serialize};

/// How a prefetch ended, as far as the plugin waited for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefetchAnswer {
    /// The pod's credentials are cached: its first request is a cached answer.
    Cached,
    /// The pod has no role (or is denied one): nothing to fetch, nothing to wait for.
    NoRole,
    /// The role is not decided yet (the Kubernetes view is still syncing).
    Pending,
    /// STS refused or failed; the pod's requests retry (and get 503 meanwhile).
    Failed,
    /// Still fetching when the wait ended; the fetch goes on.
    InFlight,
}

/// The daemon's answer to a release.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReleaseAnswer {
    /// The entry and slot chain are gone (or were already).
    Removed,
}

pub fn prefetch_path(key: &str, wait: Duration) -> String {
    format!("/v1/pods/{key}/prefetch?wait_ms={}", wait.as_millis())
}

pub fn release_path(key: &str, deadline_boottime_ns: u64) -> String {
    format!("/v1/pods/{key}/release?deadline_ns={deadline_boottime_ns}")
}

/// A message as the daemon reads it from a request's path and query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Prefetch { key: String, wait: Duration },
    Release { key: String, deadline_boottime_ns: u64 },
}

impl Event {
    /// `None` for anything that is not one of the two messages, well formed.
    pub fn parse(path: &str, query: Option<&str>) -> Option<Event> {
        let rest = path.strip_prefix("/v1/pods/")?;
        let (key, action) = rest.rsplit_once('/')?;
        if key.is_empty() || key.contains('/') {
            return None;
        }
        let param = |name: &str| -> Option<u64> {
            query?.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        };
        match action {
            "prefetch" => Some(Event::Prefetch {
                key: key.to_string(),
                // Bounded here too: a wait is for ADD, never longer than a minute.
                wait: Duration::from_millis(param("wait_ms").unwrap_or(0).min(60_000)),
            }),
            "release" => Some(Event::Release { key: key.to_string(), deadline_boottime_ns: param("deadline_ns")? }),
            _ => None,
        }
    }
}

/// Why the daemon could not be told or did not answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("iamlinkd is not listening on {0} (not running?)")]
    NotListening(String),
    #[error("iamlinkd's socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer from iamlinkd within {0:?}")]
    NoAnswer(Duration),
    #[error("iamlinkd answered {status}: {body}")]
    Refused { status: u16, body: String },
}

/// A message sent, its answer not read yet: the plugin goes on with its work meanwhile.
pub struct Sent {
    stream: UnixStream,
}

/// Connects without waiting (a full listen queue is "not answering", never a wait) and writes
/// one `POST` within `write_bound`.
pub fn send(socket: &Path, path: &str, write_bound: Duration) -> Result<Sent, SendError> {
    let fd = socket_nonblocking()?;
    let addr = UnixAddr::new(socket).map_err(|e| SendError::Io(e.into()))?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(Errno::ENOENT | Errno::ECONNREFUSED | Errno::EAGAIN) => {
            return Err(SendError::NotListening(socket.display().to_string()))
        }
        Err(e) => return Err(SendError::Io(e.into())),
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(write_bound.max(Duration::from_millis(1))))?;
    let request = format!("POST {path} HTTP/1.1\r\nHost: iamlinkd\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    (&stream).write_all(request.as_bytes())?;
    Ok(Sent { stream })
}

fn socket_nonblocking() -> Result<OwnedFd, SendError> {
    socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)
        .map_err(|e| SendError::Io(e.into()))
}

impl Sent {
    /// Reads the answer's JSON body, waiting at most `bound` in all.
    pub fn answer<T: serde::de::DeserializeOwned>(mut self, bound: Duration) -> Result<T, SendError> {
        let until = Instant::now() + bound;
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 512];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SendError::NoAnswer(bound));
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(SendError::NoAnswer(bound))
                }
                Err(e) => return Err(e.into()),
            }
            if buf.len() > 64 * 1024 {
                break;
            }
        }
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if status != 200 {
            return Err(SendError::Refused { status, body: body.trim().chars().take(300).collect() });
        }
        serde_json::from_str(body.trim())
            .map_err(|e| SendError::Refused { status, body: format!("unreadable answer {body:?}: {e}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_as_sent() {
        let p = prefetch_path("abc.eth0", Duration::from_millis(750));
        let (path, query) = p.split_once('?').unwrap();
        assert_eq!(
            Event::parse(path, Some(query)),
            Some(Event::Prefetch { key: "abc.eth0".into(), wait: Duration::from_millis(750) })
        );
        let r = release_path("abc.eth0", 42);
        let (path, query) = r.split_once('?').unwrap();
        assert_eq!(
            Event::parse(path, Some(query)),
            Some(Event::Release { key: "abc.eth0".into(), deadline_boottime_ns: 42 })
        );
    }

    #[test]
    fn other_paths_and_a_release_without_deadline_are_no_message() {
        assert_eq!(Event::parse("/v1/pods/abc.eth0/release", None), None);
        assert_eq!(Event::parse("/v1/pods/a/b/prefetch", None), None);
        assert_eq!(Event::parse("/v1/status", None), None);
        assert_eq!(Event::parse("/v1/pods//prefetch", None), None);
    }

    #[test]
    fn a_missing_socket_is_not_listening_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let e = send(&dir.path().join("none.sock"), "/v1/status", Duration::from_millis(5)).err().unwrap();
        assert!(matches!(e, SendError::NotListening(_)), "{e}");
        assert!(t.elapsed() < Duration::from_millis(100));
    }
}
