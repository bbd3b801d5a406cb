//! flowaudit's kernel side: one `sock_ops` program on the cgroup v2 root sees
//! every TCP socket of every process on the node, whatever its network
//! namespace, and writes a `FlowRecord` into the `EVENTS` ring buffer when a
//! connection establishes, closes, or fails to establish.
//!
//! What the programs keep of a TCP socket lives in the socket itself
//! (`bpf_sk_storage`, map `SOCKS`, one `SocketStorage` per socket; every
//! program type used here has the helpers from Linux 5.10 on): no hash map
//! keyed by cookie to insert into, look up and delete from, nothing to fill
//! up, and the kernel frees it with the socket.
//!
//! Who owns a socket is taken where the kernel runs in the owner's process
//! context: the `cgroup/connect4|6` programs (the connect() caller) and
//! the `cgroup/post_bind4|6` programs (the binder, i.e. the listener's
//! owner) write the caller's pid, cgroup and name into the socket's
//! storage, and `sock_ops` reads them there. (`sock_ops` itself may call
//! `bpf_get_current_pid_tgid` only from Linux 6.10 on.) Accepted sockets
//! get their listener's owner (`LISTENERS`).
//!
//! Everything else is `bpf_sock_ops` context fields and helpers, plus struct
//! offsets the loader resolves from the running kernel's BTF and hands in as
//! read-only globals, together with feature switches it probes at load time
//! (`KERNEL_READS`, `SOCK_OPS_NETNS_COOKIE`). A switch that is off makes the
//! code behind it dead, and the verifier never looks at a helper a kernel
//! lacks: the same object loads on 5.10 to 6.x.
//!
//! Two `cgroup_skb` programs (egress and ingress, also on the root) copy the
//! first payload bytes of each tracked connection into the same ring buffer,
//! so userspace can tell plaintext from TLS and mutual TLS. A connection is
//! looked at only until its budget is spent or its first payload shows it is
//! not TLS. A packet without payload bytes costs two header loads; after
//! that, a payload packet costs one socket-storage lookup and a flag test
//! (inbound, also a read of the socket's state: a payload segment filtered
//! on a listening socket is kept for the socket it makes, `stash_for_child`).
#![no_std]
#![no_main]
// The one atomic add (`atomic_add`) is written as BPF assembly; the eBPF
// crate is always built with nightly (aya-build).
#![feature(asm_experimental_arch)]
// aya-ebpf's map methods take `impl Borrow<K>`: a reference passes a
// pointer, a value would be copied onto the 512-byte BPF stack first.
#![allow(clippy::needless_borrows_for_generic_args)]

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_SK_STORAGE_GET_F_CREATE,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE, BPF_TCP_LISTEN, BPF_TCP_SYN_SENT, bpf_sock,
        bpf_sock_ops,
    },
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{
            bpf_get_current_task, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_seq_write,
            bpf_sk_fullsock, bpf_sk_storage_get, bpf_skb_load_bytes,
        },
    },
    macros::{btf_map, cgroup_skb, cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};
use flowaudit_common::{
    AF_INET, AF_INET6, CAPTURE_LOST, CAPTURE_NOT_WATCHED, DIR_IN, DIR_OUT, ERROR_TAKEN,
    ERROR_UNREAD, EVENTS_RING_BYTES, FlowRecord, KernelOffsets, LISTENERS_MAX, LOSS_PLACES,
    Listener, ListenerKey, ListenerSeen, LossPlace, MARK_GAP, MARK_LOST, MARK_UNOBSERVABLE, Owner,
    PAYLOAD_BUDGET, PAYLOAD_CHUNK, PAYLOAD_COUNTED, PAYLOAD_IN_DONE, PAYLOAD_IN_LOST,
    PAYLOAD_OUT_DONE, PAYLOAD_OUT_LOST, PAYLOAD_PEEK, PAYLOAD_TLS, PAYLOAD_WATCHED, PayloadHeader,
    PayloadRecord, PayloadState, RecordKind, SEQ_FIN_ACKED, SEQ_FIN_RECEIVED, SEQ_SYN_ACKED,
    SocketSide, SocketState, SocketStorage, TLS_HANDSHAKE,
};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_PLACES, 0);

// Slot 0: 1 while the agent's ring reader sleeps until the kernel wakes
// it (it set the 1); the first record submitted then wakes it and clears
// the slot. See `submit_flags`.
#[map]
static READER: Array<u32> = Array::with_max_entries(1, 0);

// Each TCP socket's `SocketStorage`, kept in the socket (bpf_sk_storage).
#[btf_map]
static SOCKS: SkStorage<SocketStorage> = SkStorage::new();

// Slot 0: sockets holding a `--payload-sockets` place now (taken at
// ESTABLISHED, given back at CLOSE, both by `sock_ops` with atomic adds).
#[map]
static WATCHED: Array<u64> = Array::with_max_entries(1, 0);

// Slot 0, per CPU: the payload of a segment that the ingress program saw on
// a listening socket, kept for the accepted socket that segment makes on
// the same CPU a moment later (`stash_for_child`, `hand_over`).
#[map]
static HANDED: PerCpuArray<Handed> = PerCpuArray::with_max_entries(1, 0);

/// Records of `PAYLOAD_CHUNK` bytes that one handed-over segment fills at
/// most: a direction's whole budget.
const HANDED_CHUNKS: usize = PAYLOAD_BUDGET as usize / PAYLOAD_CHUNK;

/// A listener's segment's payload, waiting for its accepted socket.
#[repr(C)]
struct Handed {
    /// Sequence number of the first payload byte.
    seq: u32,
    /// Payload bytes in the segment (0: the slot is empty).
    len: u32,
    /// Client port << 16 | server port, host order.
    ports: u32,
    /// Records filled in `recs` (their headers want only the cookie).
    chunks: u32,
    /// 1 when the payload starts with a TLS handshake record.
    tls: u32,
    /// 1 when a load from the packet failed after `chunks` records: the
    /// bytes past them are lost, and the new socket's stream must say so.
    lost: u32,
    recs: [PayloadRecord<PAYLOAD_CHUNK>; HANDED_CHUNKS],
}

// LRU: a listener that closes while the agent is down never gets its entry
// removed; eviction keeps the map from filling up with them.
#[map]
static LISTENERS: LruHashMap<ListenerKey, Listener> =
    LruHashMap::with_max_entries(LISTENERS_MAX, 0);

// Feature switches, probed and set by the loader (1 = on). Off, the code
// behind them is dead and the verifier never checks its helper calls.
/// `bpf_get_current_task` and `bpf_probe_read_kernel` may be called (not on
/// a kernel in lockdown confidentiality mode, nor without CAP_PERFMON).
#[unsafe(no_mangle)]
static KERNEL_READS: u32 = 0;
/// `sock_ops` may call `bpf_get_netns_cookie` (not before Linux 5.15);
/// otherwise the namespace is named by its inode number, read from the
/// socket through the `net_ok` offsets of `OFFSETS` (with
/// `KERNEL_READS`). Unlike the cookie before 5.12, the inode always exists,
/// and userspace can find it for a namespace in /proc.
#[unsafe(no_mangle)]
static SOCK_OPS_NETNS_COOKIE: u32 = 0;
/// The payload programs are attached (`--payload-capture`): only then are
/// sockets watched for them.
#[unsafe(no_mangle)]
static PAYLOAD_CAPTURE: u32 = 0;
/// `--payload-sockets`: at most this many sockets watched at once.
#[unsafe(no_mangle)]
static PAYLOAD_SOCKETS: u32 = 0;

