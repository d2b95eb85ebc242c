//! Closing every connection to iamlinkd that carries one slot's mark, when that slot is freed:
//! the only code that destroys sockets.
//!
//! A connection's identity is the mark its SYN got from the interception rule, kept by the
//! kernel on the request socket and on the accepted socket. A connection of a pod whose slot is
//! freed (its record removed at DEL) would otherwise keep that mark while the slot goes to the
//! next pod: queued in iamlinkd's listen queue, or half open with its last ACK held back until
//! after the next ADD (then its socket is created, and dated, after the new record). So the
//! slot is freed only once none is left: the node's TCP sockets on iamlinkd's port(s) whose mark
//! carries the slot's bits, in every state but listening, TIME_WAIT and CLOSE (request sockets
//! included), are found with one `NETLINK_SOCK_DIAG` dump per family and port, filtered in the
//! kernel (`INET_DIAG_REQ_BYTECODE`: local port, mark), and each is destroyed (`SOCK_DESTROY`:
//! the client gets a reset). Needs `CAP_NET_ADMIN` and `CONFIG_INET_DIAG_DESTROY`.
//!
//! Encoded by hand from `linux/sock_diag.h` and `linux/inet_diag.h`: `netlink-packet-sock-diag`
//! (0.5) emits no request attributes, so it cannot carry the bytecode, and has no
//! `TCP_NEW_SYN_RECV` state.

use std::io;

use nix::errno::Errno;
use nix::sys::socket::SockProtocol;

