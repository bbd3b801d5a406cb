//! Types that cross the kernel/user boundary, defined once for both sides:
//! the flow record the eBPF programs write into the ring buffer, the
//! per-socket state they keep in maps, the names of the kernel-side maps and
//! globals, and the places where a record can be lost. `#![no_std]` and
//! `#[repr(C)]` so the eBPF crate and the agent agree on every byte; the
//! `user` feature adds `aya::Pod` so userspace can read them from maps.
#![no_std]

/// Address family values as the kernel reports them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// What a record says happened to a connection.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// The handshake completed (either side).
    Connect = 1,
    /// An established connection ended; carries bytes and duration.
    Close = 2,
    /// An active attempt ended without ever establishing.
    Failed = 3,
    /// First payload bytes of a connection (a `PayloadHeader` and its data).
    Payload = 4,
}

impl RecordKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Connect),
            2 => Some(Self::Close),
            3 => Some(Self::Failed),
            4 => Some(Self::Payload),
            _ => None,
        }
    }
}

/// Which side of the connection the recording socket is.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketSide {
    /// The socket called connect(): the flow leaves its owner (EGRESS).
    Active = 1,
    /// The socket was accepted from a listener: the flow enters its owner (INGRESS).
    Passive = 2,
}

/// The process that owns a socket: for an active socket the process that
/// called connect(), for a passive one the process that called listen().
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// Thread group id (the userspace "pid"); 0 when unknown.
    pub tgid: u32,
    pub _pad: u32,
    /// Start time of the thread group leader, nanoseconds since boot
    /// (`task_struct.start_boottime`), so userspace can tell a reused pid.
    /// 0 when the kernel offsets were not available.
    pub start_boottime_ns: u64,
    /// cgroup v2 id (inode of the cgroup directory) of the owner.
    pub cgroup_id: u64,
    /// The owner's command name (NUL padded).
    pub comm: [u8; 16],
}

/// Per-socket flow state, part of the socket's `SocketStorage`: filled by
/// the first `sock_ops` callback and read until the socket closes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketState {
    pub owner: Owner,
    /// When the attempt started (active) or the handshake completed (passive),
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub start_ns: u64,
    /// When the handshake completed; 0 while it has not.
    pub established_ns: u64,
    /// `SocketSide` as u8.
    pub side: u8,
    /// 1 when the owner came from a listener entry or connect() context,
    /// 0 when it could not be established (e.g. a listener opened before
    /// the agent started).
    pub owner_known: u8,
    /// 1 from the first `sock_ops` callback that follows the socket (its
    /// state callbacks on) until its CLOSE record; 0 while only the connect
    /// or bind hook has seen it (`owner` may already be set).
    pub tracked: u8,
    pub _pad: [u8; 5],
}

/// What the kernel side keeps of one TCP socket, in the socket's own
/// storage (`bpf_sk_storage`, map `SOCKS`): no map entry to insert, look up
/// or delete by cookie, and nothing to run out of but memory. Created by
/// the connect or bind hook (the owner) or the first `sock_ops` callback,
/// and freed by the kernel with the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketStorage {
    pub sock: SocketState,
    pub payload: PayloadState,
    /// The socket's cookie, for the payload programs' records.
    pub cookie: u64,
}

