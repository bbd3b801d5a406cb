#![no_main]
//! Any text as `--from-label`/`--to-label` and any labels: parsing must
//! return a selector or an error naming it, never panic, and matching must
//! agree with negation (`k` vs `!k`) and with set membership.

use std::collections::BTreeMap;

use flowaudit::export::filter::LabelSelector;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (String, Vec<(String, String)>)| {
    let (text, pairs) = input;
    let labels: BTreeMap<String, String> = pairs.into_iter().collect();
    match LabelSelector::parse(&text) {
        Ok(sel) => {
            let _ = sel.matches(&labels);
            let _ = sel.matches(&BTreeMap::new());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    // Plain Kubernetes label keys and values, so that the texts built below
    // are one requirement each.
    let plain = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    for (k, v) in labels.iter().filter(|(k, v)| plain(k) && plain(v)) {
        let (Ok(exists), Ok(absent)) = (
            LabelSelector::parse(k),
            LabelSelector::parse(&format!("!{k}")),
        ) else {
            continue;
        };
        assert_ne!(exists.matches(&labels), absent.matches(&labels), "{k:?}");
        if let Ok(eq) = LabelSelector::parse(&format!("{k}={v}")) {
            let within = LabelSelector::parse(&format!("{k} in ({v})"));
            if let Ok(within) = within {
                assert_eq!(eq.matches(&labels), within.matches(&labels), "{k:?}={v:?}");
            }
        }
    }
});