use crate::intercept::RuleSet;
use crate::mark::MarkMask;
use crate::nlsock::{Message, NlSocket, ReceiveError, NLMSG_DONE, NLMSG_HDRLEN, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use crate::store::StoreLock;

// linux/sock_diag.h
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
// linux/inet_diag.h
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then the socket id.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCKID_LEN: usize = 48;
/// Where the socket id starts in `struct inet_diag_msg` (after family, state, timer, retrans).
const MSG_SOCKID_AT: usize = 4;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_MARK_COND: u8 = 10;
const INET_DIAG_BC_S_EQ: u8 = 11;
// linux/tcp_states.h
const TCP_LISTEN: u32 = 10;
const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSE: u32 = 7;
/// `TCP_NEW_SYN_RECV`: a request socket, the handshake not yet completed by the client's ACK.
const TCP_NEW_SYN_RECV: u32 = 12;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Every state a connection can speak from, or still complete its handshake from: not
/// listening (the listener itself), not TIME_WAIT or CLOSE (nothing more is read there).
const STATES: u32 =
    ((1u32 << (TCP_NEW_SYN_RECV + 1)) - 1) & !(1 << TCP_LISTEN | 1 << TCP_TIME_WAIT | 1 << TCP_CLOSE | 1);
/// Rounds of dump-and-destroy before sockets that keep appearing count as surviving: a packet
/// that took the slot's mark just before its entry went may still create one.
const ROUNDS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum SockDestroyError {
    #[error("{what}: {source}")]
    Netlink { what: String, source: io::Error },
    #[error("{what}: the kernel answered {errno}{hint}")]
    Kernel { what: String, errno: Errno, hint: &'static str },
    #[error("{0} connections with the slot's mark are still open after {ROUNDS} rounds of closing them")]
    Survived(usize),
    #[error("unexpected netlink answer while {0}")]
    Parse(String),
}

/// Which sockets are a slot's: the node's TCP sockets with a local port among `ports` (where
/// iamlinkd listens) whose mark has `slot`'s bits under `mask`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotSockets {
    pub ports: Vec<u16>,
    pub mask: MarkMask,
    pub slot: u32,
}

impl SlotSockets {
    /// `slot`'s connections to iamlinkd as `rules` place it (its IPv4 and IPv6 ports).
    pub fn of(rules: &RuleSet, slot: u32) -> Self {
        let ports = std::iter::once(rules.daemon.port()).chain(rules.daemon6.map(|a| a.port())).collect();
        SlotSockets { ports, mask: rules.mask, slot }
    }

    /// The kernel's filter for one port: `sport == port && mark & mask == mark_for(slot)`. An op
    /// jumps `yes` bytes when it holds, `no` when not; running off the end accepts, a jump 4
    /// bytes past it rejects.
    fn bytecode(&self, port: u16) -> Vec<u8> {
        let mut bc = Vec::with_capacity(20);
        // struct inet_diag_bc_op {code, yes, no}, then the port in the next op's `no`.
        bc.extend_from_slice(&[INET_DIAG_BC_S_EQ, 8]);
        bc.extend_from_slice(&24u16.to_ne_bytes());
        bc.extend_from_slice(&[0, 0]);
        bc.extend_from_slice(&port.to_ne_bytes());
        // The mark op, then struct inet_diag_markcond {mark, mask}.
        bc.extend_from_slice(&[INET_DIAG_BC_MARK_COND, 12]);
        bc.extend_from_slice(&16u16.to_ne_bytes());
        bc.extend_from_slice(&self.mask.mark_for(self.slot).to_ne_bytes());
        bc.extend_from_slice(&self.mask.bits().to_ne_bytes());
        bc
    }
}

/// Destroys the node's connections to iamlinkd that carry `which` slot's mark (this network
/// namespace: the node's); returns how many. Called under the store lock, after the slot's
/// map element is gone (no new SYN gets the bits) and before its record (so the slot cannot be
/// taken meanwhile). An error means such a connection may still be open: the slot must stay
/// taken.
pub fn destroy_slot_sockets(_lock: &StoreLock, which: &SlotSockets) -> Result<usize, SockDestroyError> {
    let mut diag = SockDiag::open()?;
    let mut destroyed = 0;
    for _ in 0..ROUNDS {
        let found = diag.find(which)?;
        if found.is_empty() {
            return Ok(destroyed);
        }
        for s in &found {
            diag.destroy(s)?;
            destroyed += 1;
        }
    }
    match diag.find(which)?.len() {
        0 => Ok(destroyed),
        n => Err(SockDestroyError::Survived(n)),
    }
}

/// One socket as the dump names it: its family and `struct inet_diag_sockid` (cookie included,
/// so a destroy never reaches a later socket with the same addresses, nor the listener the
/// kernel's lookup falls back to once the socket is gone).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Found {
    family: u8,
    id: [u8; SOCKID_LEN],
}

/// A `NETLINK_SOCK_DIAG` socket in the namespace it was opened in.
struct SockDiag {
    socket: NlSocket,
}

fn io_error(what: &str) -> impl Fn(Errno) -> SockDestroyError + '_ {
    move |e| SockDestroyError::Netlink { what: what.to_string(), source: io::Error::from(e) }
}

fn kernel_error(what: &str, code: i32) -> SockDestroyError {
    let errno = Errno::from_raw(-code);
    let hint = match errno {
        Errno::EOPNOTSUPP => " (the kernel lacks CONFIG_INET_DIAG_DESTROY)",
        Errno::EPERM => " (needs CAP_NET_ADMIN)",
        _ => "",
    };
    SockDestroyError::Kernel { what: what.to_string(), errno, hint }
}

/// A `struct inet_diag_req_v2` message (header included) for `family`, with `id` and `attr`.
fn request(kind: u16, flags: u16, seq: u32, family: u8, states: u32, id: &[u8; SOCKID_LEN], attr: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN + 4 + attr.len());
    m.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set below
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(id);
    if !attr.is_empty() {
        m.extend_from_slice(&((4 + attr.len()) as u16).to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        m.extend_from_slice(attr);
    }
    let len = m.len() as u32;
    m[..4].copy_from_slice(&len.to_ne_bytes());
    m
}

