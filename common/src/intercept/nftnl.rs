//! The few nf_tables messages the plugin needs, encoded by hand on a `NETLINK_NETFILTER` socket:
//! no `nft` process (≈ 2.6 ms of start-up each) and no reading of the whole rule set on ADD, DEL
//! or CHECK. This module only encodes, sends and decodes; what to write is decided by
//! [`super`], the rule set's one owner.
//!
//! Names are those of `linux/netfilter/nf_tables.h` and `linux/netfilter/nfnetlink.h`. The
//! messages are the ones `nft --debug=mnl` shows nft 1.0 sending for the same commands, so the
//! kernel holds the same objects whichever wrote them (the tests compare `nft -j list`).
//! Written from the kernel's UAPI headers; no libnftnl code (GPL) is used.

use std::collections::HashMap;

use nix::errno::Errno;
use nix::sys::socket::SockProtocol;

use crate::nlsock::{Message, NlSocket, ReceiveError, NLMSG_DONE, NLMSG_HDRLEN, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

use super::InterceptError;

// linux/netlink.h
/// Set on a dump's messages when the rule set changed while it was being dumped.
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

// linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFNL_MSG_BATCH_BEGIN` (= `NLMSG_MIN_TYPE`): opens a transaction; all of it applies or none.
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
/// `NFNL_BATCH_GENID`: the transaction applies only while the rule set is at this generation
/// (else the kernel answers `ERESTART`).
const NFNL_BATCH_GENID: u16 = 1;
const NFNETLINK_V0: u8 = 0;
/// `NFPROTO_INET`: the family of `table inet iamlink`.
const NFPROTO_INET: u8 = 1;
const AF_UNSPEC: u8 = 0;

// enum nf_tables_msg_types
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;

// enum nft_table_attributes
const NFTA_TABLE_NAME: u16 = 1;
// enum nft_chain_attributes
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
/// A base chain's hook and priority (absent on a regular chain), policy and type.
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
/// How many references the chain has: its own rules, and every jump or goto to it.
const NFTA_CHAIN_USE: u16 = 6;
const NFTA_CHAIN_TYPE: u16 = 7;
// enum nft_lookup_attributes
const NFTA_LOOKUP_SET: u16 = 1;
/// nft names the anonymous sets of a rule (`ip daddr { a, b }`) `__set<n>`, numbered per table.
const ANONYMOUS_SET_PREFIX: &str = "__set";
// enum nft_rule_attributes
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
// enum nft_list_attributes
const NFTA_LIST_ELEM: u16 = 1;
// enum nft_expr_attributes
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
// enum nft_meta_attributes, enum nft_meta_keys
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_META_SREG: u16 = 3;
const NFT_META_MARK: u32 = 3;
// enum nft_bitwise_attributes, enum nft_bitwise_ops
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_BITWISE_OP: u16 = 6;
const NFT_BITWISE_BOOL: u32 = 0;
/// `NFT_REG_1`: the register nft uses for `meta mark set meta mark or …`.
const NFT_REG_1: u32 = 1;
// enum nft_set_elem_list_attributes, enum nft_set_elem_attributes
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
// enum nft_data_attributes, enum nft_verdict_attributes, enum nft_verdicts
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;
// enum nft_gen_attributes
const NFTA_GEN_ID: u16 = 1;
/// `NFTNL_UDATA_RULE_COMMENT`: the type of a rule comment in the rule's user data, which nft
/// writes as type-length-value records of one byte each, the value NUL-terminated.
const UDATA_RULE_COMMENT: u8 = 0;
/// `IFNAMSIZ`: an `ifname` set key is the name zero-padded to 16 bytes.
const IFNAMSIZ: usize = 16;

/// One netlink message under construction: header, `struct nfgenmsg`, attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set in `finish`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel
        buf.extend_from_slice(&[family, NFNETLINK_V0]);
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg { buf }
    }

    /// An nf_tables object message (`NFNL_SUBSYS_NFTABLES << 8 | msg`) in the inet family.
    fn nft(msg: u16, flags: u16, seq: u32) -> Self {
        Msg::new(NFNL_SUBSYS_NFTABLES << 8 | msg, NLM_F_REQUEST | flags, seq, NFPROTO_INET, 0)
    }

    fn put(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
        self
    }

    /// `NLA_STRING` (`NLA_NUL_STRING` in the kernel's policy): NUL-terminated.
    fn put_str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.put(kind, &v)
    }

    /// `NLA_BE32`: nf_tables numbers are big-endian.
    fn put_be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_be_bytes())
    }

    /// A nested attribute (`NLA_F_NESTED`, as nft sets it) holding what `fill` puts.
    fn nest(&mut self, kind: u16, fill: impl FnOnce(&mut Self)) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        fill(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// One expression of a rule: `NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { … } }`.
    fn expr(&mut self, name: &str, data: impl FnOnce(&mut Self)) -> &mut Self {
        self.nest(NFTA_LIST_ELEM, |m| {
            m.put_str(NFTA_EXPR_NAME, name);
            m.nest(NFTA_EXPR_DATA, data);
        })
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// The attributes in `buf`: (type without flags, value).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, value))
    })
}

fn attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

/// A NUL-terminated (or NUL-padded) string value.
fn string(v: &[u8]) -> String {
    String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
}

fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

/// The comment in a rule's `NFTA_RULE_USERDATA`.
fn comment(mut udata: &[u8]) -> Option<String> {
    while let [kind, len, rest @ ..] = udata {
        let value = rest.get(..*len as usize)?;
        if *kind == UDATA_RULE_COMMENT {
            return Some(string(value));
        }
        udata = &rest[*len as usize..];
    }
    None
}

