//! Struct member offsets from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`). Rust eBPF has no CO-RE relocations, so the
//! few kernel struct fields the programs read (task start time and comm,
//! socket error) are located here at load time and handed to the programs
//! as globals. Input: raw BTF bytes; output: byte offsets.

use std::collections::HashMap;

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("BTF data is truncated or malformed: {0}")]
    Malformed(&'static str),
    #[error("BTF has bad magic {0:#06x} (expected 0xeb9f, little-endian BTF)")]
    BadMagic(u16),
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("BTF struct {0} has no member {1}")]
    NoMember(String, String),
}

struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    /// A bitfield that does not fill whole bytes: no byte read gives it.
    partial_bytes: bool,
}

struct Type {
    kind: u32,
    size: u32,
    members: Vec<Member>,
}

/// A parsed BTF blob: just enough to find struct member offsets.
pub struct Btf {
    strings: Vec<u8>,
    /// Index 0 is the implicit `void` type.
    types: Vec<Type>,
    structs_by_name: HashMap<String, u32>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed("read past the end"))
}

impl Btf {
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 {
            return Err(BtfError::Malformed("shorter than the BTF header"));
        }
        let magic = u16::from_le_bytes([data[0], data[1]]);
        if magic != BTF_MAGIC {
            return Err(BtfError::BadMagic(magic));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let section = |off: usize, len: usize| {
            let start = hdr_len
                .checked_add(off)
                .ok_or(BtfError::Malformed("section offset overflows"))?;
            let end = start
                .checked_add(len)
                .ok_or(BtfError::Malformed("section length overflows"))?;
            data.get(start..end)
                .ok_or(BtfError::Malformed("section outside the data"))
        };
        let type_sec = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();

        let mut types = vec![Type {
            kind: 0,
            size: 0,
            members: Vec::new(),
        }];
        let mut structs_by_name = HashMap::new();
        let mut pos = 0usize;
        while pos < type_sec.len() {
            let name_off = u32_at(type_sec, pos)?;
            let info = u32_at(type_sec, pos + 4)?;
            let size = u32_at(type_sec, pos + 8)?;
            pos += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = pos + i * 12;
                        let off = u32_at(type_sec, m + 8)?;
                        // With kind_flag the top byte is a bitfield size.
                        let (bit_offset, bitfield) = match kind_flag {
                            true => (off & 0x00ff_ffff, off >> 24),
                            false => (off, 0),
                        };
                        members.push(Member {
                            name_off: u32_at(type_sec, m)?,
                            type_id: u32_at(type_sec, m + 4)?,
                            bit_offset,
                            partial_bytes: bitfield % 8 != 0
                                || (bitfield > 0 && bit_offset % 8 != 0),
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            pos += extra;
            if pos > type_sec.len() {
                return Err(BtfError::Malformed(
                    "type record runs past the type section",
                ));
            }
            let id = types.len() as u32;
            if kind == KIND_STRUCT
                && size > 0
                && let Some(name) = str_at(&strings, name_off)
            {
                structs_by_name.entry(name.to_owned()).or_insert(id);
            }
            types.push(Type {
                kind,
                size,
                members,
            });
        }
        Ok(Self {
            strings,
            types,
            structs_by_name,
        })
    }

    pub const SYS_FS_PATH: &'static str = "/sys/kernel/btf/vmlinux";

    /// Byte offset of `member` in `struct name` (not found when it is a
    /// bitfield of part of a byte), looking into anonymous
    /// struct/union members (e.g. `randomized_struct_fields_start`).
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs_by_name
            .get(name)
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        self.find_member(id, member, 0, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember(name.to_owned(), member.to_owned()))
    }

    fn find_member(&self, id: u32, member: &str, base_bits: u32, depth: u32) -> Option<u32> {
        let t = self.types.get(id as usize)?;
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            let bits = base_bits + m.bit_offset;
            let name = str_at(&self.strings, m.name_off).unwrap_or("");
            if name == member {
                return (!m.partial_bytes).then_some(bits);
            }
            if name.is_empty() {
                let inner = self.resolve(m.type_id);
                if let Some(found) = self.find_member(inner, member, bits, depth + 1) {
                    return Some(found);
                }
            }
        }
        None
    }

    /// Follows typedefs and qualifiers to the underlying struct or union.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size
                }
                _ => return id,
            }
        }
        id
    }

    /// Size in bytes of `struct name`.
    pub fn struct_size(&self, name: &str) -> Option<u32> {
        self.structs_by_name
            .get(name)
            .map(|id| self.types[*id as usize].size)
    }
}

fn str_at(strings: &[u8], off: u32) -> Option<&str> {
    let rest = strings.get(off as usize..)?;
    let end = rest.iter().position(|b| *b == 0)?;
    std::str::from_utf8(&rest[..end]).ok()
}

pub use flowaudit_common::KernelOffsets;