// Struct member offsets from the running kernel's BTF, set by the loader;
// each group is used only when its `*_ok` flag is 1.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    task_ok: 0,
    task_group_leader: 0,
    task_start_boottime: 0,
    task_comm: 0,
    task_tgid: 0,
    pidns_ok: 0,
    task_thread_pid: 0,
    pid_level: 0,
    pid_numbers: 0,
    upid_size: 0,
    upid_nr: 0,
    upid_ns: 0,
    pid_ns_inum: 0,
    cgroup_ok: 0,
    task_cgroups: 0,
    css_set_dfl_cgrp: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    sock_ok: 0,
    sock_err: 0,
    sock_err_soft: 0,
    sock_flags: 0,
    sock_shutdown: 0,
    net_ok: 0,
    sock_net: 0,
    net_ns_inum: 0,
    file_sock_ok: 0,
    file_inode: 0,
    inode_mode: 0,
    file_private_data: 0,
    socket_sk: 0,
    sock_family: 0,
    sock_state: 0,
    sock_num: 0,
    sock_protocol: 0,
    net_cookie: 0,
};

/// Inode number of the agent's pid namespace, 0 when it is the initial one.
/// Pids are reported as that namespace numbers them: on a kind node the
/// agent runs with the node's pid namespace (hostPID), and the node's `ps`,
/// `/proc` and SPIRE agent all use the node's numbers, not the kernel's
/// initial ones. A process outside that namespace gets pid 0 (unknown).
#[unsafe(no_mangle)]
static PIDNS_INUM: u32 = 0;

/// Deepest pid namespace nesting looked through (the kernel allows 32; a
/// kind node in a container on a host is level 1 or 2).
const MAX_PIDNS_LEVEL: u32 = 8;

const SOCK_STREAM: u32 = 1;

/// `enum sock_flags`: SOCK_DONE (bit 1) is set by tcp_fin() when the peer's FIN arrives.
const SOCK_DONE: u64 = 1;

/// `sk_shutdown` when both directions are shut: set by the application's
/// close() (`__tcp_close`) before it moves the socket to CLOSE; the kernel's
/// own `tcp_done` sets it only after.
const SHUTDOWN_MASK: u8 = 3;

#[inline(always)]
fn global(v: &'static u32) -> u64 {
    // Volatile: the loader rewrites these after compilation.
    // SAFETY: a read-only global of this object, always valid; volatile so the loader's value is read.
    unsafe { read_volatile(v) as u64 }
}

/// `*p += v` (wrapping) in one atomic instruction (`BPF_XADD`, which every
/// kernel has; `core`'s atomics offer no read-modify-write on this target).
///
/// # Safety
/// `p` must point at a map value's 8-byte-aligned `u64`.
#[inline(always)]
unsafe fn atomic_add(p: *mut u64, v: u64) {
    // SAFETY: the caller passes a valid, aligned map value; the instruction touches only those 8 bytes.
    unsafe {
        core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) p, in(reg) v, options(nostack));
    }
}

#[inline(always)]
fn count_loss(place: LossPlace) {
    if let Some(c) = LOST.get_ptr_mut(place as u32) {
        // SAFETY: the pointer comes from this map's lookup; a per-CPU slot is written only by this CPU.
        unsafe { *c += 1 };
    }
}

#[sock_ops]
pub fn flowaudit_sock_ops(ctx: SockOpsContext) -> u32 {
    let _ = try_sock_ops(&ctx);
    // The return value only matters for callbacks that ask for a reply.
    1
}

/// Reads a `u32` context field with a 4-byte load, the only size the
/// verifier accepts for most `bpf_sock_ops` fields.
macro_rules! field {
    ($ops:expr, $($f:tt)+) => {{
        #[allow(unused_unsafe)]
        // SAFETY: `$ops` is the program's context pointer, valid for this run; the verifier checks each field access.
        let v = unsafe { read_volatile(addr_of!((*$ops).$($f)+)) };
        v
    }};
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), i64> {
    let ops = ctx.ops;
    let op = field!(ops, op);
    match op {
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(ctx),
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(ctx, SocketSide::Active),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(ctx, SocketSide::Passive),
        // Only the change to CLOSE matters: the state it leaves tells all
        // the close needs (see `fin_sent`), so the others return at once.
        BPF_SOCK_OPS_STATE_CB if field!(ops, __bindgen_anon_1.args[1]) == BPF_TCP_CLOSE => {
            on_close(ctx, field!(ops, __bindgen_anon_1.args[0]))
        }
        _ => Ok(()),
    }
}

/// The process running now. Called only from the connect and bind hooks,
/// which run in the calling process's context on every kernel.
#[inline(always)]
fn current_owner() -> Owner {
    let mut owner = Owner {
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        start_boottime_ns: 0,
        // SAFETY: a BPF helper without arguments; it cannot fault.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        // The calling thread's name; the leader's replaces it below when
        // the task can be read.
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    if global(&KERNEL_READS) == 0 || global(&OFFSETS.task_ok) == 0 {
        // The kernel's pid means nothing in another pid namespace.
        if global(&PIDNS_INUM) != 0 {
            owner.tgid = 0;
        }
        return owner;
    }
    // SAFETY: a BPF helper without arguments; it cannot fault.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let Ok(leader) = read::<u64>(task, global(&OFFSETS.task_group_leader)) else {
        return owner;
    };
    leader_facts(leader as *const u8, &mut owner);
    owner
}

/// Fills `owner` from the thread group leader `leader` (with
/// `KERNEL_READS`): its start time and name, and its pid as the agent's pid
/// namespace sees it.
#[inline(always)]
fn leader_facts(leader: *const u8, owner: &mut Owner) {
    if let Ok(t) = read::<u64>(leader, global(&OFFSETS.task_start_boottime)) {
        owner.start_boottime_ns = t;
    }
    if let Ok(c) = read::<[u8; 16]>(leader, global(&OFFSETS.task_comm)) {
        owner.comm = c;
    }
    if global(&PIDNS_INUM) != 0 {
        owner.tgid = pid_in_agent_ns(leader);
    }
}

/// `*(T *)(base + off)` in kernel memory (with `KERNEL_READS`).
#[inline(always)]
fn read<T: Copy>(base: *const u8, off: u64) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel copies through the kernel's fault-safe path: a bad address gives an error, never a fault.
    unsafe { bpf_probe_read_kernel(base.add(off as usize) as *const T) }.map_err(|e| e as i64)
}

/// The pid of `task` in the agent's pid namespace (`PIDNS_INUM`), found in
/// the task's `struct pid` (`numbers[level]`, one per namespace it is
/// visible in); 0 when it is not visible there or cannot be read.
#[inline(always)]
fn pid_in_agent_ns(task: *const u8) -> u32 {
    let target = global(&PIDNS_INUM);
    if global(&OFFSETS.pidns_ok) == 0 {
        return 0;
    }
    let Ok(pid) = read::<u64>(task, global(&OFFSETS.task_thread_pid)) else {
        return 0;
    };
    if pid == 0 {
        return 0;
    }
    let pid = pid as *const u8;
    let Ok(level) = read::<u32>(pid, global(&OFFSETS.pid_level)) else {
        return 0;
    };
    let (numbers, size) = (global(&OFFSETS.pid_numbers), global(&OFFSETS.upid_size));
    for i in 0..=MAX_PIDNS_LEVEL {
        if i > level {
            break;
        }
        let upid = numbers + u64::from(i) * size;
        let Ok(ns) = read::<u64>(pid, upid + global(&OFFSETS.upid_ns)) else {
            return 0;
        };
        if ns == 0 {
            continue;
        }
        if read::<u32>(ns as *const u8, global(&OFFSETS.pid_ns_inum)) == Ok(target as u32) {
            return read::<i32>(pid, upid + global(&OFFSETS.upid_nr)).map_or(0, |nr| nr as u32);
        }
    }
    0
}

