//! The one accept loop of iamlinkd's listeners (pods, metrics, the local API): a failed accept
//! (EMFILE and friends) is logged and waited out instead of spun on.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tracing::warn;

/// Long enough for a closing connection to free a descriptor, short enough to go unnoticed.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

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

/// Hands every accepted connection to `handle`, for the daemon's lifetime. `what` names the
/// listener in the log.
pub async fn accept_loop<L: Listener>(what: &'static str, listener: L, mut handle: impl FnMut(L::Stream, L::Peer)) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => handle(stream, peer),
            Err(e) => {
                warn!(listener = what, error = %e, "accept failed; retrying");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}
