//! The guard program itself: a few eBPF instructions, written out here so that the static plugin
//! needs no compiler and no object file. It reads the destination address (IPv4 or IPv6, by
//! `skb->protocol`, which the kernel has already stripped of an offloaded VLAN tag) relative to
//! the network header and drops the packet when it is one of the guarded addresses; anything
//! else, and any other protocol, goes on to the next program (`TC_ACT_UNSPEC`). It calls one
//! helper, `bpf_skb_load_bytes_relative`, which is not GPL-only, and never touches the mark.

use std::net::IpAddr;

/// One eBPF instruction as the kernel reads it (`struct bpf_insn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
/// `offsetof(struct __sk_buff, protocol)`: the ethertype in network byte order.
const SKB_PROTOCOL: i16 = 16;
/// The ethertypes as `skb->protocol` holds them (big-endian u16 read on a little-endian CPU).
const ETH_P_IP: i32 = u16::from_be(0x0800) as i32;
const ETH_P_IPV6: i32 = u16::from_be(0x86dd) as i32;
/// `BPF_FUNC_skb_load_bytes_relative` and its `BPF_HDR_START_NET`.
const LOAD_BYTES_RELATIVE: i32 = 68;
const HDR_START_NET: i32 = 1;
/// Where the destination address sits in each header.
const IPV4_DADDR: i32 = 16;
const IPV6_DADDR: i32 = 24;

// Opcodes (class | size/op | source).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_W | BPF_MEM
const LDX_DW: u8 = 0x79;
const MOV64_IMM: u8 = 0xb7;
const MOV64_REG: u8 = 0xbf;
const ADD64_IMM: u8 = 0x07;
const LD_IMM64: u8 = 0x18;
const JEQ_IMM: u8 = 0x15;
const JEQ_REG: u8 = 0x1d;
const JNE_IMM: u8 = 0x55;
const JNE_REG: u8 = 0x5d;
const JA: u8 = 0x05;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: (src << 4) | (dst & 0x0f), off, imm }
}

/// `dst = value` as the two instructions of a 64-bit immediate load.
fn ld_imm64(dst: u8, value: u64) -> [Insn; 2] {
    [insn(LD_IMM64, dst, 0, 0, value as u32 as i32), insn(0, 0, 0, 0, (value >> 32) as u32 as i32)]
}

/// A program being written, with jumps to labels resolved at the end.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    /// (instruction index, label) of each jump still to resolve.
    fixups: Vec<(usize, Label)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Label {
    V4,
    V6,
    Drop,
    Pass,
}

impl Asm {
    fn push(&mut self, i: Insn) {
        self.insns.push(i);
    }

    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: Label) {
        self.fixups.push((self.insns.len(), to));
        self.push(insn(code, dst, src, 0, imm));
    }

    /// `r0 = bpf_skb_load_bytes_relative(skb, offset, fp - len, len, NET)`; on failure: pass.
    fn load(&mut self, offset: i32, len: i32) {
        self.push(insn(MOV64_REG, 1, 6, 0, 0));
        self.push(insn(MOV64_IMM, 2, 0, 0, offset));
        self.push(insn(MOV64_REG, 3, 10, 0, 0));
        self.push(insn(ADD64_IMM, 3, 0, 0, -len));
        self.push(insn(MOV64_IMM, 4, 0, 0, len));
        self.push(insn(MOV64_IMM, 5, 0, 0, HDR_START_NET));
        self.push(insn(CALL, 0, 0, 0, LOAD_BYTES_RELATIVE));
        self.jump(JNE_IMM, 0, 0, 0, Label::Pass);
    }

    fn finish(mut self, labels: &[(Label, usize)]) -> Vec<Insn> {
        for (at, to) in self.fixups {
            let target = labels.iter().find(|(l, _)| *l == to).map_or(at + 1, |(_, i)| *i);
            self.insns[at].off = (target as i64 - at as i64 - 1) as i16;
        }
        self.insns
    }
}

/// The guard's instructions for these destinations.
pub fn instructions(addresses: &[IpAddr]) -> Vec<Insn> {
    let mut a = Asm::default();
    let mut labels = vec![];
    a.push(insn(MOV64_REG, 6, 1, 0, 0));
    a.push(insn(LDX_W, 2, 6, SKB_PROTOCOL, 0));
    a.jump(JEQ_IMM, 2, 0, ETH_P_IP, Label::V4);
    a.jump(JEQ_IMM, 2, 0, ETH_P_IPV6, Label::V6);
    a.jump(JA, 0, 0, 0, Label::Pass);

    labels.push((Label::V4, a.insns.len()));
    a.load(IPV4_DADDR, 8);
    a.push(insn(LDX_W, 2, 10, -8, 0));
    for ip in addresses.iter().filter_map(|a| match a {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }) {
        // The address's bytes as the load put them in the register.
        for i in ld_imm64(3, u32::from_ne_bytes(ip.octets()) as u64) {
            a.push(i);
        }
        a.jump(JEQ_REG, 2, 3, 0, Label::Drop);
    }
    a.jump(JA, 0, 0, 0, Label::Pass);

    labels.push((Label::V6, a.insns.len()));
    a.load(IPV6_DADDR, 16);
    a.push(insn(LDX_DW, 2, 10, -16, 0));
    a.push(insn(LDX_DW, 3, 10, -8, 0));
    for ip in addresses.iter().filter_map(|a| match a {
        IpAddr::V6(v6) => Some(v6),
        IpAddr::V4(_) => None,
    }) {
        let o = ip.octets();
        let hi = u64::from_ne_bytes(o[..8].try_into().unwrap_or_default());
        let lo = u64::from_ne_bytes(o[8..].try_into().unwrap_or_default());
        for i in ld_imm64(4, hi) {
            a.push(i);
        }
        // Not this address: skip the low half's four instructions (ld_imm64 + jeq) and the high
        // half's test is the next address's.
        a.push(insn(JNE_REG, 2, 4, 3, 0));
        for i in ld_imm64(4, lo) {
            a.push(i);
        }
        a.jump(JEQ_REG, 3, 4, 0, Label::Drop);
    }
    a.jump(JA, 0, 0, 0, Label::Pass);

    labels.push((Label::Drop, a.insns.len()));
    a.push(insn(MOV64_IMM, 0, 0, 0, TC_ACT_SHOT));
    a.push(insn(EXIT, 0, 0, 0, 0));
    labels.push((Label::Pass, a.insns.len()));
    a.push(insn(MOV64_IMM, 0, 0, 0, TC_ACT_UNSPEC));
    a.push(insn(EXIT, 0, 0, 0, 0));
    a.finish(&labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program() {
        let addrs: Vec<IpAddr> = ["169.254.169.254", "169.254.170.23", "fd00:ec2::254", "fd00:ec2::23"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let p = instructions(&addrs);
        for (i, insn) in p.iter().enumerate() {
            if insn.code & 0x07 == 0x05 && insn.code != CALL && insn.code != EXIT {
                let target = i as i64 + 1 + insn.off as i64;
                assert!((0..p.len() as i64).contains(&target), "jump at {i} to {target}");
            }
        }
        assert_eq!(p.last().map(|i| i.code), Some(EXIT));
    }
}