/// The socket's storage, created (zeroed) first when `create`; `None` when
/// there is none (or it could not be allocated). `sk` must be a socket
/// pointer the verifier has typed as such (a checked context field).
#[inline(always)]
fn storage(sk: *mut core::ffi::c_void, create: bool) -> Option<&'static mut SocketStorage> {
    let flags = if create {
        BPF_SK_STORAGE_GET_F_CREATE as u64
    } else {
        0
    };
    let map = (&raw const SOCKS).cast_mut().cast();
    // SAFETY: `map` is this object's socket-storage map and `sk` a verifier-typed socket; the helper returns the socket's storage or null.
    let p = unsafe { bpf_sk_storage_get(map, sk, core::ptr::null_mut(), flags) };
    // SAFETY: a non-null result points at this socket's storage, which lives as long as the socket, beyond this run.
    unsafe { (p as *mut SocketStorage).as_mut() }
}

#[cgroup_sock_addr(connect4)]
pub fn flowaudit_connect4(ctx: SockAddrContext) -> i32 {
    on_connect_call(&ctx);
    // Never refuse: the agent only observes.
    1
}

#[cgroup_sock_addr(connect6)]
pub fn flowaudit_connect6(ctx: SockAddrContext) -> i32 {
    on_connect_call(&ctx);
    1
}

#[inline(always)]
fn on_connect_call(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    if !is_tcp(field!(sa, type_), field!(sa, protocol)) {
        return;
    }
    // SAFETY: `sa` is the program's context pointer; the verifier types its `sk` field as a socket.
    let sk = unsafe { read_volatile(addr_of!((*sa).__bindgen_anon_1.sk)) };
    if !sk.is_null() {
        remember_owner(sk.cast());
    }
}

#[inline(always)]
fn is_tcp(ty: u32, proto: u32) -> bool {
    ty == SOCK_STREAM && proto == IPPROTO_TCP as u32
}

/// Remembers the caller as the owner of the TCP socket `sk` it connects or
/// binds, in the socket's storage.
#[inline(always)]
fn remember_owner(sk: *mut core::ffi::c_void) {
    match storage(sk, true) {
        Some(s) => {
            s.sock.owner = current_owner();
            s.sock.owner_known = 1;
        }
        None => count_loss(LossPlace::OwnerMapFull),
    }
}

#[cgroup_sock(post_bind4)]
pub fn flowaudit_post_bind4(ctx: SockContext) -> i32 {
    on_bind(&ctx);
    1
}

#[cgroup_sock(post_bind6)]
pub fn flowaudit_post_bind6(ctx: SockContext) -> i32 {
    on_bind(&ctx);
    1
}

#[inline(always)]
fn on_bind(ctx: &SockContext) {
    let sk = ctx.sock;
    // The context is the socket itself (the helper takes it as such).
    if is_tcp(field!(sk, type_), field!(sk, protocol)) {
        remember_owner(ctx.as_ptr());
    }
}

/// The storage of the `sock_ops` context's socket, created first when
/// `create`.
#[inline(always)]
fn ops_storage(ctx: &SockOpsContext, create: bool) -> Option<&'static mut SocketStorage> {
    // SAFETY: `ctx.ops` is the program's context pointer; the verifier types its `sk` field as a socket or null.
    let sk = unsafe { read_volatile(addr_of!((*ctx.ops).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return None;
    }
    storage(sk.cast(), create)
}

/// Names the socket's network namespace: its cookie, from the helper where
/// `sock_ops` has it, else its inode number read from the socket
/// (`sk->__sk_common.skc_net`, then `net->ns.inum`), else 0 (unknown).
#[inline(always)]
fn netns_cookie(ctx: &SockOpsContext) -> u64 {
    if global(&SOCK_OPS_NETNS_COOKIE) != 0 {
        // SAFETY: the helper gets this program's own context (or skb) pointer, valid for this run.
        return unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    }
    if global(&KERNEL_READS) == 0 || global(&OFFSETS.net_ok) == 0 {
        return 0;
    }
    let Some(sk) = kernel_sock(ctx.ops) else {
        return 0;
    };
    match read::<u64>(sk, global(&OFFSETS.sock_net)) {
        Ok(net) if net != 0 => {
            read::<u32>(net as *const u8, global(&OFFSETS.net_ns_inum)).map_or(0, u64::from)
        }
        _ => 0,
    }
}

/// The kernel's `struct sock` behind a `sock_ops` context.
#[inline(always)]
fn kernel_sock(ops: *mut bpf_sock_ops) -> Option<*const u8> {
    // The verifier forbids arithmetic on the context's `sk` pointer, so read
    // the kernel's own `bpf_sock_ops_kern.sk` (its first member: the loader
    // checks that in BTF and leaves the offsets 0 otherwise) as a plain value.
    // SAFETY: bpf_probe_read_kernel copies through the kernel's fault-safe path: a bad address gives an error, never a fault.
    match unsafe { bpf_probe_read_kernel(ops as *const u64) } {
        Ok(sk) if sk != 0 => Some(sk as *const u8),
        _ => None,
    }
}

#[inline(always)]
fn socket_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the helper gets this program's own context pointer, valid for this run.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn cookies(ctx: &SockOpsContext) -> (u64, u64) {
    (socket_cookie(ctx), netns_cookie(ctx))
}

fn on_listen(ctx: &SockOpsContext) -> Result<(), i64> {
    let ops = ctx.ops;
    let (sock_cookie, netns_cookie) = cookies(ctx);
    // Without the namespace, one pod's listener would be taken for
    // another's on the same port: no entry rather than a wrong owner.
    if netns_cookie == 0 {
        return Ok(());
    }
    let key = ListenerKey {
        netns_cookie,
        port: field!(ops, local_port) as u16,
        family: field!(ops, family) as u16,
        _pad: 0,
    };
    // A socket bound before the agent started has no owner; the agent's
    // scan at start-up covers such listeners.
    let Some(s) = ops_storage(ctx, false) else {
        return Ok(());
    };
    if s.sock.owner_known == 0 {
        return Ok(());
    }
    let value = Listener {
        owner: s.sock.owner,
        sock_cookie,
    };
    if LISTENERS.insert(&key, &value, 0).is_err() {
        count_loss(LossPlace::ListenerMapFull);
    }
    // Follow the listener to its close, to forget it then.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    Ok(())
}

fn on_connect(ctx: &SockOpsContext) -> Result<(), i64> {
    // The connect hook made the storage, with the owner, just before.
    let Some(s) = ops_storage(ctx, true) else {
        count_loss(LossPlace::SocketMapFull);
        return Ok(());
    };
    // SAFETY: a BPF helper without arguments; it cannot fault.
    s.sock.start_ns = unsafe { bpf_ktime_get_ns() };
    s.sock.established_ns = 0;
    s.sock.side = SocketSide::Active as u8;
    s.sock.tracked = 1;
    s.cookie = socket_cookie(ctx);
    // Ask for state changes: that is how the close (or failure) is seen.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    Ok(())
}