impl SockDiag {
    fn open() -> Result<Self, SockDestroyError> {
        let socket = NlSocket::open(SockProtocol::NetlinkSockDiag).map_err(|(step, e)| io_error(step)(e))?;
        Ok(SockDiag { socket })
    }

    /// The messages of one datagram that answer `seq`.
    fn receive(&mut self, seq: u32, what: &str) -> Result<Vec<Message>, SockDestroyError> {
        let messages = self.socket.receive(true).map_err(|e| match e {
            ReceiveError::Io(e) => io_error(what)(e),
            e => SockDestroyError::Parse(format!("{what} ({e})")),
        })?;
        Ok(messages.unwrap_or_default().into_iter().filter(|m| m.seq == seq).collect())
    }

    /// The slot's sockets now, both families, every port.
    fn find(&mut self, which: &SlotSockets) -> Result<Vec<Found>, SockDestroyError> {
        let mut found = vec![];
        let mut ports = which.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        for family in [AF_INET, AF_INET6] {
            for &port in &ports {
                found.extend(self.dump(family, &which.bytecode(port))?);
            }
        }
        Ok(found)
    }

    fn dump(&mut self, family: u8, bytecode: &[u8]) -> Result<Vec<Found>, SockDestroyError> {
        let what = "listing the slot's connections (sock_diag)";
        let seq = self.socket.next_seq();
        let dump = request(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, seq, family, STATES, &[0; SOCKID_LEN], bytecode);
        self.socket.send(&dump).map_err(io_error(what))?;
        let mut found = vec![];
        loop {
            for m in self.receive(seq, what)? {
                match (m.kind, m.error()) {
                    (NLMSG_DONE, _) => return Ok(found),
                    (_, Some(e)) => return Err(kernel_error(what, e)),
                    (SOCK_DIAG_BY_FAMILY, _) => {
                        let id = m
                            .payload
                            .get(MSG_SOCKID_AT..MSG_SOCKID_AT + SOCKID_LEN)
                            .and_then(|b| <[u8; SOCKID_LEN]>::try_from(b).ok())
                            .ok_or_else(|| SockDestroyError::Parse(what.to_string()))?;
                        found.push(Found { family: m.payload[0], id });
                    }
                    (kind, _) => return Err(SockDestroyError::Parse(format!("{what} (message type {kind})"))),
                }
            }
        }
    }

