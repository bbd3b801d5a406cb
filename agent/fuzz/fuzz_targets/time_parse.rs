#![no_main]
//! Any text as `observe --since` and as a flow's RFC 3339 time: parsing
//! must return a time or an error, never panic; a parsed time must render.

use flowaudit::cli::observe::parse_since;
use flowaudit::export::convert::{parse_rfc3339, timestamp_to_rfc3339};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(t) = parse_rfc3339(text) {
        assert!((0..1_000_000_000).contains(&t.nanos), "{text:?}: {t:?}");
        let _ = timestamp_to_rfc3339(&t);
    }
    match parse_since(text) {
        Ok(t) => {
            let _ = timestamp_to_rfc3339(&t);
        }
        Err(e) => assert!(e.contains(text), "the error names the input: {e}"),
    }
});
