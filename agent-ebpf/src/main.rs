//! flowaudit's kernel side: one `sock_ops` program on the cgroup v2 root sees
//! every TCP socket of every process on the node, whatever its network
//! namespace. It records who owns each socket (connect() caller, or the
//! listen() caller for accepted sockets), and writes a `FlowRecord` into the
//! `EVENTS` ring buffer when a connection establishes, closes, or fails to
//! establish. Only `bpf_sock_ops` context fields and helpers are used, plus
//! five struct offsets that the loader resolves from the running kernel's
//! BTF, so the same object runs on 5.15 to 6.x kernels.
#![no_std]
#![no_main]

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE, BPF_TCP_FIN_WAIT1, BPF_TCP_LAST_ACK,
        BPF_TCP_LISTEN, BPF_TCP_SYN_SENT, bpf_sock_ops,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
        generated::{bpf_get_current_task, bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::{map, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::SockOpsContext,
};
use flowaudit_common::{
    AF_INET6, EVENTS_RING_BYTES, FlowRecord, LISTENERS_MAX, LOSS_PLACES, Listener, ListenerKey,
    LossPlace, Owner, RecordKind, SEQ_FIN_ACKED, SEQ_FIN_RECEIVED, SEQ_SYN_ACKED, SOCKETS_MAX,
    SocketSide, SocketState,
};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_PLACES, 0);

#[map]
static SOCKETS: HashMap<u64, SocketState> = HashMap::with_max_entries(SOCKETS_MAX, 0);

// LRU: a listener that closes while the agent is down never gets its entry
// removed; eviction keeps the map from filling up with them.
#[map]
static LISTENERS: LruHashMap<ListenerKey, Listener> =
    LruHashMap::with_max_entries(LISTENERS_MAX, 0);

// Struct member offsets from the running kernel's BTF, set by the loader.
// 0 means "not available": the read is skipped and the field stays 0.
#[unsafe(no_mangle)]
static OFF_TASK_GROUP_LEADER: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TASK_START_BOOTTIME: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TASK_COMM: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SOCK_ERR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SOCK_ERR_SOFT: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SOCK_FLAGS: u32 = 0;

/// `enum sock_flags`: SOCK_DONE (bit 1) is set by tcp_fin() when the peer's FIN arrives.
const SOCK_DONE: u64 = 1;

#[inline(always)]
fn global(v: &'static u32) -> u64 {
    // Volatile: the loader rewrites these after compilation.
    unsafe { read_volatile(v) as u64 }
}

#[inline(always)]
fn count_loss(place: LossPlace) {
    if let Some(c) = LOST.get_ptr_mut(place as u32) {
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
        BPF_SOCK_OPS_STATE_CB => {
            let old = field!(ops, __bindgen_anon_1.args[0]);
            let new = field!(ops, __bindgen_anon_1.args[1]);
            if new == BPF_TCP_CLOSE {
                on_close(ctx, old)
            } else {
                on_state(ctx, new)
            }
        }
        _ => Ok(()),
    }
}

/// The process running now: valid in connect() and listen(), which run in
/// process context; never used for callbacks that run in softirq.
#[inline(always)]
fn current_owner() -> Owner {
    let mut owner = Owner {
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        start_boottime_ns: 0,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: [0; 16],
    };
    let off_leader = global(&OFF_TASK_GROUP_LEADER);
    if off_leader == 0 {
        return owner;
    }
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let Ok(leader) = bpf_probe_read_kernel(task.add(off_leader as usize) as *const u64) else {
            return owner;
        };
        let leader = leader as *const u8;
        let off_start = global(&OFF_TASK_START_BOOTTIME);
        if off_start != 0 {
            if let Ok(t) = bpf_probe_read_kernel(leader.add(off_start as usize) as *const u64) {
                owner.start_boottime_ns = t;
            }
        }
        let off_comm = global(&OFF_TASK_COMM);
        if off_comm != 0 {
            if let Ok(c) = bpf_probe_read_kernel(leader.add(off_comm as usize) as *const [u8; 16]) {
                owner.comm = c;
            }
        }
    }
    owner
}

#[inline(always)]
fn cookies(ctx: &SockOpsContext) -> (u64, u64) {
    unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    }
}