/// The bits of `meta mark set meta mark or <bits>` (the expressions [`Batch::add_mark_or_rule`]
/// writes, in any registers); `None` for any other rule.
fn mark_or(exprs: &[u8]) -> Option<u32> {
    let exprs: Vec<(String, &[u8])> = attrs(exprs)
        .map(|(_, e)| Some((attr(e, NFTA_EXPR_NAME).map(string)?, attr(e, NFTA_EXPR_DATA)?)))
        .collect::<Option<_>>()?;
    let [(load, load_data), (bitwise, bw), (set, set_data)] = exprs.as_slice() else { return None };
    let u32_of = |data: &[u8], kind| attr(data, kind).and_then(be32);
    let value_of = |kind| {
        let v = attr(attr(bw, kind)?, NFTA_DATA_VALUE)?;
        Some(u32::from_ne_bytes(v.try_into().ok()?))
    };
    let loaded = u32_of(load_data, NFTA_META_DREG)?;
    let result = u32_of(bw, NFTA_BITWISE_DREG)?;
    let (mask, xor) = (value_of(NFTA_BITWISE_MASK)?, value_of(NFTA_BITWISE_XOR)?);
    let shape = load == "meta"
        && bitwise == "bitwise"
        && set == "meta"
        && u32_of(load_data, NFTA_META_KEY) == Some(NFT_META_MARK)
        && u32_of(set_data, NFTA_META_KEY) == Some(NFT_META_MARK)
        && u32_of(bw, NFTA_BITWISE_SREG) == Some(loaded)
        && u32_of(bw, NFTA_BITWISE_LEN) == Some(4)
        && u32_of(bw, NFTA_BITWISE_OP).unwrap_or(NFT_BITWISE_BOOL) == NFT_BITWISE_BOOL
        && u32_of(set_data, NFTA_META_SREG) == Some(result);
    (shape && mask == !xor).then_some(xor)
}

/// What the daemon checks of one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleFacts {
    pub chain: String,
    pub comment: Option<String>,
    /// `Some(bits)` when the rule is exactly `meta mark set meta mark or <bits>`.
    pub mark_or: Option<u32>,
    /// The rule's expressions, each with every attribute the kernel reports, an anonymous set
    /// written as its elements instead of its per-table name: equal bytes are the same rule,
    /// whichever table holds it and however its sets were numbered.
    pub expressions: Vec<u8>,
}

/// What the daemon checks of one chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainFacts {
    pub name: String,
    /// A base chain's hook, priority, type and policy as the kernel reports them; `None` for a
    /// regular chain (reached only by a jump).
    pub hook: Option<Vec<u8>>,
}

/// One nf_tables change notification (`NFNLGRP_NFTABLES`), as far as iamlinkd's guard tells
/// them apart: decoded here, with the same attribute reading as every other message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub table: String,
    pub object: Object,
}

/// What a [`Notice`] changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    /// The table was created or deleted.
    Table,
    /// A chain was created or deleted; `hooked`: a base chain.
    Chain {
        name: String,
        hooked: bool,
    },
    /// A rule was added; `mark_or` as in [`RuleFacts::mark_or`].
    NewRule {
        chain: String,
        mark_or: Option<u32>,
    },
    DelRule {
        chain: String,
    },
    /// An element of `set` was added or deleted.
    Element {
        set: String,
    },
    /// Anything else in a table (a set, an object, a flowtable, a table's flags).
    Other,
}

/// The notifications of one datagram, in order; other subsystems' messages and new generations
/// (`NFT_MSG_NEWGEN`, which names no table) are left out.
pub fn notices(datagram: &[u8]) -> Vec<Notice> {
    let mut notices = vec![];
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < NLMSG_HDRLEN || len > rest.len() {
            break;
        }
        // After the header, `struct nfgenmsg` (4 bytes), then the attributes.
        let body = &rest[(NLMSG_HDRLEN + 4).min(len)..len];
        let (subsys, msg) = (kind >> 8, kind & 0xff);
        // The first attribute of every object message is its table's name.
        let table = attr(body, NFTA_TABLE_NAME).map(string);
        if let (NFNL_SUBSYS_NFTABLES, Some(table)) = (subsys, table.filter(|_| msg != NFT_MSG_NEWGEN)) {
            let name = |kind| attr(body, kind).map(string).unwrap_or_default();
            let object = match msg {
                NFT_MSG_NEWTABLE | NFT_MSG_DELTABLE => Object::Table,
                NFT_MSG_NEWCHAIN | NFT_MSG_DELCHAIN => {
                    Object::Chain { name: name(NFTA_CHAIN_NAME), hooked: attr(body, NFTA_CHAIN_HOOK).is_some() }
                }
                NFT_MSG_NEWRULE => Object::NewRule {
                    chain: name(NFTA_RULE_CHAIN),
                    mark_or: attr(body, NFTA_RULE_EXPRESSIONS).and_then(mark_or),
                },
                NFT_MSG_DELRULE => Object::DelRule { chain: name(NFTA_RULE_CHAIN) },
                NFT_MSG_NEWSETELEM | NFT_MSG_DELSETELEM => Object::Element { set: name(NFTA_SET_ELEM_LIST_SET) },
                _ => Object::Other,
            };
            notices.push(Notice { table, object });
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    notices
}

/// One element of an `ifname : verdict` map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerdictElement {
    pub key: String,
    /// `NFTA_VERDICT_CODE` (`NFT_JUMP` is -3).
    pub code: i32,
    /// `NFTA_VERDICT_CHAIN`, for a jump or goto.
    pub chain: Option<String>,
}

impl VerdictElement {
    /// The chain jumped to, when the verdict is `jump`.
    pub fn jump_target(&self) -> Option<&str> {
        (self.code == NFT_JUMP).then_some(self.chain.as_deref()).flatten()
    }
}

/// One change of a [`Batch`]: message type, flags, what fills its attributes, and its words.
type BatchMsg = (u16, u16, Box<dyn Fn(&mut Msg)>, String);

/// The changes of one transaction, in order; [`Nft::commit`] sends them between
/// `NFNL_MSG_BATCH_BEGIN` and `NFNL_MSG_BATCH_END`.
#[derive(Default)]
pub struct Batch {
    msgs: Vec<BatchMsg>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    fn push(&mut self, msg: u16, flags: u16, what: String, fill: impl Fn(&mut Msg) + 'static) {
        self.msgs.push((msg, flags, Box::new(fill), what));
    }

    /// `add chain inet <table> <name>`: `NFT_MSG_NEWCHAIN` with `NLM_F_CREATE` (no `NLM_F_EXCL`:
    /// an existing chain is fine), `NFTA_CHAIN_TABLE`, `NFTA_CHAIN_NAME`; a regular chain.
    pub fn add_chain(&mut self, table: &str, name: &str) {
        let (t, n) = (table.to_string(), name.to_string());
        self.push(NFT_MSG_NEWCHAIN, NLM_F_CREATE, format!("add chain {name}"), move |m| {
            m.put_str(NFTA_CHAIN_TABLE, &t).put_str(NFTA_CHAIN_NAME, &n);
        });
    }

