//! Decoding of the kernel's records: raw ring-buffer bytes in, a typed
//! `KernelRecord` out: a `KernelEvent` for a `FlowRecord` (addresses as
//! `SocketAddr`, IPv4-mapped IPv6 folded to IPv4, the owner as process
//! facts), or a `PayloadChunk` (first payload bytes of a connection). Bytes from the kernel are still
//! untrusted input here: a short or malformed record is an error, not a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::flow::{EventKind, UnknownReason};

use flowaudit_common::{
    AF_INET, AF_INET6, CAPTURE_LOST, CAPTURE_NOT_WATCHED, DIR_IN, DIR_OUT, FlowRecord, MARK_GAP,
    MARK_LOST, MARK_UNOBSERVABLE, PAYLOAD_CHUNK, PayloadHeader, RecordKind, SEQ_FIN_ACKED,
    SEQ_FIN_RECEIVED, SEQ_SYN_ACKED, SocketSide,
};

/// A map keyed by socket cookie. The kernel assigns cookies (a peer cannot
/// choose them), so a fast multiply-fold hash is safe where SipHash would
/// cost more than the lookup on every record.
pub type CookieMap<V> = std::collections::HashMap<u64, V, foldhash::fast::RandomState>;
/// A set of socket cookies (see [`CookieMap`]).
pub type CookieSet = std::collections::HashSet<u64, foldhash::fast::RandomState>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("kernel record has {got} bytes, expected {expected}")]
    Size { got: usize, expected: usize },
    #[error("kernel record has unknown kind {0}")]
    Kind(u8),
    #[error("kernel record has unknown socket side {0}")]
    Side(u8),
    #[error("kernel record has unknown address family {0}")]
    Family(u8),
    #[error("kernel payload record has unknown direction {0}")]
    Direction(u8),
    #[error("kernel payload record says {len} bytes but carries {room}")]
    PayloadLength { len: u32, room: usize },
    #[error("kernel payload record has unknown mark {0}")]
    Mark(u8),
    #[error("kernel payload mark record carries {0} bytes, expected none")]
    MarkLength(u32),
    #[error("kernel record has unknown capture bits {0:#x}")]
    Capture(u8),
}

/// One decoded ring-buffer item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelRecord {
    Flow(KernelEvent),
    Payload(PayloadChunk),
}

/// Payload bytes of one connection, as the socket `sock_cookie` sent
/// (`outbound`) or received them, starting at `offset` in that direction.
/// With `mark`, no bytes: the kernel stopped following that direction at
/// `offset`, for that reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadChunk {
    pub sock_cookie: u64,
    pub outbound: bool,
    pub offset: u32,
    pub data: ChunkBytes,
    pub mark: Option<UnknownReason>,
}

/// Bytes of a payload chunk kept in place: the opening of a plaintext
/// connection, which the kernel cuts at `PAYLOAD_PEEK` bytes, and so most
/// chunks. Within the size of a flow record, so a `KernelRecord` is no
/// larger for it.
const INLINE_CHUNK: usize = flowaudit_common::PAYLOAD_PEEK;

/// A payload chunk's bytes: up to `INLINE_CHUNK` in place (no allocation
/// per plaintext connection), more (a TLS handshake's records) on the heap.
#[derive(Clone)]
pub enum ChunkBytes {
    Inline { len: u8, bytes: [u8; INLINE_CHUNK] },
    Heap(Box<[u8]>),
}

impl From<&[u8]> for ChunkBytes {
    fn from(b: &[u8]) -> Self {
        if b.len() <= INLINE_CHUNK {
            let mut bytes = [0; INLINE_CHUNK];
            bytes[..b.len()].copy_from_slice(b);
            Self::Inline {
                len: b.len() as u8,
                bytes,
            }
        } else {
            Self::Heap(b.into())
        }
    }
}

impl std::ops::Deref for ChunkBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Heap(b) => b,
        }
    }
}

impl PartialEq for ChunkBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for ChunkBytes {}

impl std::fmt::Debug for ChunkBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl KernelRecord {
    /// Decodes one ring-buffer item of either kind.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RecordError> {
        if bytes.first() == Some(&(RecordKind::Payload as u8)) {
            PayloadChunk::from_bytes(bytes).map(Self::Payload)
        } else {
            KernelEvent::from_bytes(bytes).map(Self::Flow)
        }
    }
}