fn on_listen(ctx: &SockOpsContext) -> Result<(), i64> {
    let ops = ctx.ops;
    let (sock_cookie, netns_cookie) = cookies(ctx);
    let key = ListenerKey {
        netns_cookie,
        port: field!(ops, local_port) as u16,
        family: field!(ops, family) as u16,
        _pad: 0,
    };
    let value = Listener {
        owner: current_owner(),
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
    let (sock_cookie, _) = cookies(ctx);
    let state = SocketState {
        owner: current_owner(),
        start_ns: unsafe { bpf_ktime_get_ns() },
        established_ns: 0,
        side: SocketSide::Active as u8,
        owner_known: 1,
        states_seen: 0,
        _pad: [0; 4],
    };
    if SOCKETS.insert(&sock_cookie, &state, 0).is_err() {
        count_loss(LossPlace::SocketMapFull);
        return Ok(());
    }
    // Ask for state changes: that is how the close (or failure) is seen.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    Ok(())
}

fn on_established(ctx: &SockOpsContext, side: SocketSide) -> Result<(), i64> {
    let ops = ctx.ops;
    let (sock_cookie, netns_cookie) = cookies(ctx);
    let now = unsafe { bpf_ktime_get_ns() };
    let mut state = match unsafe { SOCKETS.get(&sock_cookie) } {
        Some(s) => *s,
        None => SocketState {
            owner: Owner::default(),
            start_ns: now,
            established_ns: 0,
            side: side as u8,
            owner_known: 0,
            states_seen: 0,
            _pad: [0; 4],
        },
    };
    state.established_ns = now;
    if side == SocketSide::Passive {
        // softirq context: "current" is whoever sent the final ACK (on a
        // veth or loopback, the client). The owner is the listener's.
        let key = ListenerKey {
            netns_cookie,
            port: field!(ops, local_port) as u16,
            family: field!(ops, family) as u16,
            _pad: 0,
        };
        if let Some(l) = unsafe { LISTENERS.get(&key) } {
            state.owner = l.owner;
            state.owner_known = 1;
        }
    }
    if SOCKETS.insert(&sock_cookie, &state, 0).is_err() {
        count_loss(LossPlace::SocketMapFull);
    } else {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
    emit(
        ctx,
        RecordKind::Connect,
        &state,
        sock_cookie,
        netns_cookie,
        now,
        0,
    );
    Ok(())
}

/// Remembers which states the socket went through: whether our FIN was
/// sent (FIN_WAIT1 or LAST_ACK) decides how the byte counters are read.
fn on_state(ctx: &SockOpsContext, new: u32) -> Result<(), i64> {
    let (sock_cookie, _) = cookies(ctx);
    if let Some(state) = SOCKETS.get_ptr_mut(&sock_cookie) {
        if new < 16 {
            unsafe { (*state).states_seen |= 1 << new };
        }
    }
    Ok(())
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
        if let Some(l) = unsafe { LISTENERS.get(&key) } {
            if l.sock_cookie == sock_cookie {
                let _ = LISTENERS.remove(&key);
            }
        }
        return Ok(());
    }
    let Some(state) = (unsafe { SOCKETS.get(&sock_cookie) }) else {
        return Ok(());
    };
    let state = *state;
    let _ = SOCKETS.remove(&sock_cookie);
    let kind = if old_state == BPF_TCP_SYN_SENT || state.established_ns == 0 {
        RecordKind::Failed
    } else {
        RecordKind::Close
    };
    let now = unsafe { bpf_ktime_get_ns() };
    emit(
        ctx,
        kind,
        &state,
        sock_cookie,
        netns_cookie,
        now,
        old_state as u8,
    );
    Ok(())
}

/// The pending error on the socket: `sk_err` (set before the state changes
/// to CLOSE on a reset, a timeout or an ICMP error), else `sk_err_soft` (the
/// last soft error, e.g. "host unreachable" while SYNs were retried).
/// Also returns whether the peer's FIN arrived (`SOCK_DONE` in `sk_flags`).
#[inline(always)]
fn socket_facts(ops: *mut bpf_sock_ops) -> (u32, bool) {
    // The verifier forbids arithmetic on the context's `sk` pointer, so read
    // the kernel's own `bpf_sock_ops_kern.sk` (its first member: the loader
    // checks that in BTF and leaves the offsets 0 otherwise) as a plain value.
    let Ok(sk) = (unsafe { bpf_probe_read_kernel(ops as *const u64) }) else {
        return (0, false);
    };
    if sk == 0 {
        return (0, false);
    }
    let sk = sk as *const u8;
    let mut fin_received = false;
    let off_flags = global(&OFF_SOCK_FLAGS);
    if off_flags != 0 {
        if let Ok(flags) =
            unsafe { bpf_probe_read_kernel(sk.add(off_flags as usize) as *const u64) }
        {
            fin_received = flags & (1 << SOCK_DONE) != 0;
        }
    }
    for off in [global(&OFF_SOCK_ERR), global(&OFF_SOCK_ERR_SOFT)] {
        if off == 0 {
            continue;
        }
        if let Ok(e) = unsafe { bpf_probe_read_kernel(sk.add(off as usize) as *const i32) } {
            if e > 0 {
                return (e as u32, fin_received);
            }
        }
    }
    (0, fin_received)
}

#[inline(always)]
fn emit(
    ctx: &SockOpsContext,
    kind: RecordKind,
    state: &SocketState,
    sock_cookie: u64,
    netns_cookie: u64,
    now: u64,
    old_state: u8,
) {
    let ops = ctx.ops;
    let Some(mut entry) = EVENTS.reserve::<FlowRecord>(0) else {
        count_loss(match kind {
            RecordKind::Connect => LossPlace::RingFullConnect,
            RecordKind::Close => LossPlace::RingFullClose,
            RecordKind::Failed => LossPlace::RingFullFailed,
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
        let (error, fin_received) = socket_facts(ops);
        let mut seq_flags = 0u8;
        if state.side == SocketSide::Active as u8 && kind == RecordKind::Close {
            seq_flags |= SEQ_SYN_ACKED;
        }
        let fin_sent =
            state.states_seen & ((1 << BPF_TCP_FIN_WAIT1) | (1 << BPF_TCP_LAST_ACK)) != 0;
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
    unsafe {
        (*rec).kind = kind as u8;
        (*rec).side = state.side;
        (*rec).family = family as u8;
        (*rec).owner_known = state.owner_known;
        (*rec).old_state = old_state;
        (*rec).seq_flags = seq_flags;
        (*rec)._pad = [0; 2];
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
    entry.submit(0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