    /// `delete chain inet <table> <name>`: `NFT_MSG_DELCHAIN` (its rules go with it).
    pub fn delete_chain(&mut self, table: &str, name: &str) {
        let (t, n) = (table.to_string(), name.to_string());
        self.push(NFT_MSG_DELCHAIN, 0, format!("delete chain {name}"), move |m| {
            m.put_str(NFTA_CHAIN_TABLE, &t).put_str(NFTA_CHAIN_NAME, &n);
        });
    }

    /// `flush chain inet <table> <chain>`: `NFT_MSG_DELRULE` naming the chain and no rule handle.
    pub fn flush_chain(&mut self, table: &str, chain: &str) {
        let (t, c) = (table.to_string(), chain.to_string());
        self.push(NFT_MSG_DELRULE, 0, format!("flush chain {chain}"), move |m| {
            m.put_str(NFTA_RULE_TABLE, &t).put_str(NFTA_RULE_CHAIN, &c);
        });
    }

    /// `add rule inet <table> <chain> meta mark set meta mark or <bits>`: `NFT_MSG_NEWRULE`
    /// (`NLM_F_CREATE | NLM_F_APPEND`) with three expressions, as nft compiles it:
    /// `meta load mark => reg 1`, `bitwise reg 1 = (reg 1 & ~bits) ^ bits`, `meta set mark with reg 1`.
    /// The mask and xor are in host order: the mark is a host-order `u32` in the register.
    pub fn add_mark_or_rule(&mut self, table: &str, chain: &str, bits: u32) {
        let (t, c) = (table.to_string(), chain.to_string());
        let what = format!("add rule {chain} meta mark set meta mark or {bits:#x}");
        self.push(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, what, move |m| {
            m.put_str(NFTA_RULE_TABLE, &t).put_str(NFTA_RULE_CHAIN, &c);
            m.nest(NFTA_RULE_EXPRESSIONS, |m| {
                m.expr("meta", |m| {
                    m.put_be32(NFTA_META_KEY, NFT_META_MARK).put_be32(NFTA_META_DREG, NFT_REG_1);
                });
                m.expr("bitwise", |m| {
                    m.put_be32(NFTA_BITWISE_SREG, NFT_REG_1)
                        .put_be32(NFTA_BITWISE_DREG, NFT_REG_1)
                        .put_be32(NFTA_BITWISE_OP, NFT_BITWISE_BOOL)
                        .put_be32(NFTA_BITWISE_LEN, 4);
                    m.nest(NFTA_BITWISE_MASK, |m| {
                        m.put(NFTA_DATA_VALUE, &(!bits).to_ne_bytes());
                    });
                    m.nest(NFTA_BITWISE_XOR, |m| {
                        m.put(NFTA_DATA_VALUE, &bits.to_ne_bytes());
                    });
                });
                m.expr("meta", |m| {
                    m.put_be32(NFTA_META_KEY, NFT_META_MARK).put_be32(NFTA_META_SREG, NFT_REG_1);
                });
            });
        });
    }

    /// `add element inet <table> <map> { "<ifname>" : jump <chain> }`: `NFT_MSG_NEWSETELEM`
    /// (`NLM_F_CREATE`), the key an `NFTA_DATA_VALUE` of [`IFNAMSIZ`] bytes, the data an
    /// `NFTA_DATA_VERDICT { NFTA_VERDICT_CODE NFT_JUMP, NFTA_VERDICT_CHAIN }`.
    pub fn add_ifname_jump(&mut self, table: &str, map: &str, ifname: &str, chain: &str) {
        let (t, s, key, c) = (table.to_string(), map.to_string(), ifname_key(ifname), chain.to_string());
        let what = format!("add element {map} {{ \"{ifname}\" : jump {chain} }}");
        self.push(NFT_MSG_NEWSETELEM, NLM_F_CREATE, what, move |m| {
            m.put_str(NFTA_SET_ELEM_LIST_TABLE, &t).put_str(NFTA_SET_ELEM_LIST_SET, &s);
            m.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |m| {
                m.nest(NFTA_LIST_ELEM, |m| {
                    m.nest(NFTA_SET_ELEM_KEY, |m| {
                        m.put(NFTA_DATA_VALUE, &key);
                    });
                    m.nest(NFTA_SET_ELEM_DATA, |m| {
                        m.nest(NFTA_DATA_VERDICT, |m| {
                            m.put_be32(NFTA_VERDICT_CODE, NFT_JUMP as u32).put_str(NFTA_VERDICT_CHAIN, &c);
                        });
                    });
                });
            });
        });
    }

    /// `delete element inet <table> <map> { "<ifname>" }`: `NFT_MSG_DELSETELEM` with the key only.
    pub fn delete_ifname(&mut self, table: &str, map: &str, ifname: &str) {
        let (t, s, key) = (table.to_string(), map.to_string(), ifname_key(ifname));
        self.push(NFT_MSG_DELSETELEM, 0, format!("delete element {map} {{ \"{ifname}\" }}"), move |m| {
            m.put_str(NFTA_SET_ELEM_LIST_TABLE, &t).put_str(NFTA_SET_ELEM_LIST_SET, &s);
            m.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |m| {
                m.nest(NFTA_LIST_ELEM, |m| {
                    m.nest(NFTA_SET_ELEM_KEY, |m| {
                        m.put(NFTA_DATA_VALUE, &key);
                    });
                });
            });
        });
    }
}

/// Constants of the pod-side DNAT's messages (`linux/netfilter/nf_tables.h`).
const NFTA_TABLE_FLAGS: u16 = 2;
const NFT_TABLE_F_DORMANT: u32 = 1;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_ACCEPT: u32 = 1;
const NF_DROP: u32 = 0;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_2: u32 = 2;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFT_NAT_DNAT: u32 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const IPPROTO_TCP: u8 = 6;

/// What the pod-side DNAT does with a matched packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodNat {
    /// `dnat ip to <addr>:<port>` (or `ip6`): the address must be of the matched family.
    To(std::net::SocketAddr),
    Drop,
}

