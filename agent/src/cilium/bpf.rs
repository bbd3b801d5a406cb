//! The three bpf(2) commands a read-only reader of another program's pinned
//! maps needs: open a pin read-only, ask the map what it is, look a key up.
//! aya's `MapData::from_pin` opens pins read-write, which a read-only
//! hostPath mount refuses (EROFS) and which this reader must never need.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `file_flags` of BPF_OBJ_GET: a read-only map fd (uapi `BPF_F_RDONLY`).
const BPF_F_RDONLY: u32 = 1 << 3;

/// `union bpf_attr` is larger than any command here needs; the kernel
/// requires the unused tail to be zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed bpf_attr-sized buffer laid out for `cmd`;
    // every pointer in it refers to memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// What a map says it is (`struct bpf_map_info`, its stable head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapInfo {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

/// A map fd opened read-only from its pin.
#[derive(Debug)]
pub struct PinnedMap {
    fd: OwnedFd,
    pub info: MapInfo,
}

impl PinnedMap {
    pub fn open(path: &Path) -> std::io::Result<PinnedMap> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let mut attr = Attr::new();
        attr.put_u64(0, c.as_ptr() as u64);
        attr.put_u32(12, BPF_F_RDONLY);
        let fd = bpf(BPF_OBJ_GET, &mut attr)? as RawFd;
        // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let info = map_info(&fd)?;
        Ok(PinnedMap { fd, info })
    }

    /// The value under `key` (exactly `key_size` bytes) into `value`
    /// (exactly `value_size` bytes); false when the key is absent.
    pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> std::io::Result<bool> {
        if key.len() != self.info.key_size as usize || value.len() != self.info.value_size as usize
        {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        let mut attr = Attr::new();
        attr.put_u32(0, std::os::fd::AsRawFd::as_raw_fd(&self.fd) as u32);
        attr.put_u64(8, key.as_ptr() as u64);
        attr.put_u64(16, value.as_mut_ptr() as u64);
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn map_info(fd: &OwnedFd) -> std::io::Result<MapInfo> {
    // struct bpf_map_info starts: type, id, key_size, value_size,
    // max_entries, map_flags (u32 each); the kernel fills what fits.
    let mut info = [0u32; 6];
    let mut attr = Attr::new();
    attr.put_u32(0, std::os::fd::AsRawFd::as_raw_fd(fd) as u32);
    attr.put_u32(4, std::mem::size_of_val(&info) as u32);
    attr.put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(MapInfo {
        map_type: info[0],
        key_size: info[2],
        value_size: info[3],
        max_entries: info[4],
        map_flags: info[5],
    })
}
