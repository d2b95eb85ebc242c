//! The ELF facts that decide whether a binary runs on a node whose libc differs from the build
//! machine's: an interpreter (PT_INTERP: the dynamic loader's path, e.g. /lib64/ld-linux-x86-64.so.2),
//! shared libraries it needs (DT_NEEDED), and the symbols it defines (to find glibc functions that
//! would load NSS modules at run time). Read by hand: 64-bit little-endian ELF only, which is what
//! the x86_64 build produces.

use std::fmt;

const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const SHT_SYMTAB: u32 = 2;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const SHN_UNDEF: u16 = 0;

#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn err(what: impl Into<String>) -> Error {
    Error(what.into())
}

/// What a node's loader and libc would make of the binary.
#[derive(Debug, Default)]
pub struct Facts {
    /// PT_INTERP's path, if any.
    pub interpreter: Option<String>,
    /// DT_NEEDED entries: the shared libraries the loader must find.
    pub needed: Vec<String>,
    /// Names of the symbols the binary defines (from .symtab; empty when stripped).
    pub defined: Vec<String>,
    /// Whether there is a .symtab at all.
    pub has_symtab: bool,
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes(&self, at: u64, len: u64) -> Result<&[u8], Error> {
        let start = usize::try_from(at).map_err(|_| err("offset out of range"))?;
        let len = usize::try_from(len).map_err(|_| err("length out of range"))?;
        self.0.get(start..start.checked_add(len).ok_or_else(|| err("overflow"))?).ok_or_else(|| err("truncated file"))
    }
    fn u16(&self, at: u64) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.bytes(at, 2)?.try_into().expect("2 bytes")))
    }
    fn u32(&self, at: u64) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.bytes(at, 4)?.try_into().expect("4 bytes")))
    }
    fn u64(&self, at: u64) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.bytes(at, 8)?.try_into().expect("8 bytes")))
    }
    /// The NUL-terminated string at `at`.
    fn cstr(&self, at: u64) -> Result<String, Error> {
        let start = usize::try_from(at).map_err(|_| err("offset out of range"))?;
        let rest = self.0.get(start..).ok_or_else(|| err("string out of range"))?;
        let end = rest.iter().position(|&b| b == 0).ok_or_else(|| err("unterminated string"))?;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
}

struct Segment {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// Reads the facts of a 64-bit little-endian ELF file.
pub fn read(data: &[u8]) -> Result<Facts, Error> {
    let r = Reader(data);
    if r.bytes(0, 4)? != b"\x7fELF" {
        return Err(err("not an ELF file"));
    }
    if r.bytes(4, 2)? != [2, 1] {
        return Err(err("not a 64-bit little-endian ELF file"));
    }
    let (phoff, phentsize, phnum) = (r.u64(0x20)?, u64::from(r.u16(0x36)?), u64::from(r.u16(0x38)?));
    let (shoff, shentsize, shnum) = (r.u64(0x28)?, u64::from(r.u16(0x3a)?), u64::from(r.u16(0x3c)?));
    let mut segments = Vec::new();
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        segments.push(Segment {
            kind: r.u32(at)?,
            offset: r.u64(at + 8)?,
            vaddr: r.u64(at + 16)?,
            filesz: r.u64(at + 32)?,
        });
    }
    let mut facts = Facts::default();
    if let Some(interp) = segments.iter().find(|s| s.kind == PT_INTERP) {
        facts.interpreter = Some(r.cstr(interp.offset)?);
    }
    // The dynamic section: DT_NEEDED entries are offsets into the string table DT_STRTAB names
    // by virtual address, turned into a file offset through the segment holding it.
    if let Some(dynamic) = segments.iter().find(|s| s.kind == PT_DYNAMIC) {
        let (mut needed, mut strtab) = (Vec::new(), None);
        for i in 0..dynamic.filesz / 16 {
            let at = dynamic.offset + i * 16;
            match r.u64(at)? {
                DT_NULL => break,
                DT_NEEDED => needed.push(r.u64(at + 8)?),
                DT_STRTAB => strtab = Some(r.u64(at + 8)?),
                _ => {}
            }
        }
        if !needed.is_empty() {
            let vaddr = strtab.ok_or_else(|| err("DT_NEEDED without DT_STRTAB"))?;
            let holder = segments
                .iter()
                .find(|s| s.kind == 1 && s.vaddr <= vaddr && vaddr < s.vaddr + s.filesz)
                .ok_or_else(|| err("DT_STRTAB outside every loaded segment"))?;
            let strtab = vaddr - holder.vaddr + holder.offset;
            for name in needed {
                facts.needed.push(r.cstr(strtab + name)?);
            }
        }
    }
    for i in 0..shnum {
        let at = shoff + i * shentsize;
        if r.u32(at + 4)? != SHT_SYMTAB {
            continue;
        }
        facts.has_symtab = true;
        let (offset, size, link, entsize) = (r.u64(at + 24)?, r.u64(at + 32)?, r.u32(at + 40)?, r.u64(at + 56)?);
        let strtab = r.u64(shoff + u64::from(link) * shentsize + 24)?;
        for j in 0..size / entsize.max(1) {
            let sym = offset + j * entsize;
            if r.u16(sym + 6)? != SHN_UNDEF {
                let name = r.cstr(strtab + u64::from(r.u32(sym)?))?;
                if !name.is_empty() {
                    facts.defined.push(name);
                }
            }
        }
    }
    Ok(facts)
}
