//! The pprof profile format (github.com/google/pprof, proto/profile.proto)
//! as protobuf, written by hand: the few fields `go tool pprof` needs.
//!
//! Stacks are written as addresses in the executable files they belong
//! to, which the reader names from those files (their symbols and debug
//! information, or Debian's `-dbgsym` packages), as it does for C
//! programs. Naming them here would cost each process tens of MiB of
//! parsed debug information (measured: ~40 MiB in a release build).
//!
//! No address of the running process is written: each is given as the
//! address in its file's own layout (the run's load offset taken out, as
//! if loaded where the ELF headers say), so a profile tells nothing of
//! where the process's memory lies (ASLR), only which code ran. Each
//! mapping is the file's executable segment, as its program header gives
//! it, which is what both Go's `go tool pprof` and google/pprof expect.

use std::collections::HashMap;

/// An executable segment of a file the process maps, and where this run
/// put it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// The runtime range (one or more lines of /proc/self/maps).
    pub start: u64,
    pub limit: u64,
    /// Runtime address minus the address in the file's layout.
    pub bias: u64,
    /// The segment, from its program header: address, end, file offset.
    pub vaddr: u64,
    pub vlimit: u64,
    pub offset: u64,
    pub file: String,
}

/// A program header's `PT_LOAD` fields that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub memsz: u64,
    pub executable: bool,
}

/// The `PT_LOAD` segments of a 64-bit little-endian ELF file, from its
/// first bytes (header and program headers); None for anything else.
pub fn elf_segments(head: &[u8]) -> Option<Vec<Segment>> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(head.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(head.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(head.get(o..o + 8)?.try_into().ok()?));
    // "\x7fELF", 64-bit, little-endian.
    if head.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    if phentsize < 56 {
        return None;
    }
    let mut out = Vec::new();
    for i in 0..phnum {
        let o = phoff.checked_add(i.checked_mul(phentsize)?)?;
        // PT_LOAD
        if u32_at(o)? != 1 {
            continue;
        }
        out.push(Segment {
            executable: u32_at(o + 4)? & 1 != 0,
            offset: u64_at(o + 8)?,
            vaddr: u64_at(o + 16)?,
            filesz: u64_at(o + 32)?,
            memsz: u64_at(o + 40)?,
        });
    }
    Some(out)
}

/// The executable segments mapped, from the text of /proc/self/maps, the
/// page size, and each file's segments (`segments`, given its path).
pub fn mappings(
    maps: &str,
    page: u64,
    mut segments: impl FnMut(&str) -> Option<Vec<Segment>>,
) -> Vec<Mapping> {
    let mut by_file: HashMap<String, Option<Vec<Segment>>> = HashMap::new();
    let page = page.max(1);
    let mut out: Vec<Mapping> = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(offset)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        // Device and inode, then the path (which may hold spaces).
        let (Some(_), Some(_)) = (f.next(), f.next()) else {
            continue;
        };
        let file = f.collect::<Vec<_>>().join(" ");
        let file = file.as_str();
        if !perms.contains('x') || !file.starts_with('/') {
            continue;
        }
        let Some((start, limit)) = range.split_once('-') else {
            continue;
        };
        let hex = |s: &str| u64::from_str_radix(s, 16).ok();
        let (Some(start), Some(limit), Some(offset)) = (hex(start), hex(limit), hex(offset)) else {
            continue;
        };
        if start >= limit {
            continue;
        }
        let segs = by_file
            .entry(file.to_string())
            .or_insert_with(|| segments(file));
        // The executable segment this part of the file belongs to.
        let Some(seg) = segs.as_ref().and_then(|segs| {
            segs.iter().copied().find(|s| {
                // The mapping starts in the segment's first page (of any
                // size) or later.
                s.executable && offset < s.offset + s.filesz && offset + page > s.offset
            })
        }) else {
            continue;
        };
        // Where the mapping's first byte is in the file's layout.
        let Some(at) = (seg.vaddr + offset).checked_sub(seg.offset) else {
            continue;
        };
        let bias = start.wrapping_sub(at);
        // A segment split over several lines is one mapping.
        if let Some(m) = out
            .iter_mut()
            .find(|m| m.file == file && m.vaddr == seg.vaddr && m.bias == bias)
        {
            m.start = m.start.min(start);
            m.limit = m.limit.max(limit);
            continue;
        }
        out.push(Mapping {
            start,
            limit,
            bias,
            vaddr: seg.vaddr,
            vlimit: seg.vaddr + seg.memsz,
            offset: seg.offset,
            file: file.to_string(),
        });
    }
    out
}

/// A profile being put together: its tables, each entry once.
pub struct Builder<'a> {
    mappings: &'a [Mapping],
    strings: Vec<String>,
    string_ids: HashMap<String, u64>,
    /// Per address, its location's id.
    location_ids: HashMap<u64, u64>,
    /// Encoded `Location` messages.
    locations: Vec<Vec<u8>>,
    /// Per stack, its values.
    samples: HashMap<Vec<u64>, Vec<i64>>,
}