impl Batch {
    /// `add table inet <table>` (`{ flags dormant; }`: no chain of it is hooked):
    /// `NFT_MSG_NEWTABLE` with `NLM_F_CREATE` (an existing one is fine).
    pub fn add_table(&mut self, table: &str, dormant: bool) {
        let t = table.to_string();
        self.push(NFT_MSG_NEWTABLE, NLM_F_CREATE, format!("add table {table}"), move |m| {
            m.put_str(NFTA_TABLE_NAME, &t);
            if dormant {
                m.put_be32(NFTA_TABLE_FLAGS, NFT_TABLE_F_DORMANT);
            }
        });
    }

    /// `delete table inet <table>`: `NFT_MSG_DELTABLE`, everything in it goes.
    pub fn delete_table(&mut self, table: &str) {
        let t = table.to_string();
        self.push(NFT_MSG_DELTABLE, 0, format!("delete table {table}"), move |m| {
            m.put_str(NFTA_TABLE_NAME, &t);
        });
    }

    /// `add chain inet <table> <name> { type nat hook output priority <priority>; policy accept; }`.
    pub fn add_nat_output_chain(&mut self, table: &str, name: &str, priority: i32) {
        let (t, n) = (table.to_string(), name.to_string());
        self.push(NFT_MSG_NEWCHAIN, NLM_F_CREATE, format!("add chain {name} (nat output)"), move |m| {
            m.put_str(NFTA_CHAIN_TABLE, &t).put_str(NFTA_CHAIN_NAME, &n);
            m.nest(NFTA_CHAIN_HOOK, |m| {
                m.put_be32(NFTA_HOOK_HOOKNUM, NF_INET_LOCAL_OUT).put_be32(NFTA_HOOK_PRIORITY, priority as u32);
            });
            m.put_be32(NFTA_CHAIN_POLICY, NF_ACCEPT).put_str(NFTA_CHAIN_TYPE, "nat");
        });
    }

    /// `add rule inet <table> <chain> ip[6] daddr <daddr> tcp dport <dport> (dnat ip[6] to <to> | drop)`,
    /// as nft compiles it: `meta nfproto`, `meta l4proto`, the address and port loaded from the
    /// headers and compared, then the target in registers 1 and 2 and a `nat` expression (or
    /// a drop verdict).
    pub fn add_pod_nat_rule(&mut self, table: &str, chain: &str, daddr: std::net::IpAddr, dport: u16, nat: PodNat) {
        let (t, c) = (table.to_string(), chain.to_string());
        let what = format!("add rule {chain} daddr {daddr} tcp dport {dport} {nat:?}");
        self.push(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, what, move |m| {
            m.put_str(NFTA_RULE_TABLE, &t).put_str(NFTA_RULE_CHAIN, &c);
            let (nfproto, offset, addr) = match daddr {
                std::net::IpAddr::V4(a) => (NFPROTO_IPV4, 16, a.octets().to_vec()),
                std::net::IpAddr::V6(a) => (NFPROTO_IPV6, 24, a.octets().to_vec()),
            };
            m.nest(NFTA_RULE_EXPRESSIONS, |m| {
                meta_eq(m, NFT_META_NFPROTO, &[nfproto]);
                meta_eq(m, NFT_META_L4PROTO, &[IPPROTO_TCP]);
                payload_eq(m, NFT_PAYLOAD_NETWORK_HEADER, offset, &addr);
                payload_eq(m, NFT_PAYLOAD_TRANSPORT_HEADER, 2, &dport.to_be_bytes());
                match nat {
                    PodNat::To(to) => {
                        let (family, ip) = match to.ip() {
                            std::net::IpAddr::V4(a) => (NFPROTO_IPV4, a.octets().to_vec()),
                            std::net::IpAddr::V6(a) => (NFPROTO_IPV6, a.octets().to_vec()),
                        };
                        immediate_value(m, NFT_REG_1, &ip);
                        immediate_value(m, NFT_REG_2, &to.port().to_be_bytes());
                        m.expr("nat", |m| {
                            m.put_be32(NFTA_NAT_TYPE, NFT_NAT_DNAT)
                                .put_be32(NFTA_NAT_FAMILY, u32::from(family))
                                .put_be32(NFTA_NAT_REG_ADDR_MIN, NFT_REG_1)
                                .put_be32(NFTA_NAT_REG_PROTO_MIN, NFT_REG_2);
                        });
                    }
                    PodNat::Drop => {
                        m.expr("immediate", |m| {
                            m.put_be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
                            m.nest(NFTA_IMMEDIATE_DATA, |m| {
                                m.nest(NFTA_DATA_VERDICT, |m| {
                                    m.put_be32(NFTA_VERDICT_CODE, NF_DROP);
                                });
                            });
                        });
                    }
                }
            });
        });
    }
}

/// `meta load <key> => reg 1; cmp eq reg 1 <value>`.
fn meta_eq(m: &mut Msg, key: u32, value: &[u8]) {
    m.expr("meta", |m| {
        m.put_be32(NFTA_META_KEY, key).put_be32(NFTA_META_DREG, NFT_REG_1);
    });
    cmp_eq(m, value);
}

/// `payload load <len>b @ <base> + <offset> => reg 1; cmp eq reg 1 <value>`.
fn payload_eq(m: &mut Msg, base: u32, offset: u32, value: &[u8]) {
    m.expr("payload", |m| {
        m.put_be32(NFTA_PAYLOAD_DREG, NFT_REG_1)
            .put_be32(NFTA_PAYLOAD_BASE, base)
            .put_be32(NFTA_PAYLOAD_OFFSET, offset)
            .put_be32(NFTA_PAYLOAD_LEN, value.len() as u32);
    });
    cmp_eq(m, value);
}

fn cmp_eq(m: &mut Msg, value: &[u8]) {
    m.expr("cmp", |m| {
        m.put_be32(NFTA_CMP_SREG, NFT_REG_1).put_be32(NFTA_CMP_OP, NFT_CMP_EQ);
        m.nest(NFTA_CMP_DATA, |m| {
            m.put(NFTA_DATA_VALUE, value);
        });
    });
}

fn immediate_value(m: &mut Msg, reg: u32, value: &[u8]) {
    m.expr("immediate", |m| {
        m.put_be32(NFTA_IMMEDIATE_DREG, reg);
        m.nest(NFTA_IMMEDIATE_DATA, |m| {
            m.put(NFTA_DATA_VALUE, value);
        });
    });
}

