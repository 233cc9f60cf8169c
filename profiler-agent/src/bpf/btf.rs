//! Just enough of a BTF reader to find struct member offsets in the
//! kernel's `/sys/kernel/btf/vmlinux`, which the programs need because
//! aya-ebpf has no CO-RE field relocations for Rust. The blob comes from the
//! kernel, but the parser still never panics on malformed input.

use std::collections::HashMap;

/// Errors reading BTF.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF data (bad magic or header)")]
    BadHeader,
    #[error("BTF type section is truncated or malformed at type {0}")]
    Truncated(usize),
    #[error("BTF type kind {kind} (type {index}) is unknown to this agent")]
    UnknownKind { kind: u32, index: usize },
    #[error("struct `{0}` not found in the kernel BTF")]
    NoStruct(String),
    #[error("struct `{0}` has no member `{1}` in the kernel BTF")]
    NoMember(String, String),
}

const KIND_STRUCT: u32 = 4;

/// Member byte offsets of the named structs.
#[derive(Debug, Default)]
pub struct StructOffsets {
    structs: HashMap<String, HashMap<String, u32>>,
}

impl StructOffsets {
    /// Parses `data`, collecting members of the structs named in `wanted`.
    pub fn parse(data: &[u8], wanted: &[&str]) -> Result<Self, BtfError> {
        let u32_at = |off: usize| -> Option<u32> {
            data.get(off..off + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        };
        if data.get(0..2) != Some(&[0x9f, 0xeb][..]) {
            return Err(BtfError::BadHeader);
        }
        let hdr_len = u32_at(4).ok_or(BtfError::BadHeader)? as usize;
        let (type_off, type_len) =
            (u32_at(8).ok_or(BtfError::BadHeader)? as usize, u32_at(12).ok_or(BtfError::BadHeader)? as usize);
        let (str_off, str_len) =
            (u32_at(16).ok_or(BtfError::BadHeader)? as usize, u32_at(20).ok_or(BtfError::BadHeader)? as usize);
        let types_start = hdr_len.checked_add(type_off).ok_or(BtfError::BadHeader)?;
        let types_end = types_start.checked_add(type_len).ok_or(BtfError::BadHeader)?;
        let strs_start = hdr_len.checked_add(str_off).ok_or(BtfError::BadHeader)?;
        let strs = data
            .get(strs_start..strs_start.checked_add(str_len).ok_or(BtfError::BadHeader)?)
            .ok_or(BtfError::BadHeader)?;
        if types_end > data.len() {
            return Err(BtfError::BadHeader);
        }
        let name = |off: u32| -> &str {
            let s = strs.get(off as usize..).unwrap_or(&[]);
            let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
            std::str::from_utf8(&s[..end]).unwrap_or("")
        };

        let mut out = StructOffsets::default();
        let mut pos = types_start;
        let mut index = 1;
        while pos < types_end {
            let (name_off, info) =
                (u32_at(pos).ok_or(BtfError::Truncated(index))?, u32_at(pos + 4).ok_or(BtfError::Truncated(index))?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kflag = info >> 31 == 1;
            pos += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
                _ => return Err(BtfError::UnknownKind { kind, index }),
            };
            if pos + extra > types_end {
                return Err(BtfError::Truncated(index));
            }
            if kind == KIND_STRUCT && wanted.contains(&name(name_off)) && !out.structs.contains_key(name(name_off)) {
                let mut members = HashMap::new();
                for m in 0..vlen {
                    let base = pos + 12 * m;
                    let (m_name, m_off) = (
                        u32_at(base).ok_or(BtfError::Truncated(index))?,
                        u32_at(base + 8).ok_or(BtfError::Truncated(index))?,
                    );
                    // With kflag, the low 24 bits are the bit offset and the
                    // high 8 the bitfield size.
                    let bits = if kflag { m_off & 0x00ff_ffff } else { m_off };
                    members.insert(name(m_name).to_owned(), bits / 8);
                }
                out.structs.insert(name(name_off).to_owned(), members);
            }
            pos += extra;
            index += 1;
        }
        Ok(out)
    }

    /// Byte offset of `member` in `strukt`.
    pub fn offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let s = self.structs.get(strukt).ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        s.get(member).copied().ok_or_else(|| BtfError::NoMember(strukt.to_owned(), member.to_owned()))
    }
}

/// Where the scheduler programs find the run queue's clock of a task
/// (`task->se.cfs_rq->rq->clock`); all 0 where the kernel lacks a member
/// (no group scheduling), and the programs then read `bpf_ktime_get_ns`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RqClockOffsets {
    /// `task_struct.se` plus `sched_entity.cfs_rq`.
    pub task_cfs_rq: u32,
    pub cfs_rq_rq: u32,
    pub rq_clock: u32,
}