    /// Destroys one socket; one already gone (`ENOENT`) is fine.
    fn destroy(&mut self, s: &Found) -> Result<(), SockDestroyError> {
        let what = "closing a connection with the slot's mark (SOCK_DESTROY)";
        let seq = self.socket.next_seq();
        self.socket
            .send(&request(SOCK_DESTROY, NLM_F_ACK, seq, s.family, STATES, &s.id, &[]))
            .map_err(io_error(what))?;
        loop {
            for m in self.receive(seq, what)? {
                match m.error() {
                    Some(0) => return Ok(()),
                    Some(e) if e == -(Errno::ENOENT as i32) => return Ok(()),
                    Some(e) => return Err(kernel_error(what, e)),
                    None => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_is_port_then_mark_and_rejects_past_its_end() {
        let which = SlotSockets { ports: vec![8181], mask: MarkMask::new(0x307f).unwrap(), slot: 0x81 };
        let bc = which.bytecode(8181);
        assert_eq!(bc.len(), 20);
        assert_eq!(&bc[..4], &[INET_DIAG_BC_S_EQ, 8, 24, 0], "yes: next op; no: 4 past the end");
        assert_eq!(u16::from_ne_bytes([bc[6], bc[7]]), 8181);
        assert_eq!(&bc[8..12], &[INET_DIAG_BC_MARK_COND, 12, 16, 0]);
        assert_eq!(u32::from_ne_bytes(bc[12..16].try_into().unwrap()), 0x1001, "slot 0x81 under 0x307f");
        assert_eq!(u32::from_ne_bytes(bc[16..20].try_into().unwrap()), 0x307f);
    }

    #[test]
    fn every_state_but_listen_time_wait_and_close_is_asked_for() {
        for state in 1..=12 {
            let wanted = ![TCP_LISTEN, TCP_TIME_WAIT, TCP_CLOSE].contains(&state);
            assert_eq!(STATES & (1 << state) != 0, wanted, "state {state}");
        }
        assert_eq!(STATES & 1, 0);
    }

    /// Against the kernel, in a network namespace of its own (root only).
    mod kernel {
        use super::*;
        use crate::mark::MarkMask;
        use crate::store::Store;
        use crate::test_netns::fresh_netns;
        use nix::sys::socket::{setsockopt, sockopt, AddressFamily, SockFlag, SockType};
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        use std::os::fd::{AsFd, AsRawFd};

        /// A connection to `port` on loopback whose accepted side carries `mark`, as iamlinkd's
        /// do (tcp_fwmark_accept, the client's SO_MARK standing in for the interception rule).
        fn marked(port: u16, mark: u32) -> TcpStream {
            let client =
                nix::sys::socket::socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
            setsockopt(&client, sockopt::Mark, &mark).unwrap();
            let to = nix::sys::socket::SockaddrIn::new(127, 0, 0, 1, port);
            nix::sys::socket::connect(client.as_fd().as_raw_fd(), &to).unwrap();
            TcpStream::from(client)
        }

        /// Whether the client's side is still open: a reset reads as an error, an open one as
        /// would-block.
        fn open(client: &mut TcpStream) -> bool {
            client.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            matches!(client.read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }

        #[test]
        fn only_the_slots_connections_to_the_daemons_port_are_closed() {
            std::thread::spawn(|| {
                if !fresh_netns() {
                    return;
                }
                std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", b"1").unwrap();
                let lo = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap();
                assert!(lo.success());
                let dir = tempfile::tempdir().unwrap();
                let store = Store::open(dir.path()).unwrap();
                let mask = MarkMask::new(0x307f).unwrap();
                let daemon = TcpListener::bind("127.0.0.1:0").unwrap();
                let elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
                let (port, other_port) = (daemon.local_addr().unwrap().port(), elsewhere.local_addr().unwrap().port());
                // Slot 5's bits with another agent's bit beside them: only iamlink's bits count.
                let slot5 = mask.mark_for(5) | 0x8000;
                // Accepted, queued, and other slot / other port, all left open.
                let mut accepted = marked(port, slot5);
                let (mut accepted_server, _) = daemon.accept().unwrap();
                let mut queued = marked(port, mask.mark_for(5));
                let mut other_slot = marked(port, mask.mark_for(6));
                let mut other_port = marked(other_port, slot5);
                let mut unmarked = marked(port, 0);
                for c in [&mut accepted, &mut queued, &mut other_slot, &mut other_port, &mut unmarked] {
                    assert!(open(c));
                }

                let which = SlotSockets { ports: vec![port, port], mask, slot: 5 };
                let destroyed = destroy_slot_sockets(&store.lock().unwrap(), &which).unwrap();
                assert_eq!(destroyed, 2, "the accepted and the queued connection of slot 5");
                assert!(!open(&mut accepted), "slot 5's accepted connection is reset");
                assert!(!open(&mut queued), "slot 5's queued connection is reset");
                assert!(accepted_server.write_all(b"x").is_err(), "the server side is closed too");
                for (what, c) in
                    [("other slot", &mut other_slot), ("other port", &mut other_port), ("no mark", &mut unmarked)]
                {
                    assert!(open(c), "{what} survives");
                }
                assert_eq!(destroy_slot_sockets(&store.lock().unwrap(), &which).unwrap(), 0, "none left");
                // The queue still serves: the survivors are accepted in order.
                assert!(daemon.accept().is_ok());
            })
            .join()
            .unwrap();
        }
    }
}