/// Struct member offsets from the running kernel's BTF, handed to the
/// programs as one read-only global. An offset may legitimately be 0 (the
/// first member), so each group has a flag: 1 when every offset in it was
/// found, else the programs skip what needs it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct`: `group_leader`, `start_boottime`, `comm`, `tgid`.
    pub task_ok: u32,
    pub task_group_leader: u32,
    pub task_start_boottime: u32,
    pub task_comm: u32,
    pub task_tgid: u32,
    /// A task's pid as another pid namespace sees it:
    /// `task_struct.thread_pid`, `pid.level`, `pid.numbers[]` (elements of
    /// `upid_size` bytes: `upid.nr`, `upid.ns`), `pid_namespace.ns.inum`.
    pub pidns_ok: u32,
    pub task_thread_pid: u32,
    pub pid_level: u32,
    pub pid_numbers: u32,
    pub upid_size: u32,
    pub upid_nr: u32,
    pub upid_ns: u32,
    pub pid_ns_inum: u32,
    /// A task's cgroup v2 id: `task_struct.cgroups`, `css_set.dfl_cgrp`,
    /// `cgroup.kn`, `kernfs_node.id`.
    pub cgroup_ok: u32,
    pub task_cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
    /// `sock` error and flag fields (read through `bpf_sock_ops_kern.sk`).
    pub sock_ok: u32,
    pub sock_err: u32,
    pub sock_err_soft: u32,
    pub sock_flags: u32,
    /// `sock.sk_shutdown` (a whole byte since 2.6; the loader refuses a
    /// bitfield).
    pub sock_shutdown: u32,
    /// `sock.__sk_common.skc_net.net`, `net.ns.inum`.
    pub net_ok: u32,
    pub sock_net: u32,
    pub net_ns_inum: u32,
    /// A listening socket from an open file: `file.f_inode`,
    /// `inode.i_mode`, `file.private_data` (the `struct socket`),
    /// `socket.sk`, and in `sock`: family, state, local port, protocol;
    /// `net.net_cookie`.
    pub file_sock_ok: u32,
    pub file_inode: u32,
    pub inode_mode: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub sock_family: u32,
    pub sock_state: u32,
    pub sock_num: u32,
    pub sock_protocol: u32,
    pub net_cookie: u32,
}

/// One listening TCP socket with its owner, as the listener iterator
/// writes it (`bpf_seq_write`) for userspace to read from the iterator file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerSeen {
    pub owner: Owner,
    /// The namespace's cookie (`net.net_cookie`; 0 before it is assigned).
    pub netns_cookie: u64,
    /// The namespace's inode number (`net.ns.inum`).
    pub netns_inum: u32,
    pub port: u16,
    pub family: u16,
}

/// Key of the `LISTENERS` map: a listening port in one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Value of the `LISTENERS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Listener {
    pub owner: Owner,
    /// Cookie of the listening socket, so that closing one of several
    /// SO_REUSEPORT listeners does not remove another's entry.
    pub sock_cookie: u64,
}

/// One record in the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FlowRecord {
    /// `RecordKind` as u8.
    pub kind: u8,
    /// `SocketSide` as u8.
    pub side: u8,
    /// `AF_INET` or `AF_INET6` (as u8: 2 or 10).
    pub family: u8,
    /// 1 when `owner` is known.
    pub owner_known: u8,
    /// TCP state the socket left when it closed (`Close`/`Failed`), else 0.
    pub old_state: u8,
    /// `SEQ_*` bits: which of SYN and FIN the byte counters include, so
    /// userspace can report payload bytes exactly.
    pub seq_flags: u8,
    /// `CAPTURE_*` bits: what payload capture missed for this socket.
    pub capture: u8,
    pub _pad: u8,
    /// Local and remote ports, host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    /// `sk_err`, else `sk_err_soft`, when the socket closed (errno, positive); 0 if none.
    pub error: u32,
    /// Local and remote addresses in network byte order; IPv4 in the first 4 bytes.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Network namespace cookie (`bpf_get_netns_cookie`).
    pub netns_cookie: u64,
    /// Socket cookie (`bpf_get_socket_cookie`): ties Connect to Close.
    pub sock_cookie: u64,
    pub owner: Owner,
    /// When this happened, CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// When the attempt started (active) or was accepted (passive).
    pub start_ns: u64,
    /// When the handshake completed, 0 if it never did.
    pub established_ns: u64,
    /// Bytes this socket sent and the peer acknowledged (`bytes_acked`).
    pub bytes_sent: u64,
    /// Bytes this socket received (`bytes_received`).
    pub bytes_received: u64,
    /// Retransmitted segments (`total_retrans`): SYN retries for a failed attempt.
    pub retransmits: u32,
    pub _pad2: u32,
}

/// `FlowRecord::error` when the socket's error could not be read (kernel
/// reads are off on this kernel): the failure reason is unknown.
pub const ERROR_UNREAD: u32 = u32::MAX;

/// `FlowRecord::error` of an attempt the kernel ended (not the
/// application's close) whose socket error was already gone: the kernel
/// wakes the application as it sets the error, and an application that
/// reads it (`SO_ERROR`, which clears it) in the instant before the state
/// change reaches the programs leaves nothing to read. Seen on 6.12 about
/// once in 300 unreachable attempts. The failure reason is unknown; it is
/// not the application giving up (`ABORTED`).
pub const ERROR_TAKEN: u32 = u32::MAX - 1;