/// Resolves the offsets of one group; a missing member is reported and the
/// whole group left off (its flag 0), so the programs never read a wrong
/// place.
struct Group<'a> {
    btf: &'a Btf,
    errors: &'a mut Vec<BtfError>,
    ok: bool,
}

impl<'a> Group<'a> {
    fn new(btf: &'a Btf, errors: &'a mut Vec<BtfError>) -> Self {
        Self {
            btf,
            errors,
            ok: true,
        }
    }

    /// Offset of a member path: `["sock", "__sk_common"], ["sock_common", "skc_net"]`
    /// adds both.
    fn get(&mut self, path: &[(&str, &str)]) -> u32 {
        let mut total = 0;
        for (s, m) in path {
            match self.btf.member_offset(s, m) {
                Ok(o) => total += o,
                Err(e) => {
                    self.errors.push(e);
                    self.ok = false;
                }
            }
        }
        total
    }

    fn size(&mut self, name: &str) -> u32 {
        self.btf.struct_size(name).unwrap_or_else(|| {
            self.errors.push(BtfError::NoStruct(name.to_owned()));
            self.ok = false;
            0
        })
    }

    fn done(self) -> u32 {
        u32::from(self.ok)
    }
}

/// Resolves every offset group of [`KernelOffsets`]. The errors name what
/// the running kernel's BTF lacks.
pub fn resolve_offsets(btf: &Btf) -> (KernelOffsets, Vec<BtfError>) {
    let mut errors = Vec::new();
    let mut o = KernelOffsets::default();
    let mut g = Group::new(btf, &mut errors);
    o.task_group_leader = g.get(&[("task_struct", "group_leader")]);
    o.task_start_boottime = g.get(&[("task_struct", "start_boottime")]);
    o.task_comm = g.get(&[("task_struct", "comm")]);
    o.task_tgid = g.get(&[("task_struct", "tgid")]);
    o.task_ok = g.done();

    let mut g = Group::new(btf, &mut errors);
    o.task_thread_pid = g.get(&[("task_struct", "thread_pid")]);
    o.pid_level = g.get(&[("pid", "level")]);
    o.pid_numbers = g.get(&[("pid", "numbers")]);
    o.upid_size = g.size("upid");
    o.upid_nr = g.get(&[("upid", "nr")]);
    o.upid_ns = g.get(&[("upid", "ns")]);
    o.pid_ns_inum = g.get(&[("pid_namespace", "ns"), ("ns_common", "inum")]);
    o.pidns_ok = g.done();

    let mut g = Group::new(btf, &mut errors);
    o.task_cgroups = g.get(&[("task_struct", "cgroups")]);
    o.css_set_dfl_cgrp = g.get(&[("css_set", "dfl_cgrp")]);
    o.cgroup_kn = g.get(&[("cgroup", "kn")]);
    o.kernfs_node_id = g.get(&[("kernfs_node", "id")]);
    o.cgroup_ok = g.done();

    // The programs read the socket through `bpf_sock_ops_kern.sk`, which
    // they assume is the first member (it has been since 4.13).
    let sk_first = matches!(btf.member_offset("bpf_sock_ops_kern", "sk"), Ok(0));
    if !sk_first {
        errors.push(BtfError::NoMember(
            "bpf_sock_ops_kern".into(),
            "sk at offset 0".into(),
        ));
    }
    let mut g = Group::new(btf, &mut errors);
    o.sock_err = g.get(&[("sock", "sk_err")]);
    o.sock_err_soft = g.get(&[("sock", "sk_err_soft")]);
    // `sk_flags` is a macro for `__sk_common.skc_flags`.
    o.sock_flags = g.get(&[("sock", "__sk_common"), ("sock_common", "skc_flags")]);
    o.sock_shutdown = g.get(&[("sock", "sk_shutdown")]);
    o.sock_ok = g.done() & u32::from(sk_first);

    let mut g = Group::new(btf, &mut errors);
    // `possible_net_t skc_net` holds the `struct net *` as its only member.
    o.sock_net = g.get(&[("sock", "__sk_common"), ("sock_common", "skc_net")]);
    o.net_ns_inum = g.get(&[("net", "ns"), ("ns_common", "inum")]);
    o.net_ok = g.done() & u32::from(sk_first);

    let mut g = Group::new(btf, &mut errors);
    o.file_inode = g.get(&[("file", "f_inode")]);
    o.inode_mode = g.get(&[("inode", "i_mode")]);
    o.file_private_data = g.get(&[("file", "private_data")]);
    o.socket_sk = g.get(&[("socket", "sk")]);
    o.sock_family = g.get(&[("sock", "__sk_common"), ("sock_common", "skc_family")]);
    o.sock_state = g.get(&[("sock", "__sk_common"), ("sock_common", "skc_state")]);
    o.sock_num = g.get(&[("sock", "__sk_common"), ("sock_common", "skc_num")]);
    o.sock_protocol = g.get(&[("sock", "sk_protocol")]);
    o.net_cookie = g.get(&[("net", "net_cookie")]);
    o.file_sock_ok = g.done();
    (o, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob: `struct outer { int a; union { int b; long c; }; int d; }`
    /// and `struct bits { int x : 4; int y : 8 @8; int z @32; }`.
    fn synthetic() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0d\0long\0bits\0x\0y\0z\0";
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // 1: int (size 4)
        push(&[s("int"), KIND_INT << 24, 4, 32]);
        // 2: long (size 8)
        push(&[s("long"), KIND_INT << 24, 8, 64]);
        // 3: anonymous union { int b; long c; }
        push(&[0, KIND_UNION << 24 | 2, 8, s("b"), 1, 0, s("c"), 2, 0]);
        // 4: struct outer { int a @0; <anon> @64 bits; int d @128 bits }
        push(&[
            s("outer"),
            KIND_STRUCT << 24 | 3,
            24,
            s("a"),
            1,
            0,
            0,
            3,
            64,
            s("d"),
            1,
            128,
        ]);
        // 5: struct bits, kind_flag set: each offset's top byte is a bitfield size.
        push(&[
            s("bits"),
            1 << 31 | KIND_STRUCT << 24 | 3,
            8,
            s("x"),
            1,
            4 << 24,
            s("y"),
            1,
            8 << 24 | 8,
            s("z"),
            1,
            32,
        ]);
        let mut blob = Vec::new();
        blob.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        blob.push(1);
        blob.push(0);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend_from_slice(&w.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(strings);
        blob
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        let btf = Btf::parse(&synthetic()).unwrap();
        assert_eq!(btf.member_offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "b").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "c").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "d").unwrap(), 16);
        assert_eq!(btf.struct_size("outer"), Some(24));
        // A bitfield of whole bytes reads as a byte; part of a byte does not.
        assert!(matches!(
            btf.member_offset("bits", "x"),
            Err(BtfError::NoMember(..))
        ));
        assert_eq!(btf.member_offset("bits", "y").unwrap(), 1);
        assert_eq!(btf.member_offset("bits", "z").unwrap(), 4);
        assert!(matches!(
            btf.member_offset("outer", "zz"),
            Err(BtfError::NoMember(..))
        ));
        assert!(matches!(
            btf.member_offset("inner", "a"),
            Err(BtfError::NoStruct(..))
        ));
    }

    #[test]
    fn truncated_or_garbage_input_is_an_error_not_a_panic() {
        let blob = synthetic();
        for len in 0..blob.len() {
            let _ = Btf::parse(&blob[..len]);
        }
        assert!(matches!(Btf::parse(&[0u8; 32]), Err(BtfError::BadMagic(0))));
        let mut bad = blob.clone();
        bad[8] = 0xff; // type_off far past the end
        assert!(Btf::parse(&bad).is_err());
    }

    #[test]
    fn running_kernel_has_the_offsets_the_programs_need() {
        let data =
            std::fs::read(Btf::SYS_FS_PATH).expect("this machine has /sys/kernel/btf/vmlinux");
        let btf = Btf::parse(&data).expect("the running kernel's BTF parses");
        let (off, errors) = resolve_offsets(&btf);
        assert!(errors.is_empty(), "{errors:?}");
        let task = btf.struct_size("task_struct").unwrap();
        let sock = btf.struct_size("sock").unwrap();
        for o in [
            off.task_group_leader,
            off.task_start_boottime,
            off.task_comm,
        ] {
            assert!(
                o > 0 && o < task,
                "task_struct offset {o} outside 0..{task}"
            );
        }
        assert!(off.sock_err > 0 && off.sock_err + 4 < sock);
        assert!(off.sock_flags > 0 && off.sock_flags + 8 <= sock);
        assert!(off.sock_shutdown > 0 && off.sock_shutdown < sock);
        assert!(off.sock_net > 0 && off.sock_net + 8 <= sock);
        let net = btf.struct_size("net").unwrap();
        assert!(off.net_ns_inum > 0 && off.net_ns_inum + 4 <= net);
        assert!(
            off.sock_err_soft > 0
                && off.sock_err_soft + 4 < sock
                && off.sock_err_soft != off.sock_err
        );
        let flags = [
            off.task_ok,
            off.pidns_ok,
            off.cgroup_ok,
            off.sock_ok,
            off.net_ok,
            off.file_sock_ok,
        ];
        assert_eq!(flags, [1; 6], "every offset group resolves here: {off:?}");
        // struct upid { int nr; struct pid_namespace *ns; }
        assert_eq!((off.upid_size, off.upid_nr, off.upid_ns), (16, 0, 8));
        // umode_t i_mode is the first member of struct inode.
        assert_eq!(off.inode_mode, 0);
        assert!(off.sock_state != off.sock_family && off.sock_num != off.sock_family);
    }
}
