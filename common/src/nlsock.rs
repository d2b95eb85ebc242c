//! A raw netlink socket and the messages of one datagram: what the hand-encoded netlink clients
//! ([`crate::intercept`]'s nf_tables messages, [`crate::sock_destroy`]'s sock_diag ones) share.
//! Each encodes and decodes its own messages; this only sends bytes and splits what comes back.
//! Names are those of `linux/netlink.h`.

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};
use nix::sys::time::TimeVal;

pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;

/// How long an answer may take; the kernel answers a request while it is sent, so this only
/// bounds a kernel that never answers.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// One message of the kernel's: type, flags, sequence number and the payload after the header.
pub struct Message {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: Vec<u8>,
}

impl Message {
    /// `struct nlmsgerr`'s error (0: an acknowledgement), for `NLMSG_ERROR`; a payload too short
    /// to hold one reads as `-EPROTO`.
    pub fn error(&self) -> Option<i32> {
        (self.kind == NLMSG_ERROR).then(|| {
            self.payload.get(..4).map_or(-(Errno::EPROTO as i32), |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        })
    }
}

/// Why [`NlSocket::receive`] failed.
#[derive(Debug)]
pub enum ReceiveError {
    Io(Errno),
    /// A message whose length overruns the datagram.
    Malformed {
        len: usize,
        received: usize,
    },
}

impl fmt::Display for ReceiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReceiveError::Io(e) => write!(f, "{e}"),
            ReceiveError::Malformed { len, received } => write!(f, "a netlink message of {len} bytes in {received}"),
        }
    }
}

/// A netlink socket of one protocol, in the namespace it was opened in.
pub struct NlSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl NlSocket {
    /// Opened, bound, with a bounded wait for answers; on failure, the step that failed.
    pub fn open(protocol: SockProtocol) -> Result<Self, (&'static str, Errno)> {
        let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, protocol)
            .map_err(|e| ("opening a netlink socket", e))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|e| ("binding the netlink socket", e))?;
        let timeout = TimeVal::new(ANSWER_TIMEOUT.as_secs() as _, 0);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).map_err(|e| ("setting the answer timeout", e))?;
        // Sequence numbers only pair answers with requests on this socket.
        Ok(NlSocket { fd, seq: std::process::id(), buf: vec![0; 1 << 16] })
    }

    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    pub fn send(&self, bytes: &[u8]) -> Result<(), Errno> {
        sendto(self.fd.as_raw_fd(), bytes, &NetlinkAddr::new(0, 0), MsgFlags::empty()).map(|_| ())
    }

    /// The messages of one datagram; `wait`: block until one comes (bounded by the timeout),
    /// else `None` when none is there.
    pub fn receive(&mut self, wait: bool) -> Result<Option<Vec<Message>>, ReceiveError> {
        let flags = if wait { MsgFlags::empty() } else { MsgFlags::MSG_DONTWAIT };
        let n = match recv(self.fd.as_raw_fd(), &mut self.buf, flags) {
            Ok(n) => n,
            Err(Errno::EAGAIN) if !wait => return Ok(None),
            Err(e) => return Err(ReceiveError::Io(e)),
        };
        let mut messages = vec![];
        let mut rest = &self.buf[..n];
        while rest.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if len < NLMSG_HDRLEN || len > rest.len() {
                return Err(ReceiveError::Malformed { len, received: n });
            }
            messages.push(Message {
                kind: u16::from_ne_bytes([rest[4], rest[5]]),
                flags: u16::from_ne_bytes([rest[6], rest[7]]),
                seq: u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]),
                payload: rest[NLMSG_HDRLEN..len].to_vec(),
            });
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
        Ok(Some(messages))
    }
}
