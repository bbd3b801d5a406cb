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
    if let Some(t) = flowaudit::flow::FlowTime::parse(text) {
        // Years 0 to 9999 are written in RFC 3339's own form and read back;
        // an offset can push a time just out of them (written, not readable).
        let written = t.to_string();
        if written.len() == 30 {
            let again = flowaudit::flow::FlowTime::parse(&written);
            assert_eq!(again, Some(t), "{text:?} written as {written} reads back");
        }
    }
    match parse_since(text) {
        Ok(t) => {
            let _ = timestamp_to_rfc3339(&t);
        }
        Err(e) => assert!(e.contains(text), "the error names the input: {e}"),
    }
});