impl PayloadChunk {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RecordError> {
        let head = std::mem::size_of::<PayloadHeader>();
        if bytes.len() < head {
            return Err(RecordError::Size {
                got: bytes.len(),
                expected: head,
            });
        }
        // SAFETY: length checked; plain data valid for any bit pattern.
        let hdr = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<PayloadHeader>()) };
        let outbound = match hdr.dir {
            DIR_OUT => true,
            DIR_IN => false,
            d => return Err(RecordError::Direction(d)),
        };
        let mark = match hdr.mark {
            0 => None,
            MARK_GAP => Some(UnknownReason::StreamGap),
            MARK_LOST => Some(UnknownReason::PayloadLost),
            MARK_UNOBSERVABLE => Some(UnknownReason::NotObservable),
            m => return Err(RecordError::Mark(m)),
        };
        if mark.is_some() && hdr.len != 0 {
            return Err(RecordError::MarkLength(hdr.len));
        }
        let room = bytes.len() - head;
        let len = hdr.len as usize;
        if len > room || len > PAYLOAD_CHUNK {
            return Err(RecordError::PayloadLength { len: hdr.len, room });
        }
        Ok(Self {
            sock_cookie: hdr.sock_cookie,
            outbound,
            offset: hdr.offset,
            data: bytes[head..head + len].into(),
            mark,
        })
    }
}

/// The process that owned the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub tgid: u32,
    /// Start time of the process, nanoseconds since boot (0 = unknown).
    pub start_boottime_ns: u64,
    pub cgroup_id: u64,
    /// Shared with the flow's `process`, not copied.
    pub comm: crate::flow::ArcStr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEvent {
    pub kind: EventKind,
    pub side: SocketSide,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub netns_cookie: u64,
    pub sock_cookie: u64,
    pub owner: Option<ProcessInfo>,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub start_ns: u64,
    pub established_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub error: u32,
    pub retransmits: u32,
    /// What payload capture missed for this socket, when the kernel knew
    /// at this record (not watched at CONNECT, bytes lost at CLOSE).
    pub capture: Option<UnknownReason>,
}

fn addr(family: u16, raw: [u8; 16], port: u16) -> SocketAddr {
    let ip = if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        let v6 = Ipv6Addr::from(raw);
        // A dual-stack socket talking IPv4 reports ::ffff:a.b.c.d.
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    };
    SocketAddr::new(ip, port)
}

/// Process names remembered per decoding thread ([`comm`]).
const COMM_SLOTS: usize = 64;

/// Process names made static ([`comm`]) at most, over the agent's life: at
/// most 16 bytes each, some 128 KiB in all, whatever the node runs.
const STATIC_COMMS: usize = 4096;

/// The process name in a record (the kernel's NUL-padded `comm`). A node's
/// connections come from a few processes, so each decoding thread keeps
/// the last names it decoded (a direct-mapped table of [`COMM_SLOTS`]), and
/// a record of a known process shares its name instead of allocating one.
/// The first [`STATIC_COMMS`] names decoded are made static (kept for the
/// agent's life): every flow holds its process's name, and sharing a static
/// one touches no reference count (an atomic add and subtract for each
/// copy otherwise, paid twice per flow).
fn comm(raw: &[u8; 16]) -> crate::flow::ArcStr {
    static MADE_STATIC: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    use std::cell::RefCell;
    use std::hash::BuildHasher;
    type Slots = [Option<([u8; 16], crate::flow::ArcStr)>; COMM_SLOTS];
    thread_local! {
        static RECENT: RefCell<Slots> = const { RefCell::new([const { None }; COMM_SLOTS]) };
    }
    let decode = || {
        let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
        let name = crate::flow::ArcStr::from(String::from_utf8_lossy(&raw[..end]).as_ref());
        crate::flow::make_static(&name, &MADE_STATIC, STATIC_COMMS);
        name
    };
    let slot = foldhash::fast::FixedState::default().hash_one(raw) as usize % COMM_SLOTS;
    RECENT
        .try_with(|recent| {
            let mut recent = recent.borrow_mut();
            match &recent[slot] {
                Some((known, name)) if known == raw => name.clone(),
                _ => {
                    let name = decode();
                    recent[slot] = Some((*raw, name.clone()));
                    name
                }
            }
        })
        // The thread is exiting: no table any more.
        .unwrap_or_else(|_| decode())
}