fn on_established(ctx: &SockOpsContext, side: SocketSide) -> Result<(), i64> {
    let (sock_cookie, netns_cookie) = cookies(ctx);
    // SAFETY: a BPF helper without arguments; it cannot fault.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(s) = ops_storage(ctx, true) else {
        // No memory for its state: reported, but not followed to its close.
        count_loss(LossPlace::SocketMapFull);
        let state = SocketState {
            start_ns: now,
            established_ns: now,
            side: side as u8,
            ..SocketState::default()
        };
        emit(
            ctx,
            RecordKind::Connect,
            &state,
            sock_cookie,
            netns_cookie,
            now,
            0,
            CAPTURE_NOT_WATCHED,
        );
        return Ok(());
    };
    // An active socket followed since its connect has its state already;
    // an accepted one (or one older than the agent) starts here.
    if s.sock.tracked == 0 {
        s.sock.start_ns = now;
        s.sock.side = side as u8;
        s.sock.tracked = 1;
        s.cookie = sock_cookie;
        if side == SocketSide::Passive {
            listener_owner(ctx, netns_cookie, &mut s.sock);
        }
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
    s.sock.established_ns = now;
    let capture = if global(&PAYLOAD_CAPTURE) != 0 && watch_payload(ctx, s) {
        0
    } else {
        CAPTURE_NOT_WATCHED
    };
    emit(
        ctx,
        RecordKind::Connect,
        &s.sock,
        sock_cookie,
        netns_cookie,
        now,
        0,
        capture,
    );
    if side == SocketSide::Passive && capture == 0 {
        hand_over(ctx, s);
    }
    Ok(())
}

/// An accepted socket's owner is its listener's. (softirq context:
/// "current" is whoever sent the final ACK, on a veth or loopback the
/// client.)
#[inline(always)]
fn listener_owner(ctx: &SockOpsContext, netns_cookie: u64, state: &mut SocketState) {
    if netns_cookie == 0 {
        return;
    }
    let ops = ctx.ops;
    let key = ListenerKey {
        netns_cookie,
        port: field!(ops, local_port) as u16,
        family: field!(ops, family) as u16,
        _pad: 0,
    };
    // SAFETY: the value is copied out (or read once) right away; a concurrent update of the same key can at worst give a stale value, which the callers tolerate.
    if let Some(l) = unsafe { LISTENERS.get(&key) } {
        state.owner = l.owner;
        state.owner_known = 1;
    }
}

/// Starts watching the socket's payload: the next sequence numbers now are
/// those of the first payload byte in each direction, from which the
/// payload programs count stream offsets. The socket takes one of the
/// `--payload-sockets` places, given back when it closes.
/// False when every place is taken (counted): the payload is not watched.
#[inline(always)]
fn watch_payload(ctx: &SockOpsContext, s: &mut SocketStorage) -> bool {
    if s.payload.flags & PAYLOAD_COUNTED == 0 {
        let Some(count) = WATCHED.get_ptr_mut(0) else {
            return false;
        };
        // Read, then add: CPUs that race here can overshoot the limit by
        // one socket each, never undercount.
        // SAFETY: the pointer comes from this array's lookup of slot 0, which always exists.
        if unsafe { read_volatile(count) } >= global(&PAYLOAD_SOCKETS) {
            count_loss(LossPlace::PayloadMapFull);
            return false;
        }
        // SAFETY: as above; the slot is 8-byte aligned and only ever updated atomically.
        unsafe { atomic_add(count, 1) };
    }
    let ops = ctx.ops;
    let snd = field!(ops, snd_nxt);
    let rcv = field!(ops, rcv_nxt);
    s.payload = PayloadState {
        out_base: snd,
        in_base: rcv,
        out_next: snd,
        in_next: rcv,
        out_taken: 0,
        in_taken: 0,
        flags: PAYLOAD_WATCHED | PAYLOAD_COUNTED,
        _pad: 0,
    };
    true
}

fn on_close(ctx: &SockOpsContext, old_state: u32) -> Result<(), i64> {
    let ops = ctx.ops;
    let (sock_cookie, netns_cookie) = cookies(ctx);
    if old_state == BPF_TCP_LISTEN {
        let key = ListenerKey {
            netns_cookie,
            port: field!(ops, local_port) as u16,
            family: field!(ops, family) as u16,
            _pad: 0,
        };
        // SAFETY: the value is copied out (or read once) right away; a concurrent update of the same key can at worst give a stale value, which the callers tolerate.
        if let Some(l) = unsafe { LISTENERS.get(&key) }
            && l.sock_cookie == sock_cookie
        {
            let _ = LISTENERS.remove(&key);
        }
        return Ok(());
    }
    let Some(s) = ops_storage(ctx, false) else {
        // State callbacks are on only for sockets some agent tracked: this
        // one opened before this agent (or had no memory for its state).
        count_loss(LossPlace::CloseUntracked);
        return Ok(());
    };
    if s.sock.tracked == 0 {
        count_loss(LossPlace::CloseUntracked);
        return Ok(());
    }
    s.sock.tracked = 0;
    // Payload bytes lost that no MARK_LOST record could tell: the CLOSE
    // record says so instead.
    let flags = s.payload.flags;
    let capture =
        if flags & PAYLOAD_WATCHED != 0 && flags & (PAYLOAD_OUT_LOST | PAYLOAD_IN_LOST) != 0 {
            CAPTURE_LOST
        } else {
            0
        };
    s.payload.flags = 0;
    if flags & PAYLOAD_COUNTED != 0
        && let Some(count) = WATCHED.get_ptr_mut(0)
    {
        // SAFETY: the pointer comes from this array's lookup of slot 0, which always exists; the slot is only ever updated atomically.
        unsafe { atomic_add(count, 1u64.wrapping_neg()) };
    }
    let state = &s.sock;
    let kind = if old_state == BPF_TCP_SYN_SENT || state.established_ns == 0 {
        RecordKind::Failed
    } else {
        RecordKind::Close
    };
    // SAFETY: a BPF helper without arguments; it cannot fault.
    let now = unsafe { bpf_ktime_get_ns() };
    emit(
        ctx,
        kind,
        state,
        sock_cookie,
        netns_cookie,
        now,
        old_state as u8,
        capture,
    );
    Ok(())
}

/// The pending error on the socket: `sk_err` (set before the state changes
/// to CLOSE on a reset, a timeout or an ICMP error), else `sk_err_soft` (the
/// last soft error, e.g. "host unreachable" while SYNs were retried).
/// Without either, an attempt (`failed`) that the application did not
/// close itself lost its error to the application: [`ERROR_TAKEN`].
/// Also returns whether the peer's FIN arrived (`SOCK_DONE` in `sk_flags`).
#[inline(always)]
fn socket_facts(ops: *mut bpf_sock_ops, failed: bool) -> (u32, bool) {
    if global(&KERNEL_READS) == 0 {
        return (ERROR_UNREAD, false);
    }
    let Some(sk) = kernel_sock(ops) else {
        return (0, false);
    };
    if global(&OFFSETS.sock_ok) == 0 {
        return (ERROR_UNREAD, false);
    }
    let fin_received = read::<u64>(sk, global(&OFFSETS.sock_flags))
        .is_ok_and(|flags| flags & (1 << SOCK_DONE) != 0);
    for off in [global(&OFFSETS.sock_err), global(&OFFSETS.sock_err_soft)] {
        if let Ok(e) = read::<i32>(sk, off)
            && e > 0
        {
            return (e as u32, fin_received);
        }
    }
    if failed && read::<u8>(sk, global(&OFFSETS.sock_shutdown)).is_ok_and(|s| s != SHUTDOWN_MASK) {
        return (ERROR_TAKEN, fin_received);
    }
    (0, fin_received)
}