impl RqClockOffsets {
    pub fn find(offsets: &StructOffsets) -> Self {
        let find = || -> Result<Self, BtfError> {
            let se = offsets.offset("task_struct", "se")?;
            let cfs_rq = offsets.offset("sched_entity", "cfs_rq")?;
            Ok(Self {
                task_cfs_rq: se.checked_add(cfs_rq).ok_or(BtfError::BadHeader)?,
                cfs_rq_rq: offsets.offset("cfs_rq", "rq")?,
                rq_clock: offsets.offset("rq", "clock")?,
            })
        };
        match find() {
            // A zero offset is the programs' "absent": a member at offset 0
            // is not one this layout has, and falling back costs nothing.
            Ok(o) if o.task_cfs_rq != 0 && o.cfs_rq_rq != 0 && o.rq_clock != 0 => o,
            _ => Self::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A BTF blob with `int` and `struct task { int a; int pid; }` plus an
    /// enum and a func proto to exercise skipping.
    fn blob(kflag: bool) -> Vec<u8> {
        let strings = b"\0int\0task\0a\0pid\0e\0X\0";
        // offsets: int=1 task=5 a=10 pid=12 e=16 X=18
        let mut types = Vec::new();
        let mut push = |v: &[u32]| v.iter().for_each(|x| types.extend_from_slice(&x.to_le_bytes()));
        push(&[1, 1 << 24, 4, 32]); // INT, size 4, encoding
        push(&[16, (6 << 24) | 1, 4, 18, 7]); // ENUM e { X = 7 }
        push(&[0, (13 << 24) | 1, 1, 0, 1]); // FUNC_PROTO (int)
        let flag = if kflag { 1 << 31 } else { 0 };
        let off = |bits: u32| if kflag { bits | (32 << 24) } else { bits };
        push(&[5, flag | (4 << 24) | 2, 8, 10, 1, off(0), 12, 1, off(32)]); // STRUCT task
        let mut out = Vec::new();
        let hdr = [0xeb9f_u16 as u32 | (1 << 16), 24, 0, types.len() as u32, types.len() as u32, strings.len() as u32];
        // magic (u16) + version (u8) + flags (u8), then hdr_len ...
        out.extend_from_slice(&0xeb9fu16.to_le_bytes());
        out.push(1);
        out.push(0);
        for x in &hdr[1..] {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_member_offsets() {
        for kflag in [false, true] {
            let o = StructOffsets::parse(&blob(kflag), &["task"]).unwrap();
            assert_eq!(o.offset("task", "pid"), Ok(4));
            assert_eq!(o.offset("task", "a"), Ok(0));
            assert_eq!(o.offset("task", "nope"), Err(BtfError::NoMember("task".into(), "nope".into())));
            assert!(matches!(o.offset("other", "pid"), Err(BtfError::NoStruct(_))));
        }
    }

    #[test]
    fn reads_this_kernels_task_struct() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux on this machine");
            return;
        };
        let o = StructOffsets::parse(&data, &["task_struct"]).unwrap();
        let pid = o.offset("task_struct", "pid").unwrap();
        let tgid = o.offset("task_struct", "tgid").unwrap();
        assert_eq!(tgid, pid + 4, "pid and tgid are adjacent pid_t fields");
    }

    #[test]
    fn finds_this_kernels_run_queue_clock_or_falls_back() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux on this machine");
            return;
        };
        let o = StructOffsets::parse(&data, &["task_struct", "sched_entity", "cfs_rq", "rq"]).unwrap();
        let rq = RqClockOffsets::find(&o);
        match o.offset("sched_entity", "cfs_rq") {
            // Group scheduling: the path exists, and `se` lies inside the task.
            Ok(cfs_rq) => {
                let se = o.offset("task_struct", "se").unwrap();
                assert_eq!(rq.task_cfs_rq, se + cfs_rq);
                assert_eq!(rq.rq_clock, o.offset("rq", "clock").unwrap());
                assert!(rq.cfs_rq_rq > 0);
            }
            Err(_) => assert_eq!(rq, RqClockOffsets::default()),
        }
        // A BTF without these structs gives the fallback, not an error.
        let none = StructOffsets::parse(&blob(false), &["task"]).unwrap();
        assert_eq!(RqClockOffsets::find(&none), RqClockOffsets::default());
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(StructOffsets::parse(b"", &[]).unwrap_err(), BtfError::BadHeader);
        let mut b = blob(false);
        b.truncate(40);
        assert!(StructOffsets::parse(&b, &["task"]).is_err());
    }

    proptest! {
        #[test]
        fn never_panics_on_corrupted_blobs(pos in 0usize..200, byte in any::<u8>(), cut in 0usize..200) {
            let mut b = blob(false);
            if pos < b.len() { b[pos] = byte; }
            b.truncate(cut.max(1));
            let _ = StructOffsets::parse(&b, &["task"]);
        }
    }
}
