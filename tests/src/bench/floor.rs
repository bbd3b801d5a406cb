//! The floor of the agent's kernel design: programs that do nothing,
//! attached where the agent attaches its own (the cgroup v2 root), so that
//! the connection-rate bench can tell what the attach points cost the
//! workload apart from what flowaudit's program bodies cost.
//!
//! - `sock_ops` that only turns on the state callbacks at ESTABLISHED, as
//!   the agent does (so the kernel calls it on every later state change);
//! - `connect4`/`connect6` and `post_bind4`/`post_bind6` that allow;
//! - `cgroup_skb` ingress and egress that pass every packet.
//!
//! Each is a handful of hand-written instructions loaded with the `bpf()`
//! system call (no toolchain, no object file), and attached through a BPF
//! link: the kernel detaches it when the link's descriptor closes, so a
//! bench that dies leaves nothing attached.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result};

// From include/uapi/linux/bpf.h (stable ABI).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;

const PROG_CGROUP_SKB: u32 = 8;
const PROG_CGROUP_SOCK: u32 = 9;
const PROG_SOCK_OPS: u32 = 13;
const PROG_CGROUP_SOCK_ADDR: u32 = 18;

const ATTACH_INGRESS: u32 = 0;
const ATTACH_EGRESS: u32 = 1;
const ATTACH_SOCK_OPS: u32 = 3;
const ATTACH_INET4_CONNECT: u32 = 10;
const ATTACH_INET6_CONNECT: u32 = 11;
const ATTACH_INET4_POST_BIND: u32 = 12;
const ATTACH_INET6_POST_BIND: u32 = 13;

const SOCK_OPS_ACTIVE_ESTABLISHED_CB: i32 = 4;
const SOCK_OPS_PASSIVE_ESTABLISHED_CB: i32 = 5;
const SOCK_OPS_STATE_CB_FLAG: i32 = 1 << 2;
const HELPER_SOCK_OPS_CB_FLAGS_SET: i32 = 59;

/// One `struct bpf_insn`.
#[derive(Clone, Copy)]
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

const MOV64_REG: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const JEQ_IMM: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JA: u8 = 0x05; // BPF_JMP | BPF_JA
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// `return 1;` (allow, pass, or "no reply" for sock_ops).
const ALLOW: [Insn; 2] = [insn(MOV64_IMM, 0, 0, 0, 1), insn(EXIT, 0, 0, 0, 0)];

/// At either ESTABLISHED callback, `bpf_sock_ops_cb_flags_set(ctx,
/// STATE_CB)`, as flowaudit's sock_ops does; then `return 1`.
const SOCK_OPS: [Insn; 10] = [
    insn(MOV64_REG, 6, 1, 0, 0),                             // r6 = ctx
    insn(LDX_W, 2, 6, 0, 0),                                 // r2 = ctx->op
    insn(JEQ_IMM, 2, 0, 2, SOCK_OPS_ACTIVE_ESTABLISHED_CB),  // -> 5
    insn(JEQ_IMM, 2, 0, 1, SOCK_OPS_PASSIVE_ESTABLISHED_CB), // -> 5
    insn(JA, 0, 0, 3, 0),                                    // -> 8
    insn(MOV64_REG, 1, 6, 0, 0),                             // r1 = ctx
    insn(MOV64_IMM, 2, 0, 0, SOCK_OPS_STATE_CB_FLAG),        // r2 = flags
    insn(CALL, 0, 0, 0, HELPER_SOCK_OPS_CB_FLAGS_SET),       // helper
    insn(MOV64_IMM, 0, 0, 0, 1),                             // r0 = 1
    insn(EXIT, 0, 0, 0, 0),
];

/// The programs, attached to the cgroup v2 root while this lives.
pub struct Floor {
    // Links before programs: drop order detaches first.
    _links: Vec<OwnedFd>,
    _progs: Vec<OwnedFd>,
}