/// Flags of a ring-buffer submit or discard. By default the kernel wakes
/// the reader for each record that finds the ring drained (an irq_work in
/// the connecting task, and a wake-up of the agent), which at a few
/// thousand records a second is one wake-up per record. So while records
/// come, none wakes it: the agent reads the ring on a timer
/// (`--ring-poll-ms`), and the ring holds what comes in between. When none
/// came for a while, the agent stops its timer (whose wake-ups alone cost a
/// busy 2-core node 5% of a bulk stream's throughput) and sets `READER`:
/// the next record wakes it, and clears the slot so that only one does.
#[inline(always)]
fn submit_flags() -> u64 {
    if let Some(asleep) = READER.get_ptr_mut(0) {
        // SAFETY: the pointer comes from this array's lookup of slot 0, which always exists; a racing CPU can at worst also clear it and wake the reader once more.
        unsafe {
            if read_volatile(asleep) != 0 {
                *asleep = 0;
                return BPF_RB_FORCE_WAKEUP as u64;
            }
        }
    }
    BPF_RB_NO_WAKEUP as u64
}

// Each argument is a fact of this record; a struct would be one more copy
// on the 512-byte stack.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn emit(
    ctx: &SockOpsContext,
    kind: RecordKind,
    state: &SocketState,
    sock_cookie: u64,
    netns_cookie: u64,
    now: u64,
    old_state: u8,
    capture: u8,
) {
    let ops = ctx.ops;
    let Some(mut entry) = EVENTS.reserve::<FlowRecord>(0) else {
        count_loss(match kind {
            RecordKind::Connect => LossPlace::RingFullConnect,
            RecordKind::Close => LossPlace::RingFullClose,
            RecordKind::Failed => LossPlace::RingFullFailed,
            RecordKind::Payload => LossPlace::RingFullPayload,
        });
        return;
    };
    let rec = entry.as_mut_ptr();
    let family = field!(ops, family);
    let mut local_addr = [0u32; 4];
    let mut remote_addr = [0u32; 4];
    if family == AF_INET6 as u32 {
        local_addr = [
            field!(ops, local_ip6[0]),
            field!(ops, local_ip6[1]),
            field!(ops, local_ip6[2]),
            field!(ops, local_ip6[3]),
        ];
        remote_addr = [
            field!(ops, remote_ip6[0]),
            field!(ops, remote_ip6[1]),
            field!(ops, remote_ip6[2]),
            field!(ops, remote_ip6[3]),
        ];
    } else {
        local_addr[0] = field!(ops, local_ip4);
        remote_addr[0] = field!(ops, remote_ip4);
    }
    let (error, bytes_sent, bytes_received, retransmits, seq_flags) = if kind == RecordKind::Connect
    {
        (0, 0, 0, 0, 0)
    } else {
        let (error, fin_received) = socket_facts(ops, kind == RecordKind::Failed);
        let mut seq_flags = 0u8;
        if state.side == SocketSide::Active as u8 && kind == RecordKind::Close {
            seq_flags |= SEQ_SYN_ACKED;
        }
        let fin_sent = flowaudit_common::fin_sent(old_state);
        // With our FIN sent, nothing outstanding means the FIN was acked too.
        if fin_sent && field!(ops, snd_una) == field!(ops, snd_nxt) {
            seq_flags |= SEQ_FIN_ACKED;
        }
        if fin_received {
            seq_flags |= SEQ_FIN_RECEIVED;
        }
        (
            error,
            field!(ops, bytes_acked),
            field!(ops, bytes_received),
            field!(ops, total_retrans),
            seq_flags,
        )
    };
    // SAFETY: `rec` points at a reserved ring-buffer entry of this record's size, ours until submit; only plain fields are written.
    unsafe {
        (*rec).kind = kind as u8;
        (*rec).side = state.side;
        (*rec).family = family as u8;
        (*rec).owner_known = state.owner_known;
        (*rec).old_state = old_state;
        (*rec).seq_flags = seq_flags;
        (*rec).capture = capture;
        (*rec)._pad = 0;
        (*rec).local_port = field!(ops, local_port) as u16;
        // remote_port holds the port in network byte order in its upper half.
        (*rec).remote_port = u32::from_be(field!(ops, remote_port)) as u16;
        (*rec).error = error;
        // The u32 words hold the addresses as they lie in memory (network
        // order); storing them back keeps that byte order.
        (*rec).local_addr = core::mem::transmute::<[u32; 4], [u8; 16]>(local_addr);
        (*rec).remote_addr = core::mem::transmute::<[u32; 4], [u8; 16]>(remote_addr);
        (*rec).netns_cookie = netns_cookie;
        (*rec).sock_cookie = sock_cookie;
        (*rec).owner = state.owner;
        (*rec).ts_ns = now;
        (*rec).start_ns = state.start_ns;
        (*rec).established_ns = state.established_ns;
        (*rec).bytes_sent = bytes_sent;
        (*rec).bytes_received = bytes_received;
        (*rec).retransmits = retransmits;
        (*rec)._pad2 = 0;
    }
    entry.submit(submit_flags());
}

#[cgroup_skb(egress)]
pub fn flowaudit_skb_egress(ctx: SkBuffContext) -> i32 {
    payload(&ctx, DIR_OUT);
    // Never drop: the agent only observes.
    1
}

#[cgroup_skb(ingress)]
pub fn flowaudit_skb_ingress(ctx: SkBuffContext) -> i32 {
    payload(&ctx, DIR_IN);
    1
}

const IPPROTO_TCP: u8 = 6;
/// Chunks copied from one packet at most (a GSO packet can be 64 KiB).
const CHUNKS_PER_PACKET: u32 = PAYLOAD_BUDGET / PAYLOAD_CHUNK as u32;

#[inline(always)]
fn load<T: Copy>(ctx: &SkBuffContext, offset: u32) -> Option<T> {
    ctx.load::<T>(offset as usize).ok()
}

/// A header's bytes at `offset` (below 128: the verifier must see a
/// bound) read straight from the packet's linear part, where the kernel
/// keeps the IP and TCP headers; `load` (a helper call) when they are not
/// there. Every packet of every socket passes here, so a call saved is
/// saved on each (a bulk stream: two of four per packet).
#[inline(always)]
fn packet_header<T: Copy>(ctx: &SkBuffContext, offset: u32) -> Option<T> {
    let skb = ctx.skb.skb;
    // SAFETY: the skb is the program's context; `data` and `data_end` are
    // its fields, which the verifier turns into packet pointers.
    let (data, end) = unsafe {
        (
            read_volatile(addr_of!((*skb).data)) as usize,
            read_volatile(addr_of!((*skb).data_end)) as usize,
        )
    };
    let at = data + (offset & 127) as usize;
    if offset < 128 && at + core::mem::size_of::<T>() <= end {
        // SAFETY: the bytes lie between the packet's start and end, which
        // the comparison above proves (and the verifier checks).
        return Some(unsafe { (at as *const T).read_unaligned() });
    }
    load(ctx, offset)
}