/// An `ifname` key: the name zero-padded to `IFNAMSIZ` (names are validated shorter).
fn ifname_key(name: &str) -> [u8; IFNAMSIZ] {
    let mut key = [0u8; IFNAMSIZ];
    let n = name.len().min(IFNAMSIZ - 1);
    key[..n].copy_from_slice(&name.as_bytes()[..n]);
    key
}

/// A `NETLINK_NETFILTER` socket in the namespace it was opened in.
pub struct Nft {
    socket: NlSocket,
}

/// One answer of the kernel.
type Answer = Message;

/// What follows the netlink header of an nf_tables answer.
trait NfgenPayload {
    /// The attributes after `struct nfgenmsg`.
    fn attrs(&self) -> &[u8];
}

impl NfgenPayload for Message {
    fn attrs(&self) -> &[u8] {
        self.payload.get(4..).unwrap_or_default()
    }
}

fn io_error(what: &str) -> impl Fn(Errno) -> InterceptError + '_ {
    move |e| InterceptError::Netlink { what: what.to_string(), source: std::io::Error::from(e) }
}

impl Nft {
    pub fn open() -> Result<Self, InterceptError> {
        let socket = NlSocket::open(SockProtocol::NetlinkNetFilter).map_err(|(step, e)| io_error(step)(e))?;
        Ok(Nft { socket })
    }

    fn next_seq(&mut self) -> u32 {
        self.socket.next_seq()
    }

    fn send(&self, bytes: &[u8], what: &str) -> Result<(), InterceptError> {
        self.socket.send(bytes).map_err(io_error(what))
    }

    /// The messages of one datagram; `wait`: block until one comes (bounded by the timeout).
    fn receive(&mut self, wait: bool, what: &str) -> Result<Option<Vec<Answer>>, InterceptError> {
        self.socket.receive(wait).map_err(|e| match e {
            ReceiveError::Io(e) => io_error(what)(e),
            e => InterceptError::Parse(format!("{e} while {what}")),
        })
    }

    /// A request answered by one message (`NFT_MSG_GET*` without `NLM_F_DUMP`); `None` when
    /// the object does not exist (`ENOENT`).
    fn get(&mut self, msg: Msg, seq: u32, what: &str) -> Result<Option<Answer>, InterceptError> {
        self.send(&msg.finish(), what)?;
        loop {
            let answers = self.receive(true, what)?.unwrap_or_default();
            if let Some(a) = answers.into_iter().find(|a| a.seq == seq) {
                return match a.error() {
                    Some(e) if e == -(Errno::ENOENT as i32) => Ok(None),
                    Some(e) => Err(kernel_error(what, e)),
                    None => Ok(Some(a)),
                };
            }
        }
    }