/// A sample type: what is counted (`cpu`, `inuse_space`) and its unit.
pub struct ValueType<'a>(pub &'a str, pub &'a str);

/// What a profile says beside its samples.
pub struct Meta<'a> {
    /// The sample types, one per value of each sample.
    pub types: &'a [ValueType<'a>],
    /// Which of `types` one sample's `period` is counted in.
    pub period_of: usize,
    pub period: i64,
    pub duration_ns: i64,
    /// Functions whose frames, and those they call, `go tool pprof`
    /// leaves out (a regular expression): the profiler's own.
    pub drop_frames: Option<&'a str>,
    pub comment: Option<&'a str>,
}

impl<'a> Builder<'a> {
    pub fn new(mappings: &'a [Mapping]) -> Self {
        let mut b = Builder {
            mappings,
            strings: Vec::new(),
            string_ids: HashMap::new(),
            location_ids: HashMap::new(),
            locations: Vec::new(),
            samples: HashMap::new(),
        };
        // The table starts with "" (the format's rule).
        b.string("");
        b
    }

    /// Adds `values` to the stack's sample: code addresses, innermost
    /// first, each inside the instruction it stands for (a return address
    /// less one).
    pub fn add(&mut self, stack: &[usize], values: &[i64]) {
        let ids: Vec<u64> = stack.iter().map(|a| self.location(*a as u64)).collect();
        let e = self
            .samples
            .entry(ids)
            .or_insert_with(|| vec![0; values.len()]);
        for (a, v) in e.iter_mut().zip(values) {
            *a = a.saturating_add(*v);
        }
    }

    /// The encoded profile.
    pub fn finish(mut self, meta: &Meta) -> Vec<u8> {
        let mut out = Vec::new();
        let types: Vec<(u64, u64)> = meta
            .types
            .iter()
            .map(|t| (self.string(t.0), self.string(t.1)))
            .collect();
        for (ty, unit) in &types {
            message(&mut out, 1, &value_type(*ty, *unit));
        }
        for (ids, values) in &self.samples {
            let mut s = Vec::new();
            packed(&mut s, 1, ids.iter().copied());
            packed(&mut s, 2, values.iter().map(|v| *v as u64));
            message(&mut out, 2, &s);
        }
        for (i, m) in self.mappings.iter().enumerate() {
            let file = self.string(&m.file);
            let mut e = Vec::new();
            varint_field(&mut e, 1, i as u64 + 1);
            varint_field(&mut e, 2, m.vaddr);
            varint_field(&mut e, 3, m.vlimit);
            varint_field(&mut e, 4, m.offset);
            varint_field(&mut e, 5, file);
            message(&mut out, 3, &e);
        }
        for l in &self.locations {
            message(&mut out, 4, l);
        }
        let drop_frames = meta.drop_frames.map(|d| self.string(d));
        let comment = meta.comment.map(|c| self.string(c));
        for s in &self.strings {
            message(&mut out, 6, s.as_bytes());
        }
        if let Some(d) = drop_frames {
            varint_field(&mut out, 7, d);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        varint_field(&mut out, 9, now);
        varint_field(&mut out, 10, meta.duration_ns as u64);
        if let Some((ty, unit)) = types.get(meta.period_of) {
            message(&mut out, 11, &value_type(*ty, *unit));
            varint_field(&mut out, 12, meta.period as u64);
            if let Some(c) = comment {
                packed(&mut out, 13, [c].into_iter());
            }
            varint_field(&mut out, 14, *ty);
        }
        out
    }

    fn string(&mut self, s: &str) -> u64 {
        if let Some(id) = self.string_ids.get(s) {
            return *id;
        }
        let id = self.strings.len() as u64;
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), id);
        id
    }

    /// The location of a code address: its mapping, and the address in
    /// that file's layout. Outside every mapping (code made at run time,
    /// the vDSO) the address is left out.
    fn location(&mut self, addr: u64) -> u64 {
        if let Some(id) = self.location_ids.get(&addr) {
            return *id;
        }
        let id = self.locations.len() as u64 + 1;
        let mut loc = Vec::new();
        varint_field(&mut loc, 1, id);
        if let Some(i) = self
            .mappings
            .iter()
            .position(|m| m.start <= addr && addr < m.limit)
        {
            let m = &self.mappings[i];
            varint_field(&mut loc, 2, i as u64 + 1);
            varint_field(&mut loc, 3, addr.wrapping_sub(m.bias));
        }
        self.locations.push(loc);
        self.location_ids.insert(addr, id);
        id
    }
}

fn value_type(ty: u64, unit: u64) -> Vec<u8> {
    let mut m = Vec::new();
    varint_field(&mut m, 1, ty);
    varint_field(&mut m, 2, unit);
    m
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    varint(out, u64::from(field) << 3);
    varint(out, v);
}