/// Copies what is still wanted of this packet's payload. The skb starts at
/// the IP header on both hooks. The headers are read first: a packet without
/// payload bytes (the handshake, a bare ACK, a FIN) is done with before the
/// socket is looked up, so a connection's own state is touched only by its
/// payload packets.
#[inline(always)]
fn payload(ctx: &SkBuffContext, dir: u8) {
    // The IPv4 header without options; of an IPv6 header, the part up to
    // its next-header byte.
    let Some(ip) = packet_header::<[u8; 20]>(ctx, 0) else {
        return;
    };
    let version = ip[0] >> 4;
    let (ip_len, proto) = match version {
        4 => (((ip[0] & 0x0f) as u32) * 4, ip[9]),
        6 => (40, ip[6]),
        _ => return,
    };
    if proto != IPPROTO_TCP {
        if version == 6 {
            // A TCP socket's IPv6 packet whose next header is not TCP has
            // extension headers, which are not followed: say so.
            if let Some(s) = watched(ctx) {
                let cookie = s.cookie;
                let st = &mut s.payload;
                let done_bit = if dir == DIR_OUT {
                    PAYLOAD_OUT_DONE
                } else {
                    PAYLOAD_IN_DONE
                };
                if st.flags & done_bit != 0 {
                    return;
                }
                let at = if dir == DIR_OUT {
                    st.out_next.wrapping_sub(st.out_base)
                } else {
                    st.in_next.wrapping_sub(st.in_base)
                };
                give_up(cookie, st, dir, at, MARK_UNOBSERVABLE);
            }
        }
        return;
    }
    // Sequence number (bytes 4..8 of the TCP header) to data offset (12).
    let Some(tcp) = packet_header::<[u8; 9]>(ctx, ip_len + 4) else {
        return;
    };
    let seq = u32::from_be_bytes([tcp[0], tcp[1], tcp[2], tcp[3]]);
    let start = ip_len + ((tcp[8] >> 4) as u32) * 4;
    let total = ctx.len();
    if total <= start {
        return;
    }
    follow(ctx, dir, seq, ip_len, start, total - start);
}

/// The payload part of `payload`: `len` bytes at `start`, the first of them
/// at sequence number `seq`; the TCP header is at `tcp_at`.
#[inline(always)]
fn follow(ctx: &SkBuffContext, dir: u8, seq: u32, tcp_at: u32, start: u32, len: u32) {
    let Some(sk) = packet_sock(ctx) else {
        return;
    };
    // SAFETY: `sk` is a full socket the verifier has typed as such; `state` is one of its readable fields.
    if dir == DIR_IN && unsafe { read_volatile(addr_of!((*sk).state)) } == BPF_TCP_LISTEN {
        stash_for_child(ctx, seq, tcp_at, start, len);
        return;
    }
    // Egress and ingress of one socket may race on its state, costing at
    // worst a chunk copied twice or a mark sent twice (userspace tolerates
    // both).
    let Some(s) = watched_sock(sk) else {
        return;
    };
    let cookie = s.cookie;
    let st = &mut s.payload;
    let (lost_bit, done_bit) = if dir == DIR_OUT {
        (PAYLOAD_OUT_LOST, PAYLOAD_OUT_DONE)
    } else {
        (PAYLOAD_IN_LOST, PAYLOAD_IN_DONE)
    };
    if st.flags & lost_bit != 0 {
        // Bytes were lost and userspace was not told yet: try again now (or
        // the CLOSE record tells it, if no payload packet comes again).
        let at = if dir == DIR_OUT {
            st.out_next.wrapping_sub(st.out_base)
        } else {
            st.in_next.wrapping_sub(st.in_base)
        };
        if emit_mark(cookie, dir, at, MARK_LOST) {
            st.flags &= !lost_bit;
            finish(st, done_bit);
        }
        return;
    }
    if st.flags & done_bit != 0 {
        return;
    }
    let (next, base, taken) = if dir == DIR_OUT {
        (st.out_next, st.out_base, st.out_taken)
    } else {
        (st.in_next, st.in_base, st.in_taken)
    };
    // Bytes of this packet already seen (a retransmission overlaps them).
    let skip = next.wrapping_sub(seq);
    if (skip as i32) < 0 {
        // A gap (out of order, or an earlier packet not seen): the stream
        // can no longer be followed in this direction. Userspace is told,
        // so an unfinished classification ends at once with the reason.
        give_up(cookie, st, dir, next.wrapping_sub(base), MARK_GAP);
        return;
    }
    if skip >= len {
        return;
    }
    let data_off = start + skip;
    let fresh = len - skip;
    if st.flags & PAYLOAD_TLS == 0 {
        // The first payload of the connection: a TLS handshake record, or
        // not TLS at all (then a peek is enough, and we are done with it).
        let Some(first) = load::<u8>(ctx, data_off) else {
            return;
        };
        if first != TLS_HANDSHAKE {
            let n = if fresh > PAYLOAD_PEEK as u32 {
                PAYLOAD_PEEK as u32
            } else {
                fresh
            };
            if emit_bytes::<PAYLOAD_PEEK>(ctx, cookie, dir, next.wrapping_sub(base), data_off, n) {
                st.flags &= !PAYLOAD_WATCHED;
            } else {
                // The one record that tells plaintext was lost.
                st.flags |= lost_bit | done_bit;
            }
            return;
        }
        st.flags |= PAYLOAD_TLS;
    }
    let mut copied = 0u32;
    let mut taken = taken;
    let mut lost = false;
    for _ in 0..CHUNKS_PER_PACKET {
        if copied >= fresh || taken >= PAYLOAD_BUDGET {
            break;
        }
        let mut n = fresh - copied;
        if n > PAYLOAD_CHUNK as u32 {
            n = PAYLOAD_CHUNK as u32;
        }
        if n > PAYLOAD_BUDGET - taken {
            n = PAYLOAD_BUDGET - taken;
        }
        let offset = next.wrapping_sub(base).wrapping_add(copied);
        if !emit_bytes::<PAYLOAD_CHUNK>(ctx, cookie, dir, offset, data_off + copied, n) {
            lost = true;
            break;
        }
        copied += n;
        taken += n;
    }
    let seen_to = seq.wrapping_add(len);
    if dir == DIR_OUT {
        st.out_next = seen_to;
        st.out_taken = taken;
    } else {
        st.in_next = seen_to;
        st.in_taken = taken;
    }
    if lost {
        let at = next.wrapping_sub(base).wrapping_add(copied);
        give_up(cookie, st, dir, at, MARK_LOST);
    } else if taken >= PAYLOAD_BUDGET || copied < fresh {
        finish(st, done_bit);
    }
}

/// Stops following a direction for a reason userspace must know: sends a
/// `mark` record at stream offset `at`; when the ring is full, remembers
/// that bytes were lost (retried on the next packet, else told by CLOSE).
#[inline(always)]
fn give_up(cookie: u64, st: &mut PayloadState, dir: u8, at: u32, mark: u8) {
    let (lost_bit, done_bit) = if dir == DIR_OUT {
        (PAYLOAD_OUT_LOST, PAYLOAD_OUT_DONE)
    } else {
        (PAYLOAD_IN_LOST, PAYLOAD_IN_DONE)
    };
    if !emit_mark(cookie, dir, at, mark) {
        st.flags |= lost_bit;
    }
    finish(st, done_bit);
}

