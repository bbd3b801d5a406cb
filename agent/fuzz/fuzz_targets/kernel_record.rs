#![no_main]
//! Any bytes as one ring-buffer item: decoding must return a record or an
//! error, never panic, and a decoded flow record must become a flow event.

use std::sync::LazyLock;

use flowaudit::capture::Clock;
use flowaudit::capture::record::KernelRecord;
use flowaudit::flow::{ArcStr, FlowEvent};
use libfuzzer_sys::fuzz_target;

static CLOCK: LazyLock<Clock> = LazyLock::new(Clock::now);
static NODE: LazyLock<ArcStr> = LazyLock::new(|| ArcStr::from("fuzz-node"));

fuzz_target!(|data: &[u8]| {
    match KernelRecord::from_bytes(data) {
        Ok(KernelRecord::Flow(ev)) => {
            let flow = FlowEvent::from_kernel(&ev, &NODE, &CLOCK);
            let _ = flow.make_summary();
        }
        Ok(KernelRecord::Payload(p)) => assert!(p.data.len() <= data.len()),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