/// A length-delimited field: a message, a string or bytes.
fn message(out: &mut Vec<u8>, field: u32, body: &[u8]) {
    varint(out, (u64::from(field) << 3) | 2);
    varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

fn packed(out: &mut Vec<u8>, field: u32, values: impl Iterator<Item = u64>) {
    let mut body = Vec::new();
    for v in values {
        varint(&mut body, v);
    }
    message(out, field, &body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_protobufs() {
        let mut out = Vec::new();
        varint(&mut out, 1);
        varint(&mut out, 300);
        varint(&mut out, u64::MAX);
        assert_eq!(
            out,
            [
                1, 0xAC, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01
            ]
        );
        let mut out = Vec::new();
        packed(&mut out, 1, [3u64, 270].into_iter());
        assert_eq!(out, [0x0A, 3, 3, 0x8E, 0x02]);
    }

    /// The test binary's layout, as lld writes it: text one page off its
    /// file offset.
    fn segments(file: &str) -> Option<Vec<Segment>> {
        match file {
            "/usr/sbin/tambo-smtpd" => Some(vec![
                Segment {
                    offset: 0,
                    vaddr: 0,
                    filesz: 0x51ca34,
                    memsz: 0x51ca34,
                    executable: false,
                },
                Segment {
                    offset: 0x51ca40,
                    vaddr: 0x51da40,
                    filesz: 0xc80cf0,
                    memsz: 0xc80cf0,
                    executable: true,
                },
            ]),
            "/usr/lib/x86_64-linux-gnu/libc.so.6" => Some(vec![Segment {
                offset: 0x26000,
                vaddr: 0x26000,
                filesz: 0x156000,
                memsz: 0x156000,
                executable: true,
            }]),
            _ => None,
        }
    }

    const MAPS: &str = "\
55d0c0a00000-55d0c0f1d000 r--p 00000000 fe:01 1 /usr/sbin/tambo-smtpd
55d0c0f1e000-55d0c0f20000 r-xp 0051d000 fe:01 1 /usr/sbin/tambo-smtpd
55d0c0f20000-55d0c1b9f000 r-xp 0051f000 fe:01 1 /usr/sbin/tambo-smtpd
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f1000026000-7f100017c000 r-xp 00026000 fe:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6
7f2000000000-7f2000001000 r-xp 00000000 fe:01 3 /opt/unknown.so
7ffd1c1f0000-7ffd1c1f2000 r-xp 00000000 00:00 0 [vdso]
garbage
";

    #[test]
    fn executable_segments_are_found_and_merged() {
        let m = mappings(MAPS, 4096, segments);
        assert_eq!(m.len(), 2, "{m:?}");
        // Loaded at 0x55d0c0a00000: the text's 0x51da40 is at +0x51da40.
        assert_eq!(m[0].bias, 0x55d0_c0a0_0000);
        assert_eq!((m[0].vaddr, m[0].offset), (0x51da40, 0x51ca40));
        assert_eq!(
            (m[0].start, m[0].limit),
            (0x55d0_c0f1_e000, 0x55d0_c1b9_f000)
        );
        assert_eq!(m[1].bias, 0x7f10_0000_0000);
    }

    #[test]
    fn elf_headers_are_read() {
        use std::io::Read;
        let mut me = Vec::new();
        std::fs::File::open(std::env::current_exe().unwrap())
            .unwrap()
            .take(64 * 1024)
            .read_to_end(&mut me)
            .unwrap();
        let segs = elf_segments(&me).unwrap();
        assert!(segs.iter().any(|s| s.executable), "{segs:?}");
        assert!(elf_segments(b"#!/bin/sh\n").is_none());
        assert!(elf_segments(&me[..70]).is_none());
    }

    #[test]
    fn no_runtime_address_is_written() {
        let maps = mappings(MAPS, 4096, segments);
        let mut b = Builder::new(&maps);
        b.add(&[0x55d0_c0f2_1234, 0x7fff_0000_0001], &[1]);
        b.add(&[0x55d0_c0f2_1234, 0x7fff_0000_0001], &[2]);
        let p = b.finish(&Meta {
            types: &[ValueType("samples", "count")],
            period_of: 0,
            period: 1,
            duration_ns: 0,
            drop_frames: None,
            comment: None,
        });
        // The first location: mapping 1, at 0x521234 in the file's layout.
        let mut want = Vec::new();
        varint_field(&mut want, 1, 1);
        varint_field(&mut want, 2, 1);
        varint_field(&mut want, 3, 0x52_1234);
        assert!(p.windows(want.len()).any(|w| w == want.as_slice()));
        // The runtime addresses appear nowhere, in any encoding.
        for a in [0x55d0_c0f2_1234u64, 0x55d0_c0a0_0000, 0x7fff_0000_0001] {
            let mut v = Vec::new();
            varint(&mut v, a);
            assert!(!p.windows(v.len()).any(|w| w == v.as_slice()), "{a:x}");
        }
        // One sample, the two merged.
        let mut s = Vec::new();
        packed(&mut s, 2, [3u64].into_iter());
        assert!(p.windows(s.len()).any(|w| w == s.as_slice()));
    }
}