    /// A dump (`NLM_F_DUMP`): every message's attributes; `None` when its table or set does not
    /// exist. A dump the kernel marks interrupted (`NLM_F_DUMP_INTR`: the rule set changed
    /// meanwhile) is repeated, a bounded number of times.
    fn dump(&mut self, build: impl Fn(u32) -> Msg, what: &str) -> Result<Option<Vec<Vec<u8>>>, InterceptError> {
        for _ in 0..super::TRIES {
            let seq = self.next_seq();
            self.send(&build(seq).finish(), what)?;
            let (mut items, mut interrupted) = (vec![], false);
            'answers: loop {
                for a in self.receive(true, what)?.unwrap_or_default().into_iter().filter(|a| a.seq == seq) {
                    interrupted |= a.flags & NLM_F_DUMP_INTR != 0;
                    match (a.kind, a.error()) {
                        (NLMSG_DONE, _) => break 'answers,
                        (_, Some(e)) if e == -(Errno::ENOENT as i32) => return Ok(None),
                        (_, Some(0)) => {}
                        (_, Some(e)) => return Err(kernel_error(what, e)),
                        _ => items.push(a.attrs().to_vec()),
                    }
                }
            }
            if !interrupted {
                return Ok(Some(items));
            }
        }
        Err(InterceptError::Changed { what: what.to_string() })
    }

    /// The rule set's generation (`NFT_MSG_GETGEN` → `NFTA_GEN_ID`): a transaction committed
    /// with it applies only if nothing changed since it was read.
    pub fn generation(&mut self) -> Result<u32, InterceptError> {
        let seq = self.next_seq();
        let msg = Msg::new(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN, NLM_F_REQUEST, seq, AF_UNSPEC, 0);
        let what = "reading the rule set's generation";
        let answer = self.get(msg, seq, what)?.filter(|a| a.kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN);
        answer
            .and_then(|a| attr(a.attrs(), NFTA_GEN_ID).and_then(be32))
            .ok_or_else(|| InterceptError::Parse(format!("no NFTA_GEN_ID while {what}")))
    }

    /// Whether `table inet <table>` exists (`NFT_MSG_GETTABLE`).
    pub fn table_exists(&mut self, table: &str) -> Result<bool, InterceptError> {
        let seq = self.next_seq();
        let mut msg = Msg::nft(NFT_MSG_GETTABLE, 0, seq);
        msg.put_str(NFTA_TABLE_NAME, table);
        Ok(self.get(msg, seq, &format!("looking up table inet {table}"))?.is_some())
    }

    /// The comments of the rules of `chain` (`NFT_MSG_GETRULE` dump filtered by table and
    /// chain; each comment from the rule's `NFTA_RULE_USERDATA`). Empty when the chain is missing.
    pub fn rule_comments(&mut self, table: &str, chain: &str) -> Result<Vec<String>, InterceptError> {
        let build = |seq| {
            let mut m = Msg::nft(NFT_MSG_GETRULE, NLM_F_DUMP, seq);
            m.put_str(NFTA_RULE_TABLE, table).put_str(NFTA_RULE_CHAIN, chain);
            m
        };
        let rules = self.dump(build, &format!("reading the rules of chain {chain}"))?.unwrap_or_default();
        let mut comments = vec![];
        for rule in &rules {
            // Another chain's rule, should a kernel ignore the filter.
            if attr(rule, NFTA_RULE_CHAIN).map(string).as_deref() != Some(chain) {
                continue;
            }
            comments.extend(attr(rule, NFTA_RULE_USERDATA).and_then(comment));
        }
        Ok(comments)
    }

    /// The table's chains (`NFT_MSG_GETCHAIN` dump; each answer whose `NFTA_CHAIN_TABLE` is the
    /// table): name, and hook when it is a base chain.
    pub fn chains(&mut self, table: &str) -> Result<Vec<ChainFacts>, InterceptError> {
        let build = |seq| {
            let mut m = Msg::nft(NFT_MSG_GETCHAIN, NLM_F_DUMP, seq);
            m.put_str(NFTA_CHAIN_TABLE, table);
            m
        };
        let chains = self.dump(build, &format!("reading the chains of table {table}"))?.unwrap_or_default();
        Ok(chains
            .iter()
            .filter(|c| attr(c, NFTA_CHAIN_TABLE).map(string).as_deref() == Some(table))
            .filter_map(|c| {
                let hook = attr(c, NFTA_CHAIN_HOOK).map(|hook| {
                    let mut facts = hook.to_vec();
                    for kind in [NFTA_CHAIN_TYPE, NFTA_CHAIN_POLICY] {
                        facts.extend(attr(c, kind).unwrap_or_default());
                        facts.push(0);
                    }
                    facts
                });
                Some(ChainFacts { name: attr(c, NFTA_CHAIN_NAME).map(string)?, hook })
            })
            .collect())
    }

    /// Every rule of the table, in the kernel's order (`NFT_MSG_GETRULE` dump filtered by table).
    pub fn rules(&mut self, table: &str) -> Result<Vec<RuleFacts>, InterceptError> {
        let build = |seq| {
            let mut m = Msg::nft(NFT_MSG_GETRULE, NLM_F_DUMP, seq);
            m.put_str(NFTA_RULE_TABLE, table);
            m
        };
        let rules = self.dump(build, &format!("reading the rules of table {table}"))?.unwrap_or_default();
        let mut sets = HashMap::new();
        let mut facts = Vec::with_capacity(rules.len());
        for r in rules.iter().filter(|r| attr(r, NFTA_RULE_TABLE).map(string).as_deref() == Some(table)) {
            let exprs = attr(r, NFTA_RULE_EXPRESSIONS).unwrap_or_default();
            facts.push(RuleFacts {
                chain: attr(r, NFTA_RULE_CHAIN).map(string).unwrap_or_default(),
                comment: attr(r, NFTA_RULE_USERDATA).and_then(comment),
                mark_or: mark_or(exprs),
                expressions: self.canonical(table, exprs, &mut sets)?,
            });
        }
        Ok(facts)
    }

    /// A rule's expressions as [`RuleFacts::expressions`] holds them: per expression its name,
    /// then each attribute (type, length, value), a lookup's anonymous set replaced by its
    /// elements (read once per set into `sets`).
    fn canonical(
        &mut self,
        table: &str,
        exprs: &[u8],
        sets: &mut HashMap<String, Vec<u8>>,
    ) -> Result<Vec<u8>, InterceptError> {
        let mut out = Vec::with_capacity(exprs.len());
        for (_, expr) in attrs(exprs) {
            let name = attr(expr, NFTA_EXPR_NAME).map(string).unwrap_or_default();
            out.extend(name.as_bytes());
            out.push(0);
            for (kind, value) in attrs(attr(expr, NFTA_EXPR_DATA).unwrap_or_default()) {
                let set = (name == "lookup" && kind == NFTA_LOOKUP_SET).then(|| string(value));
                let value = match set.filter(|s| s.starts_with(ANONYMOUS_SET_PREFIX)) {
                    Some(set) => match sets.get(&set) {
                        Some(elements) => elements.clone(),
                        None => {
                            let elements = self.set_elements(table, &set)?;
                            sets.insert(set, elements.clone());
                            elements
                        }
                    },
                    None => value.to_vec(),
                };
                out.extend(kind.to_ne_bytes());
                out.extend((value.len() as u32).to_ne_bytes());
                out.extend(value);
            }
        }
        Ok(out)
    }

    /// The elements of a set, each whole as the kernel reports it, sorted (a hash set's order
    /// is arbitrary) and written one after another with their lengths.
    fn set_elements(&mut self, table: &str, set: &str) -> Result<Vec<u8>, InterceptError> {
        let build = |seq| {
            let mut m = Msg::nft(NFT_MSG_GETSETELEM, NLM_F_DUMP, seq);
            m.put_str(NFTA_SET_ELEM_LIST_TABLE, table).put_str(NFTA_SET_ELEM_LIST_SET, set);
            m
        };
        let messages = self.dump(build, &format!("reading set {set}"))?.unwrap_or_default();
        let mut elements: Vec<&[u8]> = messages
            .iter()
            .filter_map(|m| attr(m, NFTA_SET_ELEM_LIST_ELEMENTS))
            .flat_map(|list| attrs(list).filter(|(k, _)| *k == NFTA_LIST_ELEM).map(|(_, e)| e))
            .collect();
        elements.sort();
        let mut out = vec![];
        for e in elements {
            out.extend((e.len() as u32).to_ne_bytes());
            out.extend(e);
        }
        Ok(out)
    }

    /// The elements of an `ifname : verdict` map (`NFT_MSG_GETSETELEM` dump); `None` when the
    /// table or the map does not exist.
    pub fn verdict_map(&mut self, table: &str, map: &str) -> Result<Option<Vec<VerdictElement>>, InterceptError> {
        let build = |seq| {
            let mut m = Msg::nft(NFT_MSG_GETSETELEM, NLM_F_DUMP, seq);
            m.put_str(NFTA_SET_ELEM_LIST_TABLE, table).put_str(NFTA_SET_ELEM_LIST_SET, map);
            m
        };
        let what = format!("reading map {map}");
        let Some(messages) = self.dump(build, &what)? else { return Ok(None) };
        let mut elements = vec![];
        for message in &messages {
            elements.extend(verdict_elements(message, &what)?);
        }
        Ok(Some(elements))
    }

    /// One element of an `ifname : verdict` map, looked up by its key (`NFT_MSG_GETSETELEM`
    /// without `NLM_F_DUMP`): the same cost whatever the map holds. `None` when the element, the
    /// map or the table does not exist.
    pub fn verdict_element(
        &mut self,
        table: &str,
        map: &str,
        ifname: &str,
    ) -> Result<Option<VerdictElement>, InterceptError> {
        let seq = self.next_seq();
        let mut msg = Msg::nft(NFT_MSG_GETSETELEM, 0, seq);
        msg.put_str(NFTA_SET_ELEM_LIST_TABLE, table).put_str(NFTA_SET_ELEM_LIST_SET, map);
        let key = ifname_key(ifname);
        msg.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |m| {
            m.nest(NFTA_LIST_ELEM, |m| {
                m.nest(NFTA_SET_ELEM_KEY, |m| {
                    m.put(NFTA_DATA_VALUE, &key);
                });
            });
        });
        let what = format!("looking up element \"{ifname}\" of map {map}");
        let Some(answer) = self.get(msg, seq, &what)? else { return Ok(None) };
        let elements = verdict_elements(answer.attrs(), &what)?;
        Ok(elements.into_iter().find(|e| e.key == ifname))
    }

    /// The chain's use count (`NFT_MSG_GETCHAIN` without `NLM_F_DUMP` → `NFTA_CHAIN_USE`): its
    /// rules plus every jump to it; `None` when the chain or the table does not exist.
    pub fn chain_use(&mut self, table: &str, chain: &str) -> Result<Option<u32>, InterceptError> {
        let seq = self.next_seq();
        let mut msg = Msg::nft(NFT_MSG_GETCHAIN, 0, seq);
        msg.put_str(NFTA_CHAIN_TABLE, table).put_str(NFTA_CHAIN_NAME, chain);
        let what = format!("looking up chain {chain}");
        let Some(answer) = self.get(msg, seq, &what)? else { return Ok(None) };
        attr(answer.attrs(), NFTA_CHAIN_USE)
            .and_then(be32)
            .map(Some)
            .ok_or_else(|| InterceptError::Parse(format!("no NFTA_CHAIN_USE while {what}")))
    }

    /// How many rules `chain` has (`NFT_MSG_GETRULE` dump of that chain only).
    pub fn rule_count(&mut self, table: &str, chain: &str) -> Result<usize, InterceptError> {
        let build = |seq| {
            let mut m = Msg::nft(NFT_MSG_GETRULE, NLM_F_DUMP, seq);
            m.put_str(NFTA_RULE_TABLE, table).put_str(NFTA_RULE_CHAIN, chain);
            m
        };
        let rules = self.dump(build, &format!("counting the rules of chain {chain}"))?.unwrap_or_default();
        Ok(rules.iter().filter(|r| attr(r, NFTA_RULE_CHAIN).map(string).as_deref() == Some(chain)).count())
    }

    /// Sends `batch` as one transaction that applies only at `generation`. Every message asks
    /// for an acknowledgement; the kernel handles a batch while it is sent, so every answer is
    /// queued when `send` returns. [`InterceptError::GenerationChanged`]: something else changed
    /// the rule set since `generation` was read; nothing was applied.
    pub fn commit(&mut self, batch: Batch, generation: u32) -> Result<(), InterceptError> {
        if batch.is_empty() {
            return Ok(());
        }
        let begin_seq = self.next_seq();
        let mut begin = Msg::new(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin_seq, AF_UNSPEC, NFNL_SUBSYS_NFTABLES);
        begin.put_be32(NFNL_BATCH_GENID, generation);
        let mut bytes = begin.finish();
        let mut pending: Vec<(u32, String)> = vec![];
        for (msg, flags, fill, what) in batch.msgs {
            let seq = self.next_seq();
            let mut m = Msg::nft(msg, flags | NLM_F_ACK, seq);
            fill(&mut m);
            bytes.extend(m.finish());
            pending.push((seq, what));
        }
        let end_seq = self.next_seq();
        bytes.extend(Msg::new(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end_seq, AF_UNSPEC, NFNL_SUBSYS_NFTABLES).finish());
        let what = "committing a transaction";
        self.send(&bytes, what)?;
        let mut failed = None;
        while let Some(answers) = self.receive(false, what)? {
            for a in answers {
                let Some(code) = a.error() else { continue };
                if a.seq == begin_seq && code == -(Errno::ERESTART as i32) {
                    return Err(InterceptError::GenerationChanged);
                }
                if a.seq == begin_seq && code != 0 {
                    return Err(kernel_error("opening the transaction", code));
                }
                if let Some(i) = pending.iter().position(|(s, _)| *s == a.seq) {
                    let (_, op) = pending.remove(i);
                    if code != 0 && failed.is_none() {
                        failed = Some(kernel_error(&op, code));
                    }
                }
            }
        }
        match (failed, pending.first()) {
            (Some(e), _) => Err(e),
            (None, Some((_, op))) => Err(InterceptError::Parse(format!("the kernel did not answer `{op}`"))),
            (None, None) => Ok(()),
        }
    }
}

