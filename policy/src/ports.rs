//! Destination port sets (single ports and inclusive ranges) and a compiled port map
//! that answers "which rules cover port N" with one binary search.

/// Inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

/// A set of ports; `None` ranges means every port.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortSet {
    pub ranges: Option<Vec<PortRange>>,
}

impl PortSet {
    pub const ANY: PortSet = PortSet { ranges: None };

    pub fn of(ranges: Vec<PortRange>) -> Self {
        PortSet {
            ranges: Some(ranges),
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        match &self.ranges {
            None => true,
            Some(r) => r.iter().any(|r| r.lo <= port && port <= r.hi),
        }
    }

    /// Ranges to index; `0..=65535` for "any port".
    pub fn as_ranges(&self) -> Vec<PortRange> {
        match &self.ranges {
            None => vec![PortRange {
                lo: 0,
                hi: u16::MAX,
            }],
            Some(r) => r.clone(),
        }
    }
}

impl std::fmt::Display for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.ranges {
            None => f.write_str("any port"),
            Some(r) => {
                let parts: Vec<String> = r
                    .iter()
                    .map(|r| {
                        if r.lo == r.hi {
                            r.lo.to_string()
                        } else {
                            format!("{}-{}", r.lo, r.hi)
                        }
                    })
                    .collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

/// Parses `8000` or `8000-8100`; the error says what is wrong.
pub fn parse_port_spec(text: &str) -> Result<PortRange, String> {
    let text = text.trim();
    let parse_one = |s: &str| -> Result<u16, String> {
        let n: u32 = s.trim().parse().map_err(|_| {
            format!("`{text}` is not a port or port range (expected e.g. 8000 or \"8000-8100\")")
        })?;
        if n == 0 || n > 65535 {
            return Err(format!("port {n} is out of range 1-65535"));
        }
        Ok(n as u16)
    };
    match text.split_once('-') {
        Some((a, b)) => {
            let (lo, hi) = (parse_one(a)?, parse_one(b)?);
            if lo > hi {
                return Err(format!(
                    "bad port range `{text}`: start {lo} is greater than end {hi}"
                ));
            }
            Ok(PortRange { lo, hi })
        }
        None => {
            let p = parse_one(text)?;
            Ok(PortRange { lo: p, hi: p })
        }
    }
}

/// Maps ports to the entries covering them: the port space is cut into elementary
/// segments at every range boundary, each holding the entries that cover it, so a
/// lookup is a binary search whatever the number of ranges.
#[derive(Debug, Clone, Default)]
pub struct PortMap<T> {
    /// Pending entries until `build`.
    pending: Vec<(PortRange, T)>,
    /// Segment start ports, ascending; segment i covers starts[i]..starts[i+1].
    starts: Vec<u32>,
    values: Vec<Vec<T>>,
}

impl<T: Clone + Ord> PortMap<T> {
    #[cfg(test)]
    pub fn new() -> Self {
        PortMap {
            pending: Vec::new(),
            starts: Vec::new(),
            values: Vec::new(),
        }
    }

    pub fn insert(&mut self, ports: &PortSet, value: T) {
        for r in ports.as_ranges() {
            self.pending.push((r, value.clone()));
        }
    }

    pub fn build(&mut self) {
        let mut bounds: Vec<u32> = Vec::with_capacity(self.pending.len() * 2 + 1);
        bounds.push(0);
        for (r, _) in &self.pending {
            bounds.push(r.lo as u32);
            bounds.push(r.hi as u32 + 1);
        }
        bounds.sort_unstable();
        bounds.dedup();
        bounds.retain(|b| *b <= u16::MAX as u32);
        let mut values: Vec<Vec<T>> = vec![Vec::new(); bounds.len()];
        for (r, v) in &self.pending {
            // Segments are contiguous, so the covered ones form one slice.
            let first = bounds.partition_point(|b| *b < r.lo as u32);
            let last = bounds.partition_point(|b| *b <= r.hi as u32);
            for slot in &mut values[first..last] {
                slot.push(v.clone());
            }
        }
        for v in &mut values {
            v.sort();
            v.dedup();
        }
        self.starts = bounds;
        self.values = values;
        self.pending = Vec::new();
    }

    pub fn get(&self, port: u16) -> &[T] {
        let i = self.starts.partition_point(|s| *s <= port as u32);
        match i.checked_sub(1).and_then(|i| self.values.get(i)) {
            Some(v) => v,
            None => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_specs() {
        assert_eq!(
            parse_port_spec("8000"),
            Ok(PortRange { lo: 8000, hi: 8000 })
        );
        assert_eq!(
            parse_port_spec("8000-8100"),
            Ok(PortRange { lo: 8000, hi: 8100 })
        );
        assert!(
            parse_port_spec("8100-8000")
                .unwrap_err()
                .contains("greater than")
        );
        assert!(parse_port_spec("0").unwrap_err().contains("out of range"));
        assert!(
            parse_port_spec("70000")
                .unwrap_err()
                .contains("out of range")
        );
        assert!(parse_port_spec("http").unwrap_err().contains("not a port"));
    }

    #[test]
    fn port_map_segments() {
        let mut m = PortMap::new();
        m.insert(&PortSet::of(vec![PortRange { lo: 8000, hi: 8100 }]), 1u32);
        m.insert(&PortSet::of(vec![PortRange { lo: 8050, hi: 8050 }]), 2);
        m.insert(&PortSet::ANY, 3);
        m.build();
        assert_eq!(m.get(7999), &[3]);
        assert_eq!(m.get(8000), &[1, 3]);
        assert_eq!(m.get(8050), &[1, 2, 3]);
        assert_eq!(m.get(8100), &[1, 3]);
        assert_eq!(m.get(8101), &[3]);
        assert_eq!(m.get(65535), &[3]);
        assert_eq!(m.get(0), &[3]);
    }
}