/// A zero-length payload record carrying `mark`.
#[inline(always)]
fn emit_mark(cookie: u64, dir: u8, at: u32, mark: u8) -> bool {
    let mut hdr = header(cookie, dir, at, 0);
    hdr.mark = mark;
    if EVENTS.output::<PayloadHeader>(&hdr, 0).is_err() {
        count_loss(LossPlace::RingFullPayload);
        return false;
    }
    true
}

/// Marks a direction finished; stops watching the socket when both are and
/// no loss is still untold.
#[inline(always)]
fn finish(st: &mut PayloadState, done_bit: u32) {
    st.flags |= done_bit;
    if st.flags & (PAYLOAD_OUT_DONE | PAYLOAD_IN_DONE) == (PAYLOAD_OUT_DONE | PAYLOAD_IN_DONE)
        && st.flags & (PAYLOAD_OUT_LOST | PAYLOAD_IN_LOST) == 0
    {
        st.flags &= !PAYLOAD_WATCHED;
    }
}

/// The storage of the packet's socket while its payload is watched.
#[inline(always)]
fn watched(ctx: &SkBuffContext) -> Option<&'static mut SocketStorage> {
    watched_sock(packet_sock(ctx)?)
}

/// The packet's socket, as a full socket.
#[inline(always)]
fn packet_sock(ctx: &SkBuffContext) -> Option<*mut bpf_sock> {
    // SAFETY: the skb is the program's context; the verifier types its `sk` field as a socket (common part) or null.
    let sk = unsafe { read_volatile(addr_of!((*ctx.skb.skb).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a helper that takes the verifier-typed socket pointer and returns the full socket or null.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return None;
    }
    Some(sk)
}

/// The socket's storage while its payload is watched.
#[inline(always)]
fn watched_sock(sk: *mut bpf_sock) -> Option<&'static mut SocketStorage> {
    let s = storage(sk.cast(), false)?;
    if s.payload.flags & PAYLOAD_WATCHED == 0 {
        return None;
    }
    Some(s)
}

// ---- A listener's segment, handed to its accepted socket -------------------
//
// A segment that completes a handshake is filtered on the listening socket:
// `tcp_v4_rcv` and `tcp_v6_rcv` run `tcp_filter` on `req->rsk_listener` for
// a request socket, make the accepted socket after that, and do not filter
// again. `sock_ops` then says PASSIVE_ESTABLISHED for the new socket with
// `rcv_nxt` still at that segment's first byte, before its data is queued.
// When that segment carries data (the server listens with TCP_DEFER_ACCEPT,
// so the bare ACK was dropped, or the ACK was lost or late), the ingress
// program would never see the client's first bytes on the server's socket.
// So it copies them here, per CPU, and `hand_over` sends them as the new
// socket's first inbound payload: both run in one softirq on one CPU.

/// Keeps a listener's inbound segment's payload (`len` bytes at `start`,
/// the first at sequence number `seq`) for the socket it may make.
#[inline(always)]
fn stash_for_child(ctx: &SkBuffContext, seq: u32, tcp_at: u32, start: u32, len: u32) {
    let Some(h) = HANDED.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot 0 of the array, which always exists; softirq
    // context, so nothing else on this CPU runs between here and its use.
    let h = unsafe { &mut *h };
    h.len = 0;
    let (Some(ports), Some(first)) = (load::<[u8; 4]>(ctx, tcp_at), load::<u8>(ctx, start)) else {
        return;
    };
    let tls = first == TLS_HANDSHAKE;
    // Not TLS: the peek that `follow` would take; TLS: up to the budget.
    let (most, room) = if tls {
        (HANDED_CHUNKS, PAYLOAD_CHUNK as u32)
    } else {
        (1, PAYLOAD_PEEK as u32)
    };
    let mut copied = 0u32;
    let mut chunks = 0u32;
    let mut lost = false;
    for (i, rec) in h.recs.iter_mut().enumerate() {
        if i >= most || copied >= len {
            break;
        }
        let mut n = len - copied;
        if n > room {
            n = room;
        }
        // The same n, in a form the verifier bounds (see `emit_bytes`).
        let n = ((n - 1) & (PAYLOAD_CHUNK as u32 - 1)) + 1;
        rec.hdr = header(0, DIR_IN, copied, n);
        // SAFETY: the destination is this record's data in the map value, with room for PAYLOAD_CHUNK >= n bytes.
        let ok = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                start + copied,
                rec.data.as_mut_ptr() as *mut _,
                n,
            ) == 0
        };
        if !ok {
            lost = true;
            break;
        }
        copied += n;
        chunks += 1;
    }
    // Kept even when nothing was copied: the socket must still be told
    // that its first bytes were lost, as `follow` tells it.
    h.seq = seq;
    h.ports = (u16::from_be_bytes([ports[0], ports[1]]) as u32) << 16
        | u16::from_be_bytes([ports[2], ports[3]]) as u32;
    h.chunks = chunks;
    h.tls = tls as u32;
    h.lost = lost as u32;
    h.len = len;
}

/// At PASSIVE_ESTABLISHED: when this CPU's kept segment is the one that
/// made this socket (its ports, and its first byte at `rcv_nxt`), sends
/// its bytes as the socket's first inbound payload and moves the inbound
/// stream past them, as `follow` would have. The slot is emptied either way.
#[inline(always)]
fn hand_over(ctx: &SockOpsContext, s: &mut SocketStorage) {
    let Some(h) = HANDED.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in `stash_for_child`: this CPU's slot, in the same softirq.
    let h = unsafe { &mut *h };
    let len = h.len;
    if len == 0 {
        return;
    }
    h.len = 0;
    let ops = ctx.ops;
    // remote_port holds the port in network byte order in its upper half.
    let ports = (u32::from_be(field!(ops, remote_port)) & 0xffff) << 16
        | (field!(ops, local_port) & 0xffff);
    let rcv = field!(ops, rcv_nxt);
    let st = &mut s.payload;
    if h.seq != rcv || h.ports != ports || st.in_next != rcv {
        return;
    }
    let chunks = h.chunks;
    let mut copied = 0u32;
    // Bytes the ingress program could not copy are lost like bytes the
    // ring had no room for.
    let mut lost = h.lost != 0;
    for (i, rec) in h.recs.iter_mut().enumerate() {
        if i as u32 >= chunks {
            break;
        }
        rec.hdr.sock_cookie = s.cookie;
        let n = rec.hdr.len;
        if EVENTS
            .output::<PayloadRecord<PAYLOAD_CHUNK>>(rec, submit_flags())
            .is_err()
        {
            count_loss(LossPlace::RingFullPayload);
            lost = true;
            break;
        }
        copied += n;
    }
    if h.tls == 0 {
        // As `follow` does with a first payload that is not TLS.
        if lost {
            st.flags |= PAYLOAD_IN_LOST | PAYLOAD_IN_DONE;
        } else {
            st.flags &= !PAYLOAD_WATCHED;
        }
        return;
    }
    st.flags |= PAYLOAD_TLS;
    st.in_next = rcv.wrapping_add(len);
    st.in_taken = copied;
    if lost {
        give_up(s.cookie, st, DIR_IN, copied, MARK_LOST);
    } else if copied >= PAYLOAD_BUDGET || copied < len {
        finish(st, PAYLOAD_IN_DONE);
    }
}