/// The elements of one `NFT_MSG_NEWSETELEM` message of an `ifname : verdict` map.
fn verdict_elements(message: &[u8], what: &str) -> Result<Vec<VerdictElement>, InterceptError> {
    let mut elements = vec![];
    let Some(list) = attr(message, NFTA_SET_ELEM_LIST_ELEMENTS) else { return Ok(elements) };
    for (_, elem) in attrs(list).filter(|(k, _)| *k == NFTA_LIST_ELEM) {
        let key = attr(elem, NFTA_SET_ELEM_KEY).and_then(|k| attr(k, NFTA_DATA_VALUE)).map(string);
        let verdict = attr(elem, NFTA_SET_ELEM_DATA).and_then(|d| attr(d, NFTA_DATA_VERDICT));
        let code = verdict.and_then(|v| attr(v, NFTA_VERDICT_CODE)).and_then(be32);
        match (key, code) {
            (Some(key), Some(code)) => elements.push(VerdictElement {
                key,
                code: code as i32,
                chain: verdict.and_then(|v| attr(v, NFTA_VERDICT_CHAIN)).map(string),
            }),
            _ => return Err(InterceptError::Parse(format!("an element without key or verdict while {what}"))),
        }
    }
    Ok(elements)
}

/// An `NLMSG_ERROR` answer as a typed error naming the operation.
fn kernel_error(op: &str, code: i32) -> InterceptError {
    InterceptError::Kernel { op: op.to_string(), errno: Errno::from_raw(-code) }
}

/// Test-only: notifications as the kernel sends them, made with this module's encoder.
#[cfg(test)]
pub(super) mod notification {
    use super::*;

