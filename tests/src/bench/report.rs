//! The results contract shared by every measurement program of `cargo xtask
//! bench`: one line `bench-result: {json}` on stdout per result, the JSON an
//! object with `id`, `name`, `value`, `unit`, `target`, `met` and `detail`.
//! A measurement that could not run has `value` and `met` null and says why
//! in `detail`.

use std::io::Write;

use serde::Serialize;

/// One measured (or not measured) result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub id: String,
    pub name: String,
    pub value: Option<f64>,
    pub unit: String,
    pub target: Option<String>,
    pub met: Option<bool>,
    pub detail: String,
}

impl BenchResult {
    pub fn new(id: &str, name: &str, value: f64, unit: &str) -> Self {
        BenchResult {
            id: id.into(),
            name: name.into(),
            value: Some(value),
            unit: unit.into(),
            target: None,
            met: None,
            detail: String::new(),
        }
    }

    /// A measurement that could not be made on this machine, and why.
    pub fn not_run(id: &str, name: &str, unit: &str, why: impl Into<String>) -> Self {
        BenchResult {
            id: id.into(),
            name: name.into(),
            value: None,
            unit: unit.into(),
            target: None,
            met: None,
            detail: why.into(),
        }
    }

    pub fn target(mut self, text: &str, met: bool) -> Self {
        self.target = Some(text.into());
        self.met = Some(met);
        self
    }

    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = d.into();
        self
    }

    /// Prints the `bench-result:` line (flushed at once: xtask reads it live)
    /// and, on stderr, a line for the person watching.
    pub fn emit(&self) {
        let json = serde_json::to_string(self).expect("a BenchResult always serializes");
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "bench-result: {json}");
        let _ = out.flush();
        let value = self
            .value
            .map_or_else(|| "not run".to_owned(), |v| format!("{v:.2} {}", self.unit));
        let verdict = match self.met {
            Some(true) => "  [target met]".to_owned(),
            Some(false) => format!(
                "  [TARGET MISSED: {}]",
                self.target.as_deref().unwrap_or("")
            ),
            None => String::new(),
        };
        eprintln!("bench: {}: {value}{verdict}", self.name);
        if !self.detail.is_empty() {
            eprintln!("bench:     {}", self.detail);
        }
    }
}

/// Median of a non-empty slice (the mean of the middle two for even length).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile (p in 0..=1) of a sorted slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentile() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
    }

    #[test]
    fn not_run_serializes_nulls() {
        let r = BenchResult::not_run("x", "X", "%", "could not run: no tracefs");
        let j = serde_json::to_value(&r).unwrap();
        assert!(j["value"].is_null() && j["met"].is_null() && j["target"].is_null());
    }
}