impl KernelEvent {
    /// Decodes one ring-buffer item.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RecordError> {
        let expected = std::mem::size_of::<FlowRecord>();
        if bytes.len() < expected {
            return Err(RecordError::Size {
                got: bytes.len(),
                expected,
            });
        }
        // SAFETY: length checked; FlowRecord is plain data valid for any bit
        // pattern; read_unaligned because ring-buffer items are 8-aligned
        // only by convention.
        let rec = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowRecord>()) };
        Self::from_record(&rec)
    }

    pub fn from_record(rec: &FlowRecord) -> Result<Self, RecordError> {
        let kind = match RecordKind::from_u8(rec.kind) {
            Some(RecordKind::Connect) => EventKind::Connect,
            Some(RecordKind::Close) => EventKind::Close,
            Some(RecordKind::Failed) => EventKind::Failed,
            Some(RecordKind::Payload) | None => return Err(RecordError::Kind(rec.kind)),
        };
        let side = match rec.side {
            1 => SocketSide::Active,
            2 => SocketSide::Passive,
            s => return Err(RecordError::Side(s)),
        };
        let family = u16::from(rec.family);
        if family != AF_INET && family != AF_INET6 {
            return Err(RecordError::Family(rec.family));
        }
        let capture = match rec.capture {
            0 => None,
            CAPTURE_NOT_WATCHED => Some(UnknownReason::NotWatched),
            CAPTURE_LOST => Some(UnknownReason::PayloadLost),
            c => return Err(RecordError::Capture(c)),
        };
        let owner = (rec.owner_known == 1).then(|| ProcessInfo {
            tgid: rec.owner.tgid,
            start_boottime_ns: rec.owner.start_boottime_ns,
            cgroup_id: rec.owner.cgroup_id,
            comm: comm(&rec.owner.comm),
        });
        Ok(Self {
            kind,
            side,
            local: addr(family, rec.local_addr, rec.local_port),
            remote: addr(family, rec.remote_addr, rec.remote_port),
            netns_cookie: rec.netns_cookie,
            sock_cookie: rec.sock_cookie,
            owner,
            ts_ns: rec.ts_ns,
            start_ns: rec.start_ns,
            established_ns: rec.established_ns,
            // The kernel's counters run in sequence space, where SYN and FIN
            // take one each; report payload bytes.
            bytes_sent: rec
                .bytes_sent
                .saturating_sub(u64::from(rec.seq_flags & SEQ_SYN_ACKED != 0))
                .saturating_sub(u64::from(rec.seq_flags & SEQ_FIN_ACKED != 0)),
            bytes_received: rec
                .bytes_received
                .saturating_sub(u64::from(rec.seq_flags & SEQ_FIN_RECEIVED != 0)),
            error: rec.error,
            retransmits: rec.retransmits,
            capture,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flowaudit_common::Owner;

    pub(crate) fn sample() -> FlowRecord {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"node");
        let mut local = [0u8; 16];
        local[..4].copy_from_slice(&[10, 244, 1, 5]);
        let mut remote = [0u8; 16];
        remote[..4].copy_from_slice(&[10, 244, 1, 9]);
        FlowRecord {
            kind: RecordKind::Close as u8,
            side: SocketSide::Active as u8,
            family: AF_INET as u8,
            owner_known: 1,
            old_state: 1,
            seq_flags: 0,
            capture: 0,
            _pad: 0,
            local_port: 43122,
            remote_port: 5432,
            error: 0,
            local_addr: local,
            remote_addr: remote,
            netns_cookie: 7,
            sock_cookie: 99,
            owner: Owner {
                tgid: 1234,
                _pad: 0,
                start_boottime_ns: 5,
                cgroup_id: 42,
                comm,
            },
            ts_ns: 3_000_000,
            start_ns: 1_000_000,
            established_ns: 1_500_000,
            bytes_sent: 10,
            bytes_received: 20,
            retransmits: 0,
            _pad2: 0,
        }
    }

    fn as_bytes(r: &FlowRecord) -> Vec<u8> {
        let p = (r as *const FlowRecord).cast::<u8>();
        // SAFETY: pointer and length are those of a plain-old-data value that outlives the slice.
        unsafe { std::slice::from_raw_parts(p, std::mem::size_of::<FlowRecord>()) }.to_vec()
    }

    #[test]
    fn decodes_an_ipv4_record() {
        let ev = KernelEvent::from_bytes(&as_bytes(&sample())).unwrap();
        assert_eq!(ev.local, "10.244.1.5:43122".parse().unwrap());
        assert_eq!(ev.remote, "10.244.1.9:5432".parse().unwrap());
        let owner = ev.owner.unwrap();
        assert_eq!(
            (owner.tgid, owner.cgroup_id, owner.comm.as_str()),
            (1234, 42, "node")
        );
        assert_eq!((ev.bytes_sent, ev.bytes_received), (10, 20));
    }

    #[test]
    fn a_known_process_name_is_shared_and_every_name_decodes_as_before() {
        let name = |text: &[u8]| {
            let mut raw = [0u8; 16];
            raw[..text.len()].copy_from_slice(text);
            raw
        };
        let (a, b) = (comm(&name(b"node")), comm(&name(b"node")));
        assert!(
            crate::flow::ArcStr::ptr_eq(&a, &b),
            "the second record of a process shares its name"
        );
        // Far from the bound in this process: made static, so flows share
        // it without a reference count.
        assert!(crate::flow::ArcStr::is_static(&a), "{a} is not static");
        // More names than slots: each still decodes to itself (a slot taken
        // by another name is replaced, never returned for the wrong one).
        let names: Vec<[u8; 16]> = (0..4 * COMM_SLOTS)
            .map(|i| name(format!("worker-{i}").as_bytes()))
            .collect();
        for _ in 0..2 {
            for (i, raw) in names.iter().enumerate() {
                assert_eq!(comm(raw).as_str(), format!("worker-{i}"));
            }
        }
        // No NUL (a 16-byte name), and bytes that are not UTF-8.
        assert_eq!(comm(b"abcdefghijklmnop").as_str(), "abcdefghijklmnop");
        assert_eq!(comm(&name(b"x\xffy")).as_str(), "x\u{fffd}y");
    }

    #[test]
    fn folds_ipv4_mapped_ipv6_and_keeps_real_ipv6() {
        let mut r = sample();
        r.family = AF_INET6 as u8;
        r.local_addr = Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets();
        r.remote_addr = "fd00:10:244:1::9".parse::<Ipv6Addr>().unwrap().octets();
        let ev = KernelEvent::from_record(&r).unwrap();
        assert_eq!(ev.local.ip(), "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            ev.remote.ip(),
            "fd00:10:244:1::9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn byte_counts_leave_out_syn_and_fin() {
        let mut r = sample();
        r.bytes_sent = 7; // "hello" + SYN + FIN
        r.bytes_received = 51; // 50 bytes + FIN
        r.seq_flags = SEQ_SYN_ACKED | SEQ_FIN_ACKED | SEQ_FIN_RECEIVED;
        let ev = KernelEvent::from_record(&r).unwrap();
        assert_eq!((ev.bytes_sent, ev.bytes_received), (5, 50));
        // Passive side: no SYN of ours in bytes_acked; FIN never acked (reset).
        r.bytes_sent = 50;
        r.seq_flags = SEQ_FIN_RECEIVED;
        let ev = KernelEvent::from_record(&r).unwrap();
        assert_eq!((ev.bytes_sent, ev.bytes_received), (50, 50));
        // Counters never underflow on odd input.
        r.bytes_sent = 0;
        r.bytes_received = 0;
        r.seq_flags = 0xff;
        let ev = KernelEvent::from_record(&r).unwrap();
        assert_eq!((ev.bytes_sent, ev.bytes_received), (0, 0));
    }

    #[test]
    fn decodes_payload_records_and_rejects_bad_ones() {
        let hdr = PayloadHeader {
            kind: RecordKind::Payload as u8,
            dir: DIR_OUT,
            len: 3,
            offset: 1024,
            sock_cookie: 77,
            ..Default::default()
        };
        // SAFETY: pointer and length are those of a plain-old-data value that outlives the slice.
        let mut bytes = unsafe {
            std::slice::from_raw_parts(
                (&hdr as *const PayloadHeader).cast::<u8>(),
                std::mem::size_of::<PayloadHeader>(),
            )
        }
        .to_vec();
        bytes.extend_from_slice(&[0x16, 3, 1, 0, 0]);
        let KernelRecord::Payload(p) = KernelRecord::from_bytes(&bytes).unwrap() else {
            panic!("a payload record decoded as a flow record");
        };
        assert_eq!(
            p,
            PayloadChunk {
                sock_cookie: 77,
                outbound: true,
                offset: 1024,
                data: [0x16, 3, 1][..].into(),
                mark: None,
            }
        );
        // Claims more bytes than it carries.
        bytes[4] = 9;
        assert_eq!(
            KernelRecord::from_bytes(&bytes),
            Err(RecordError::PayloadLength { len: 9, room: 5 })
        );
        bytes[4] = 3;
        bytes[1] = 5;
        assert_eq!(
            KernelRecord::from_bytes(&bytes),
            Err(RecordError::Direction(5))
        );
        assert!(matches!(
            KernelRecord::from_bytes(&bytes[..10]),
            Err(RecordError::Size { .. })
        ));
        // A flow record still decodes as one.
        assert!(matches!(
            KernelRecord::from_bytes(&as_bytes(&sample())),
            Ok(KernelRecord::Flow(_))
        ));
    }

    #[test]
    fn chunk_bytes_keep_a_plaintext_opening_in_place() {
        let peek: Vec<u8> = (0..INLINE_CHUNK as u8).collect();
        let c = ChunkBytes::from(&peek[..]);
        assert!(matches!(c, ChunkBytes::Inline { .. }), "{c:?}");
        assert_eq!(&*c, &peek[..]);
        let hello: Vec<u8> = (0..=INLINE_CHUNK as u8).collect();
        let h = ChunkBytes::from(&hello[..]);
        assert!(matches!(h, ChunkBytes::Heap(_)), "{h:?}");
        assert_eq!(&*h, &hello[..]);
        assert_eq!(&*ChunkBytes::from(&[][..]), &[] as &[u8]);
        // Equal by their bytes, whichever way they are kept.
        assert_eq!(ChunkBytes::Heap(peek.clone().into()), c);
        assert_ne!(ChunkBytes::from(&peek[..3]), ChunkBytes::from(&peek[..4]));
        assert_eq!(format!("{:?}", ChunkBytes::from(&[1u8, 2][..])), "[1, 2]");
        // A payload record is no larger than a flow record for it.
        assert!(std::mem::size_of::<PayloadChunk>() <= std::mem::size_of::<KernelEvent>());
    }

    fn payload_bytes(hdr: &PayloadHeader) -> Vec<u8> {
        // SAFETY: PayloadHeader is plain data without implicit padding.
        unsafe {
            std::slice::from_raw_parts(
                (hdr as *const PayloadHeader).cast::<u8>(),
                std::mem::size_of::<PayloadHeader>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_capture_marks_and_capture_bits() {
        let mut hdr = PayloadHeader {
            kind: RecordKind::Payload as u8,
            dir: DIR_IN,
            offset: 300,
            sock_cookie: 9,
            ..Default::default()
        };
        for (mark, reason) in [
            (MARK_GAP, UnknownReason::StreamGap),
            (MARK_LOST, UnknownReason::PayloadLost),
            (MARK_UNOBSERVABLE, UnknownReason::NotObservable),
        ] {
            hdr.mark = mark;
            let KernelRecord::Payload(p) = KernelRecord::from_bytes(&payload_bytes(&hdr)).unwrap()
            else {
                panic!("a mark record decoded as a flow record");
            };
            assert_eq!((p.mark, p.offset, p.data.len()), (Some(reason), 300, 0));
        }
        hdr.mark = 9;
        assert_eq!(
            KernelRecord::from_bytes(&payload_bytes(&hdr)),
            Err(RecordError::Mark(9))
        );
        // A mark never carries bytes.
        hdr.mark = MARK_GAP;
        hdr.len = 1;
        let mut bytes = payload_bytes(&hdr);
        bytes.push(0x16);
        assert_eq!(
            KernelRecord::from_bytes(&bytes),
            Err(RecordError::MarkLength(1))
        );

        let mut r = sample();
        assert_eq!(KernelEvent::from_record(&r).unwrap().capture, None);
        r.capture = CAPTURE_NOT_WATCHED;
        assert_eq!(
            KernelEvent::from_record(&r).unwrap().capture,
            Some(UnknownReason::NotWatched)
        );
        r.capture = CAPTURE_LOST;
        assert_eq!(
            KernelEvent::from_record(&r).unwrap().capture,
            Some(UnknownReason::PayloadLost)
        );
        r.capture = 0x80;
        assert_eq!(
            KernelEvent::from_record(&r),
            Err(RecordError::Capture(0x80))
        );
    }

    #[test]
    fn rejects_malformed_records() {
        let bytes = as_bytes(&sample());
        assert!(matches!(
            KernelEvent::from_bytes(&bytes[..10]),
            Err(RecordError::Size { .. })
        ));
        let mut r = sample();
        r.kind = 0;
        assert_eq!(KernelEvent::from_record(&r), Err(RecordError::Kind(0)));
        let mut r = sample();
        r.family = 3;
        assert_eq!(KernelEvent::from_record(&r), Err(RecordError::Family(3)));
        let mut r = sample();
        r.side = 7;
        assert_eq!(KernelEvent::from_record(&r), Err(RecordError::Side(7)));
        let mut r = sample();
        r.owner_known = 0;
        assert_eq!(KernelEvent::from_record(&r).unwrap().owner, None);
    }
}