    fn message(msg: u16, table: &str, fill: impl FnOnce(&mut Msg)) -> Vec<u8> {
        let mut m = Msg::nft(msg, 0, 1);
        // The first attribute of every object message is its table's name.
        m.put_str(NFTA_TABLE_NAME, table);
        fill(&mut m);
        m.finish()
    }

    pub fn table(table: &str, new: bool) -> Vec<u8> {
        message(if new { NFT_MSG_NEWTABLE } else { NFT_MSG_DELTABLE }, table, |_| {})
    }

    /// A chain, hooked (a base chain) or not.
    pub fn chain(table: &str, name: &str, new: bool, hooked: bool) -> Vec<u8> {
        message(if new { NFT_MSG_NEWCHAIN } else { NFT_MSG_DELCHAIN }, table, |m| {
            m.put_str(NFTA_CHAIN_NAME, name);
            if hooked {
                m.nest(NFTA_CHAIN_HOOK, |_| {});
            }
        })
    }

    /// A rule without expressions (a new one is no slot's mark), or a flush.
    pub fn rule(table: &str, chain: &str, new: bool) -> Vec<u8> {
        message(if new { NFT_MSG_NEWRULE } else { NFT_MSG_DELRULE }, table, |m| {
            m.put_str(NFTA_RULE_CHAIN, chain);
        })
    }

    pub fn element(table: &str, set: &str, new: bool) -> Vec<u8> {
        message(if new { NFT_MSG_NEWSETELEM } else { NFT_MSG_DELSETELEM }, table, |m| {
            m.put_str(NFTA_SET_ELEM_LIST_SET, set);
        })
    }

    /// The messages of `batch` as one datagram of notifications.
    pub fn of(batch: &Batch) -> Vec<u8> {
        let mut datagram = vec![];
        for (msg, flags, fill, _) in &batch.msgs {
            let mut m = Msg::nft(*msg, *flags, 1);
            fill(&mut m);
            datagram.extend(m.finish());
        }
        datagram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_laid_out_as_nft_sends_them() {
        // `nft --debug=mnl` for `add element inet iamlink pods { "vethA" : jump slot-3 }`: the
        // key is the name padded to 16 bytes, the verdict NFT_JUMP (0xfffffffd, big-endian).
        let mut batch = Batch::default();
        batch.add_ifname_jump("iamlink", "pods", "vethA", "slot-3");
        let (msg, flags, fill, _) = &batch.msgs[0];
        let mut m = Msg::nft(*msg, *flags, 7);
        fill(&mut m);
        let bytes = m.finish();
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 0x0a0c, "NFNL_SUBSYS_NFTABLES << 8 | NEWSETELEM");
        assert_eq!(&bytes[16..20], &[NFPROTO_INET, 0, 0, 0]);
        let elements = attr(&bytes[20..], NFTA_SET_ELEM_LIST_ELEMENTS).unwrap();
        let elem = attr(elements, NFTA_LIST_ELEM).unwrap();
        let key = attr(attr(elem, NFTA_SET_ELEM_KEY).unwrap(), NFTA_DATA_VALUE).unwrap();
        assert_eq!(key, b"vethA\0\0\0\0\0\0\0\0\0\0\0");
        let verdict = attr(attr(elem, NFTA_SET_ELEM_DATA).unwrap(), NFTA_DATA_VERDICT).unwrap();
        assert_eq!(attr(verdict, NFTA_VERDICT_CODE).unwrap(), &[0xff, 0xff, 0xff, 0xfd]);
        assert_eq!(attr(verdict, NFTA_VERDICT_CHAIN).unwrap(), b"slot-3\0");
        assert_eq!(bytes.len(), 20 + 12 + 12 + 60, "as nft: table, set, then the 60-byte element list");
    }

    #[test]
    fn the_mark_rule_keeps_other_bits_and_sets_the_slots() {
        let mut batch = Batch::default();
        batch.add_mark_or_rule("iamlink", "slot-3", 0x3);
        let (msg, flags, fill, _) = &batch.msgs[0];
        let mut m = Msg::nft(*msg, *flags, 1);
        fill(&mut m);
        let bytes = m.finish();
        let exprs: Vec<&[u8]> = attrs(attr(&bytes[20..], NFTA_RULE_EXPRESSIONS).unwrap()).map(|(_, v)| v).collect();
        let names: Vec<String> = exprs.iter().map(|e| string(attr(e, NFTA_EXPR_NAME).unwrap())).collect();
        assert_eq!(names, ["meta", "bitwise", "meta"]);
        let bitwise = attr(exprs[1], NFTA_EXPR_DATA).unwrap();
        assert_eq!(attr(attr(bitwise, NFTA_BITWISE_MASK).unwrap(), NFTA_DATA_VALUE).unwrap(), &(!3u32).to_ne_bytes());
        assert_eq!(attr(attr(bitwise, NFTA_BITWISE_XOR).unwrap(), NFTA_DATA_VALUE).unwrap(), &3u32.to_ne_bytes());
    }

    /// The guard reads change notifications with the same decoding: ADD's slot rule is known as
    /// exactly slot 3's mark; a table, another table, another message are told apart.
    #[test]
    fn notifications_name_the_table_the_object_and_a_slot_rules_mark() {
        let mut batch = Batch::default();
        batch.add_mark_or_rule("iamlink", "slot-3", 0x3);
        batch.delete_ifname("iamlink", "pods", "vethA");
        batch.delete_chain("other", "x");
        let datagram = notification::of(&batch);
        let notices = notices(&datagram);
        let object = |table: &str, object| Notice { table: table.into(), object };
        assert_eq!(
            notices,
            vec![
                object("iamlink", Object::NewRule { chain: "slot-3".into(), mark_or: Some(3) }),
                object("iamlink", Object::Element { set: "pods".into() }),
                object("other", Object::Chain { name: "x".into(), hooked: false }),
            ]
        );
        assert_eq!(super::notices(&datagram[..10]), vec![], "truncated");
    }

    #[test]
    fn attributes_that_overrun_their_buffer_end_the_walk() {
        let buf = [8u8, 0, 1, 0, 1, 2, 3, 4, 200, 0, 2, 0];
        assert_eq!(attrs(&buf).count(), 1);
        assert_eq!(attrs(&[]).count(), 0);
    }
}