impl Floor {
    /// Loads and attaches every program at the root of `cgroup2`.
    pub fn attach(cgroup2: &Path) -> Result<Self> {
        let root = std::fs::File::open(cgroup2)
            .with_context(|| format!("open the cgroup v2 root {}", cgroup2.display()))?;
        let plan: [(&str, u32, u32, &[Insn]); 7] = [
            ("floor_sockops", PROG_SOCK_OPS, ATTACH_SOCK_OPS, &SOCK_OPS),
            (
                "floor_connect4",
                PROG_CGROUP_SOCK_ADDR,
                ATTACH_INET4_CONNECT,
                &ALLOW,
            ),
            (
                "floor_connect6",
                PROG_CGROUP_SOCK_ADDR,
                ATTACH_INET6_CONNECT,
                &ALLOW,
            ),
            (
                "floor_bind4",
                PROG_CGROUP_SOCK,
                ATTACH_INET4_POST_BIND,
                &ALLOW,
            ),
            (
                "floor_bind6",
                PROG_CGROUP_SOCK,
                ATTACH_INET6_POST_BIND,
                &ALLOW,
            ),
            ("floor_skb_in", PROG_CGROUP_SKB, ATTACH_INGRESS, &ALLOW),
            ("floor_skb_out", PROG_CGROUP_SKB, ATTACH_EGRESS, &ALLOW),
        ];
        let mut floor = Floor {
            _links: Vec::new(),
            _progs: Vec::new(),
        };
        for (name, prog_type, attach_type, insns) in plan {
            let prog = load(name, prog_type, attach_type, insns)?;
            let link = link(&prog, root.as_raw_fd(), attach_type)
                .with_context(|| format!("attach {name} to {}", cgroup2.display()))?;
            floor._progs.push(prog);
            floor._links.push(link);
        }
        Ok(floor)
    }
}

/// `union bpf_attr`, zeroed, as bytes (128 covers every field used here;
/// the kernel accepts a larger zeroed tail).
type Attr = [u8; 128];

fn put_u32(a: &mut Attr, off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(a: &mut Attr, off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, initialised buffer of the size passed; the kernel reads (and for some commands writes) only within it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of::<Attr>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn load(name: &str, prog_type: u32, attach_type: u32, insns: &[Insn]) -> Result<OwnedFd> {
    const LICENSE: &[u8] = b"GPL\0";
    let mut log = vec![0u8; 4096];
    let mut a: Attr = [0; 128];
    put_u32(&mut a, 0, prog_type);
    put_u32(&mut a, 4, insns.len() as u32);
    put_u64(&mut a, 8, insns.as_ptr() as u64);
    put_u64(&mut a, 16, LICENSE.as_ptr() as u64);
    put_u32(&mut a, 24, 1); // log_level
    put_u32(&mut a, 28, log.len() as u32);
    put_u64(&mut a, 32, log.as_mut_ptr() as u64);
    let n = name.len().min(15);
    a[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    put_u32(&mut a, 68, attach_type); // expected_attach_type
    bpf(BPF_PROG_LOAD, &mut a).map_err(|e| {
        let log = String::from_utf8_lossy(&log);
        anyhow::anyhow!(
            "load the floor program {name}: {e}; verifier log: {}",
            log.trim_end_matches('\0').trim()
        )
    })
}

fn link(prog: &OwnedFd, target: i32, attach_type: u32) -> std::io::Result<OwnedFd> {
    let mut a: Attr = [0; 128];
    put_u32(&mut a, 0, prog.as_raw_fd() as u32);
    put_u32(&mut a, 4, target as u32);
    put_u32(&mut a, 8, attach_type);
    bpf(BPF_LINK_CREATE, &mut a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_on_the_helper_call_and_on_the_return() {
        // Each jump's target is pc + 1 + off.
        let target = |pc: usize| (pc as i64 + 1 + i64::from(SOCK_OPS[pc].off)) as usize;
        assert_eq!(
            SOCK_OPS[target(2)].regs & 0x0f,
            1,
            "r1 = ctx starts the call"
        );
        assert_eq!(target(2), target(3));
        assert_eq!(SOCK_OPS[target(2) + 2].code, CALL);
        assert_eq!(SOCK_OPS[target(4)].code, MOV64_IMM);
        assert_eq!(SOCK_OPS[target(4) + 1].code, EXIT);
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }

    /// The names of the programs attached to `cgroup`, as bpftool shows them.
    fn attached(cgroup: &Path) -> Vec<String> {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(cgroup)
            .output()
            .expect("bpftool (cargo xtask setup installs it)");
        assert!(out.status.success(), "bpftool cgroup show: {out:?}");
        // Nothing attached: bpftool prints nothing at all.
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool -j JSON");
        v.as_array()
            .expect("an array of attachments")
            .iter()
            .filter_map(|p| p["name"].as_str().map(str::to_owned))
            .collect()
    }

    #[test]
    fn the_kernel_accepts_every_floor_program_and_detaches_them_on_drop() {
        flowaudit_tests::support::require_root();
        let root = flowaudit_tests::simnode::cgroup2_mount().expect("cgroup v2 mount");
        let floor = Floor::attach(&root).expect("load and attach the floor programs");
        let names = attached(&root);
        for want in [
            "floor_sockops",
            "floor_connect4",
            "floor_connect6",
            "floor_bind4",
            "floor_bind6",
            "floor_skb_in",
            "floor_skb_out",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} not attached: {names:?}"
            );
        }
        drop(floor);
        let names = attached(&root);
        assert!(
            !names.iter().any(|n| n.starts_with("floor_")),
            "floor programs still attached after drop: {names:?}"
        );
    }
}
