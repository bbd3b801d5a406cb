#![no_main]
//! Any bytes as the listener iterator's output: decoding must never panic,
//! keep at most one entry per key, and account for every whole record.

use std::path::Path;

use flowaudit::capture::listeners::{NetnsKey, decode_seen};
use flowaudit_common::ListenerSeen;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let key = if mode & 1 == 0 {
        NetnsKey::Cookie
    } else {
        NetnsKey::Inode
    };
    let r = decode_seen(bytes, key, Path::new("/nonexistent-cgroup-root"));
    let records = bytes.len() / size_of::<ListenerSeen>();
    assert!(r.entries.len() + r.unnamed as usize <= records);
    let mut keys: Vec<_> = r.entries.iter().map(|(k, _)| *k).collect();
    keys.sort_by_key(|k| (k.netns_cookie, k.port, k.family));
    keys.dedup_by_key(|k| (k.netns_cookie, k.port, k.family));
    assert_eq!(keys.len(), r.entries.len(), "one entry per listener key");
});