/// `FlowRecord::seq_flags`: `bytes_acked` counts our SYN (active side).
pub const SEQ_SYN_ACKED: u8 = 1;
/// `bytes_acked` counts our FIN: it was sent and acknowledged.
pub const SEQ_FIN_ACKED: u8 = 2;
/// `bytes_received` counts the peer's FIN (`SOCK_DONE` was set).
pub const SEQ_FIN_RECEIVED: u8 = 4;

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`, the
/// same values as `BPF_TCP_*`): what a `sock_ops` state callback reports.
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
}

/// Whether a socket that closes from `old_state` had sent its FIN: a socket
/// sends it on entering FIN_WAIT1 (it closes first) or LAST_ACK (second),
/// and every state it can reach after those, before CLOSE, is in this set.
/// So the state it leaves tells it; the transitions before need not be
/// followed.
pub const fn fin_sent(old_state: u8) -> bool {
    use tcp_state::*;
    matches!(
        old_state,
        FIN_WAIT1 | FIN_WAIT2 | CLOSING | TIME_WAIT | LAST_ACK
    )
}

/// `FlowRecord::capture`: the socket's payload is not watched (the
/// `PAYLOAD` or `SOCKETS` map was full), so its encryption cannot be seen.
pub const CAPTURE_NOT_WATCHED: u8 = 1;
/// `FlowRecord::capture` (on CLOSE/FAILED): payload bytes of the socket were
/// lost (ring buffer full) and no `MARK_LOST` record could tell it earlier.
pub const CAPTURE_LOST: u8 = 2;

/// Payload capture: the kernel copies the first bytes a tracked connection
/// carries in each direction, so userspace can tell plaintext from TLS and
/// mutual TLS. Bounded: at most `PAYLOAD_BUDGET` bytes per direction, in
/// records of up to `PAYLOAD_CHUNK` bytes; when the first payload of the
/// connection is not a TLS handshake record, only its first `PAYLOAD_PEEK`
/// bytes are copied and the connection is not looked at again.
pub const PAYLOAD_CHUNK: usize = 1024;
pub const PAYLOAD_PEEK: usize = 64;
pub const PAYLOAD_BUDGET: u32 = 4096;
/// First byte of a TLS handshake record.
pub const TLS_HANDSHAKE: u8 = 0x16;

/// `PayloadHeader::dir`: bytes the recording socket sent.
pub const DIR_OUT: u8 = 1;
/// `PayloadHeader::dir`: bytes the recording socket received.
pub const DIR_IN: u8 = 2;

/// Head of a payload record; `len` bytes of data follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PayloadHeader {
    /// `RecordKind::Payload` as u8 (same place as `FlowRecord::kind`).
    pub kind: u8,
    /// `DIR_OUT` or `DIR_IN`.
    pub dir: u8,
    /// 0 for data; else one `MARK_*` value, and `len` is 0: from `offset`
    /// on, the direction's stream is not followed, and why.
    pub mark: u8,
    pub _pad: u8,
    /// Bytes of data that follow (at most the record's capacity).
    pub len: u32,
    /// Where the data starts in its direction's byte stream (0 = first payload byte).
    pub offset: u32,
    pub _pad2: u32,
    pub sock_cookie: u64,
}

/// `PayloadHeader::mark`: a gap in the stream (a segment the hook never
/// saw, or out of order): the rest of this direction cannot be followed.
pub const MARK_GAP: u8 = 1;
/// `PayloadHeader::mark`: bytes were lost (ring buffer full, or the copy
/// failed) before this record.
pub const MARK_LOST: u8 = 2;
/// `PayloadHeader::mark`: the packets cannot be parsed here (IPv6 extension
/// headers are not followed).
pub const MARK_UNOBSERVABLE: u8 = 3;

/// A payload record with room for `N` bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PayloadRecord<const N: usize> {
    pub hdr: PayloadHeader,
    pub data: [u8; N],
}

/// Per-socket payload capture state (part of `SocketStorage`), watched
/// (`PAYLOAD_WATCHED`) from the handshake until the budget is spent, the
/// connection proves plaintext, or it closes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PayloadState {
    /// TCP sequence number of the first payload byte in each direction
    /// (`snd_nxt` and `rcv_nxt` when the handshake completed).
    pub out_base: u32,
    pub in_base: u32,
    /// Next sequence number expected in each direction.
    pub out_next: u32,
    pub in_next: u32,
    /// Bytes copied so far in each direction.
    pub out_taken: u32,
    pub in_taken: u32,
    /// `PAYLOAD_*` bits.
    pub flags: u32,
    pub _pad: u32,
}

/// `PayloadState::flags`: the connection opened with a TLS handshake record.
pub const PAYLOAD_TLS: u32 = 1;
/// Nothing more is copied in that direction (budget spent or a gap).
pub const PAYLOAD_OUT_DONE: u32 = 2;
pub const PAYLOAD_IN_DONE: u32 = 4;
/// Bytes of that direction were lost and no `MARK_LOST` record has gone
/// out yet (the ring was full): retried on the next packet, else the
/// CLOSE record says `CAPTURE_LOST`.
pub const PAYLOAD_OUT_LOST: u32 = 8;
pub const PAYLOAD_IN_LOST: u32 = 16;
/// The payload programs still want bytes of this socket; cleared when both
/// directions are done and no loss is untold (the common case then costs a
/// storage lookup and a flag test per payload packet).
pub const PAYLOAD_WATCHED: u32 = 32;
/// The socket holds one of the `--payload-sockets` places (the `WATCHED`
/// counter); `sock_ops` gives it back when the socket closes.
pub const PAYLOAD_COUNTED: u32 = 64;

/// Places where the kernel side can lose information; index into the
/// per-CPU `LOST` counter array. Each is counted where it happens.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossPlace {
    /// The ring buffer was full: a Connect record was dropped.
    RingFullConnect = 0,
    /// The ring buffer was full: a Close record was dropped.
    RingFullClose = 1,
    /// The ring buffer was full: a Failed record was dropped.
    RingFullFailed = 2,
    /// The socket's storage could not be allocated (kernel memory): the
    /// socket is not tracked to its close.
    SocketMapFull = 3,
    /// The `LISTENERS` map update failed: accepted sockets lose their owner.
    ListenerMapFull = 4,
    /// `--payload-sockets` sockets were watched already: the connection's
    /// encryption stays UNKNOWN.
    PayloadMapFull = 5,
    /// The ring buffer was full: payload bytes were dropped (encryption may
    /// stay UNKNOWN; no flow event is lost).
    RingFullPayload = 6,
    /// The socket's storage could not be allocated in the connect or bind
    /// hook (kernel memory): the socket's owner stays unknown.
    OwnerMapFull = 7,
    /// A connection closed that the agent never saw open (it predates this
    /// agent, e.g. across a restart, or its storage could not be allocated): its CLOSE or
    /// FAILED is not reported.
    CloseUntracked = 8,
}

pub const LOSS_PLACES: u32 = 9;

impl LossPlace {
    pub const ALL: [LossPlace; LOSS_PLACES as usize] = [
        Self::RingFullConnect,
        Self::RingFullClose,
        Self::RingFullFailed,
        Self::SocketMapFull,
        Self::ListenerMapFull,
        Self::PayloadMapFull,
        Self::RingFullPayload,
        Self::OwnerMapFull,
        Self::CloseUntracked,
    ];

    /// Label used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::RingFullConnect => "ring_full_connect",
            Self::RingFullClose => "ring_full_close",
            Self::RingFullFailed => "ring_full_failed",
            Self::SocketMapFull => "socket_map_full",
            Self::ListenerMapFull => "listener_map_full",
            Self::PayloadMapFull => "payload_map_full",
            Self::RingFullPayload => "ring_full_payload",
            Self::OwnerMapFull => "owner_map_full",
            Self::CloseUntracked => "close_untracked",
        }
    }

    /// What a loss here costs, for `status`, metrics help and LostEvents.
    pub fn consequence(self) -> &'static str {
        match self {
            Self::RingFullConnect => "CONNECT events not reported (ring buffer full)",
            Self::RingFullClose => "CLOSE events not reported (ring buffer full)",
            Self::RingFullFailed => "FAILED events not reported (ring buffer full)",
            Self::SocketMapFull => {
                "sockets not tracked (no kernel memory for their state): their CLOSE or FAILED is lost and their encryption is not seen"
            }
            Self::ListenerMapFull => {
                "listeners not tracked (listener map full): their accepted connections have no owner"
            }
            Self::PayloadMapFull => {
                "connections whose payload was not watched (--payload-sockets reached): encryption not seen"
            }
            Self::RingFullPayload => {
                "payload records lost (ring buffer full): encryption may not be seen"
            }
            Self::OwnerMapFull => {
                "socket owners not recorded (no kernel memory for their state): those ends have no pid"
            }
            Self::CloseUntracked => {
                "CLOSE or FAILED events of connections the agent never saw open (older than the agent)"
            }
        }
    }

    /// Whether a loss here means a flow event never reached userspace.
    pub fn loses_event(self) -> bool {
        matches!(
            self,
            Self::RingFullConnect
                | Self::RingFullClose
                | Self::RingFullFailed
                | Self::CloseUntracked
        )
    }
}

/// Names shared by the eBPF object and the loader.
pub mod names {
    pub const PROG_SOCK_OPS: &str = "flowaudit_sock_ops";
    pub const MAP_EVENTS: &str = "EVENTS";
    pub const MAP_LOST: &str = "LOST";
    /// Socket-local storage (`bpf_sk_storage`) of [`super::SocketStorage`].
    pub const MAP_SOCKS: &str = "SOCKS";
    pub const MAP_LISTENERS: &str = "LISTENERS";
    /// Slot 0 (u64): sockets holding a `--payload-sockets` place now.
    pub const MAP_WATCHED: &str = "WATCHED";
    pub const PROG_SKB_EGRESS: &str = "flowaudit_skb_egress";
    pub const PROG_SKB_INGRESS: &str = "flowaudit_skb_ingress";
    /// Where a socket's owner is seen: connect() and bind() callers.
    pub const PROG_CONNECT4: &str = "flowaudit_connect4";
    pub const PROG_CONNECT6: &str = "flowaudit_connect6";
    pub const PROG_POST_BIND4: &str = "flowaudit_post_bind4";
    pub const PROG_POST_BIND6: &str = "flowaudit_post_bind6";
    /// Slot 0 (u32): 1 while the agent's ring reader waits for the kernel
    /// to wake it; the first record submitted then does, and clears it.
    pub const MAP_READER: &str = "READER";
    /// Feature switches the loader probes (u32, 1 = on).
    pub const KERNEL_READS: &str = "KERNEL_READS";
    pub const SOCK_OPS_NETNS_COOKIE: &str = "SOCK_OPS_NETNS_COOKIE";
    /// 1 when the payload programs are attached (sockets are watched).
    pub const PAYLOAD_CAPTURE: &str = "PAYLOAD_CAPTURE";
    /// `--payload-sockets` (u32): sockets watched at once, node-wide.
    pub const PAYLOAD_SOCKETS: &str = "PAYLOAD_SOCKETS";
    /// Struct member offsets resolved from the running kernel's BTF at load
    /// time, one read-only global of type [`KernelOffsets`].
    pub const OFFSETS: &str = "OFFSETS";
    /// Inode number of the agent's pid namespace when it is not the initial
    /// one (0 otherwise): owners' pids are reported as that namespace sees
    /// them (the node's, on a kind node).
    pub const PIDNS_INUM: &str = "PIDNS_INUM";
    /// The BPF iterator that lists listening sockets with their owners.
    pub const PROG_LISTENERS_ITER: &str = "flowaudit_listeners";
}

/// Sizes of the kernel-side maps.
pub const EVENTS_RING_BYTES: u32 = 8 * 1024 * 1024;
/// Default of `--payload-sockets`: sockets whose payload is watched at once.
pub const SOCKETS_MAX: u32 = 262_144;
pub const LISTENERS_MAX: u32 = 16_384;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid, padding explicit
    // (checked by `layouts_have_no_implicit_padding`).
    unsafe impl aya::Pod for Owner {}
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid, padding explicit
    // (checked by `layouts_have_no_implicit_padding`).
    unsafe impl aya::Pod for SocketState {}
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid, padding explicit
    // (checked by `layouts_have_no_implicit_padding`).
    unsafe impl aya::Pod for SocketStorage {}
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid, padding explicit
    // (checked by `layouts_have_no_implicit_padding`).
    unsafe impl aya::Pod for ListenerKey {}
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid, padding explicit
    // (checked by `layouts_have_no_implicit_padding`).
    unsafe impl aya::Pod for Listener {}
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid, padding explicit
    // (checked by `layouts_have_no_implicit_padding`).
    unsafe impl aya::Pod for KernelOffsets {}
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid, padding explicit
    // (checked by `layouts_have_no_implicit_padding`).
    unsafe impl aya::Pod for ListenerSeen {}
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid, padding explicit
    // (checked by `layouts_have_no_implicit_padding`).
    unsafe impl aya::Pod for FlowRecord {}
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid, padding explicit
    // (checked by `layouts_have_no_implicit_padding`).
    unsafe impl aya::Pod for PayloadHeader {}
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid, padding explicit
    // (checked by `layouts_have_no_implicit_padding`).
    unsafe impl aya::Pod for PayloadState {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        // Implicit padding would leave bytes the kernel never writes; the
        // sizes below are the sums of the declared fields.
        assert_eq!(core::mem::size_of::<Owner>(), 4 + 4 + 8 + 8 + 16);
        assert_eq!(core::mem::size_of::<SocketState>(), 40 + 8 + 8 + 8);
        assert_eq!(core::mem::size_of::<ListenerKey>(), 16);
        assert_eq!(core::mem::size_of::<PayloadHeader>(), 24);
        assert_eq!(core::mem::size_of::<PayloadState>(), 32);
        assert_eq!(core::mem::size_of::<SocketStorage>(), 64 + 32 + 8);
        assert_eq!(
            core::mem::size_of::<PayloadRecord<PAYLOAD_CHUNK>>(),
            24 + PAYLOAD_CHUNK
        );
        assert_eq!(core::mem::size_of::<Listener>(), 48);
        assert_eq!(core::mem::size_of::<ListenerSeen>(), 56);
        assert_eq!(
            core::mem::size_of::<FlowRecord>(),
            8 + 2 + 2 + 4 + 16 + 16 + 8 + 8 + 40 + 8 * 5 + 4 + 4
        );
    }

    /// Every path of RFC 793's state diagram from ESTABLISHED to CLOSE (and
    /// the failures before it): the FIN was sent exactly when the path went
    /// through FIN_WAIT1 or LAST_ACK, and the state left for CLOSE says so.
    #[test]
    fn the_state_a_socket_closes_from_says_whether_its_fin_was_sent() {
        use tcp_state::*;
        let paths: &[&[u8]] = &[
            // failed attempts and resets
            &[SYN_SENT],
            &[SYN_RECV],
            &[ESTABLISHED],
            &[ESTABLISHED, CLOSE_WAIT],
            // we close first
            &[ESTABLISHED, FIN_WAIT1],
            &[ESTABLISHED, FIN_WAIT1, FIN_WAIT2],
            &[ESTABLISHED, FIN_WAIT1, FIN_WAIT2, TIME_WAIT],
            &[ESTABLISHED, FIN_WAIT1, CLOSING],
            &[ESTABLISHED, FIN_WAIT1, CLOSING, TIME_WAIT],
            &[ESTABLISHED, FIN_WAIT1, TIME_WAIT],
            // the peer closes first
            &[ESTABLISHED, CLOSE_WAIT, LAST_ACK],
        ];
        for path in paths {
            let went_through_fin = path.iter().any(|&s| s == FIN_WAIT1 || s == LAST_ACK);
            let last = *path.last().unwrap();
            assert_eq!(
                fin_sent(last),
                went_through_fin,
                "closing from {last} after {path:?}"
            );
        }
        assert!(!fin_sent(LISTEN) && !fin_sent(CLOSE));
    }

    #[test]
    fn record_kind_round_trips() {
        for k in [
            RecordKind::Connect,
            RecordKind::Close,
            RecordKind::Failed,
            RecordKind::Payload,
        ] {
            assert_eq!(RecordKind::from_u8(k as u8), Some(k));
        }
        assert_eq!(RecordKind::from_u8(0), None);
        assert_eq!(RecordKind::from_u8(9), None);
    }
}