#[inline(always)]
fn header(cookie: u64, dir: u8, offset: u32, len: u32) -> PayloadHeader {
    PayloadHeader {
        kind: RecordKind::Payload as u8,
        dir,
        mark: 0,
        _pad: 0,
        len,
        offset,
        _pad2: 0,
        sock_cookie: cookie,
    }
}

/// Copies `n` (1..=N) bytes at `from` into a ring record with room for `N`.
#[inline(always)]
fn emit_bytes<const N: usize>(
    ctx: &SkBuffContext,
    cookie: u64,
    dir: u8,
    offset: u32,
    from: u32,
    n: u32,
) -> bool {
    if n == 0 || n > N as u32 {
        return false;
    }
    let Some(mut entry) = EVENTS.reserve::<PayloadRecord<N>>(0) else {
        count_loss(LossPlace::RingFullPayload);
        return false;
    };
    // The same n, written so that the verifier sees 1 <= n <= N (N is a
    // power of two); a plain range check gets lost in the optimiser.
    let n = ((n - 1) & (N as u32 - 1)) + 1;
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` points at a reserved ring-buffer entry with room for N bytes, ours until submit or discard; n is proven to be 1..=N above.
    let ok = unsafe {
        (*rec).hdr = header(cookie, dir, offset, n);
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            from,
            addr_of!((*rec).data) as *mut _,
            n,
        ) == 0
    };
    if ok {
        entry.submit(submit_flags());
    } else {
        entry.discard(BPF_RB_NO_WAKEUP as u64);
    }
    ok
}

// ---- Listeners that predate the agent -------------------------------------
//
// A BPF iterator over every open file of every task in the agent's pid
// namespace (`iter/task_file`, Linux 5.8+). For each TCP socket in LISTEN it
// writes a `ListenerSeen` (namespace, port, owner) to the iterator's
// seq_file; the loader reads them once at start-up and fills `LISTENERS`.
// Unlike a /proc scan it needs no setns (CAP_SYS_ADMIN) and no ptrace access
// to other processes' fd tables: CAP_BPF and CAP_PERFMON suffice.

/// `struct bpf_iter_meta` (include/linux/bpf.h); only `seq` is used.
#[repr(C)]
struct IterMeta {
    seq: *mut core::ffi::c_void,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__task_file`: the program's context.
#[repr(C)]
struct IterTaskFile {
    meta: *const IterMeta,
    task: *const u8,
    fd: u32,
    _pad: u32,
    file: *const u8,
}

const S_IFMT: u16 = 0o170_000;
const S_IFSOCK: u16 = 0o140_000;
const TCP_LISTEN: u8 = 10;

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn flowaudit_listeners(ctx: *mut core::ffi::c_void) -> i32 {
    let ctx = ctx as *const IterTaskFile;
    // Context loads stay plain loads: the verifier types them (a seq_file
    // pointer for bpf_seq_write), which it would not do for probe reads.
    // SAFETY: the iterator's context holds pointers the kernel guarantees for this run (bpf_iter contract); the verifier types each load.
    let (meta, task, file) = unsafe {
        (
            read_volatile(addr_of!((*ctx).meta)),
            read_volatile(addr_of!((*ctx).task)),
            read_volatile(addr_of!((*ctx).file)),
        )
    };
    if meta.is_null() || task.is_null() || file.is_null() {
        return 0;
    }
    if global(&KERNEL_READS) == 0
        || global(&OFFSETS.file_sock_ok) == 0
        || global(&OFFSETS.net_ok) == 0
        || global(&OFFSETS.task_ok) == 0
    {
        return 0;
    }
    let Some(mut seen) = listening_socket(file) else {
        return 0;
    };
    let Ok(leader) = read::<u64>(task, global(&OFFSETS.task_group_leader)) else {
        return 0;
    };
    let leader = leader as *const u8;
    // The kernel's own tgid stands when the agent is in the initial pid
    // namespace; `leader_facts` replaces it otherwise.
    seen.owner.tgid = read::<i32>(leader, global(&OFFSETS.task_tgid)).map_or(0, |t| t as u32);
    leader_facts(leader, &mut seen.owner);
    seen.owner.cgroup_id = task_cgroup_id(leader);
    // SAFETY: `meta` is the iterator's context pointer, valid for this run.
    let seq = unsafe { read_volatile(addr_of!((*meta).seq)) };
    // SAFETY: `seq` is the iterator's seq_file, valid for this run; the written record lives on our stack.
    unsafe {
        bpf_seq_write(
            seq as *mut _,
            addr_of!(seen) as *const _,
            core::mem::size_of::<ListenerSeen>() as u32,
        );
    }
    0
}

/// A TCP socket in LISTEN behind `file`, with its namespace and port.
#[inline(always)]
fn listening_socket(file: *const u8) -> Option<ListenerSeen> {
    let inode = read::<u64>(file, global(&OFFSETS.file_inode)).ok()?;
    if inode == 0 {
        return None;
    }
    let mode = read::<u16>(inode as *const u8, global(&OFFSETS.inode_mode)).ok()?;
    if mode & S_IFMT != S_IFSOCK {
        return None;
    }
    let socket = read::<u64>(file, global(&OFFSETS.file_private_data)).ok()?;
    if socket == 0 {
        return None;
    }
    let sk = read::<u64>(socket as *const u8, global(&OFFSETS.socket_sk)).ok()?;
    if sk == 0 {
        return None;
    }
    let sk = sk as *const u8;
    let family = read::<u16>(sk, global(&OFFSETS.sock_family)).ok()?;
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    if read::<u8>(sk, global(&OFFSETS.sock_state)).ok()? != TCP_LISTEN
        || read::<u16>(sk, global(&OFFSETS.sock_protocol)).ok()? != IPPROTO_TCP as u16
    {
        return None;
    }
    let port = read::<u16>(sk, global(&OFFSETS.sock_num)).ok()?;
    let net = read::<u64>(sk, global(&OFFSETS.sock_net)).ok()?;
    if net == 0 {
        return None;
    }
    let net = net as *const u8;
    Some(ListenerSeen {
        owner: Owner::default(),
        netns_cookie: read::<u64>(net, global(&OFFSETS.net_cookie)).unwrap_or(0),
        netns_inum: read::<u32>(net, global(&OFFSETS.net_ns_inum)).ok()?,
        port,
        family,
    })
}

/// The cgroup v2 id of `task` (`task->cgroups->dfl_cgrp->kn->id`), 0 when
/// it cannot be read.
#[inline(always)]
fn task_cgroup_id(task: *const u8) -> u64 {
    if global(&OFFSETS.cgroup_ok) == 0 {
        return 0;
    }
    let chain = [
        global(&OFFSETS.task_cgroups),
        global(&OFFSETS.css_set_dfl_cgrp),
        global(&OFFSETS.cgroup_kn),
    ];
    let mut p = task;
    for off in chain {
        match read::<u64>(p, off) {
            Ok(next) if next != 0 => p = next as *const u8,
            _ => return 0,
        }
    }
    read::<u64>(p, global(&OFFSETS.kernfs_node_id)).unwrap_or(0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
