//! `flowaudit-bench report`: gathers what `cargo xtask bench` ran. Reads the
//! `bench-result: {json}` lines each part printed (kept by xtask in
//! `<dir>/<part>.out`), criterion's estimates for the policy benchmark, and
//! the parts' exit states; turns a part that could not run into "not run"
//! rows with the reason; prints one table (and every target missed), writes
//! `<dir>/results.json`, and with `--write-docs` replaces the table in
//! docs/benchmarks.md between `<!-- bench:begin -->` and `<!-- bench:end -->`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

pub const BEGIN: &str = "<!-- bench:begin -->";
pub const END: &str = "<!-- bench:end -->";

#[derive(clap::Args)]
pub struct ReportArgs {
    /// Where xtask kept each part's stdout (`<part>.out`); results.json goes here too.
    #[arg(long)]
    dir: PathBuf,
    /// Criterion's output directory (target/criterion).
    #[arg(long)]
    criterion: Option<PathBuf>,
    /// Unix time the bench started: older criterion estimates are stale.
    #[arg(long, default_value_t = 0)]
    since: u64,
    /// `part=ok|failed` for each part that ran (policy, pipeline, stream, relay, node).
    #[arg(long = "part")]
    parts: Vec<String>,
    /// Seconds the whole bench took so far.
    #[arg(long, default_value_t = 0.0)]
    seconds: f64,
    /// /proc/loadavg before the bench (others' work on the machine).
    #[arg(long, default_value = "")]
    load_before: String,
    /// Rewrite the results table of this file (docs/benchmarks.md).
    #[arg(long)]
    write_docs: Option<PathBuf>,
}

fn result(id: &str, name: &str, value: Option<f64>, unit: &str) -> Value {
    json!({"id": id, "name": name, "value": value, "unit": unit,
           "target": null, "met": null, "detail": ""})
}

fn not_run(id: &str, name: &str, why: impl Into<String>) -> Value {
    let mut r = result(id, name, None, "");
    r["detail"] = Value::String(why.into());
    r
}

/// The `bench-result:` objects in a program's output.
pub fn parse_results(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("bench-result:"))
        .filter_map(|j| serde_json::from_str::<Value>(j.trim()).ok())
        .filter(|v| v.get("id").is_some_and(Value::is_string))
        .collect()
}

/// How many tests passed, from libtest's "test result:" lines.
pub fn tests_passed(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("test result:"))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = w.iter().position(|x| x.starts_with("passed"))?;
            w.get(at.checked_sub(1)?)?.parse::<u64>().ok()
        })
        .sum()
}

/// `stream throughput: N subscriber(s): X flows/s each, Y flows/s delivered
/// in total, L lost`: the stream_throughput test's own words, read while it
/// prints no `bench-result:` lines.
pub fn legacy_stream_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("stream throughput:"))
        .filter_map(|l| {
            let nums: Vec<f64> = l
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .filter_map(|w| w.parse().ok())
                .collect();
            let [subs, each, total, lost] = nums.get(..4)?.try_into().ok()?;
            let mut r = result(
                &format!("stream_throughput_{subs}"),
                &format!("gRPC stream delivery, {subs} subscriber(s), per subscriber"),
                Some(each),
                "flows/s",
            );
            r["detail"] = json!(format!(
                "{total:.0} flows/s delivered in total, {lost} lost; the agent's flow hub to real \
                 Unix-socket subscribers (agent test stream_throughput)"
            ));
            Some(r)
        })
        .collect()
}

/// Item 5: criterion's `evaluate/{allowed,no_match}/{10,1000,10000}`.
fn policy(criterion: &Path, since: u64) -> Vec<Value> {
    let dir = criterion.join("evaluate");
    let since = SystemTime::UNIX_EPOCH + Duration::from_secs(since);
    let estimate = |kind: &str, n: u64| -> Option<f64> {
        let p = dir
            .join(kind)
            .join(n.to_string())
            .join("new/estimates.json");
        let fresh = std::fs::metadata(&p)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= since);
        if !fresh {
            return None;
        }
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).ok()?).ok()?;
        v["mean"]["point_estimate"].as_f64()
    };
    let mut out = Vec::new();
    for kind in ["allowed", "no_match"] {
        let base = estimate(kind, 10);
        for n in [10u64, 1_000, 10_000] {
            let id = format!("policy_eval_{kind}_{n}");
            let name = format!(
                "Policy evaluation, {} flow, {n} rules",
                if kind == "allowed" {
                    "allowed"
                } else {
                    "unmatched"
                }
            );
            let Some(ns) = estimate(kind, n) else {
                out.push(not_run(
                    &id,
                    &name,
                    format!(
                        "not run: no criterion estimate for evaluate/{kind}/{n} from this run under {}",
                        dir.display()
                    ),
                ));
                continue;
            };
            let mut r = result(&id, &name, Some(ns), "ns/flow");
            r["detail"] = json!(format!(
                "criterion evaluate/{kind}/{n}, mean (1 s warm-up, 3 s measurement)"
            ));
            if let (true, Some(b)) = (n > 10, base) {
                r["target"] = json!("flat: at most 2x the 10-rule cost");
                r["met"] = json!(ns <= 2.0 * b);
                r["detail"] = json!(format!(
                    "criterion evaluate/{kind}/{n}, mean (1 s warm-up, 3 s measurement); \
                     {:.2}x the 10-rule cost ({b:.1} ns)",
                    ns / b
                ));
            }
            out.push(r);
        }
    }
    out
}

/// The first compiler error in a cargo run's stderr, with its place.
pub fn first_compile_error(stderr: &str) -> Option<String> {
    let mut lines = stderr.lines();
    let err = lines.find(|l| l.starts_with("error[") || l.starts_with("error:"))?;
    if err.starts_with("error: could not compile") {
        return Some(err.trim_start_matches("error: ").to_owned());
    }
    let at = lines
        .next()
        .and_then(|l| l.trim().strip_prefix("--> "))
        .map(|p| format!(" at {p}"))
        .unwrap_or_default();
    Some(format!("{}{at}", err.trim_start_matches("error: ")))
}

/// An `#[ignore]`d agent measurement test: its results, or why there are none.
fn agent_test(
    text: Option<&str>,
    stderr: Option<&str>,
    state: Option<&str>,
    test: &str,
    id: &str,
    name: &str,
) -> Vec<Value> {
    let cmd = format!("cargo test --release -p flowaudit {test} -- --ignored");
    let Some(text) = text else {
        return vec![not_run(id, name, format!("not run: no output of `{cmd}`"))];
    };
    let found = parse_results(text);
    if state != Some("ok") {
        let why = match stderr.and_then(first_compile_error) {
            Some(e) => format!("not run: the agent's tests do not compile in this tree: {e}"),
            None => format!("not run: `{cmd}` failed (see its output)"),
        };
        let mut v = vec![not_run(id, name, why)];
        v.extend(found);
        return v;
    }
    if tests_passed(text) == 0 {
        return vec![not_run(
            id,
            name,
            format!("not run: the agent crate has no `{test}` test in this tree"),
        )];
    }
    if found.is_empty() {
        let legacy = if test == "stream_throughput" {
            legacy_stream_lines(text)
        } else {
            Vec::new()
        };
        if legacy.is_empty() {
            return vec![not_run(
                id,
                name,
                format!("not run: `{test}` passed but printed no `bench-result:` line"),
            )];
        }
        return legacy;
    }
    found
}

/// The item number for a result id (the table's first column).
pub fn item(id: &str) -> &'static str {
    match id {
        i if i.starts_with("connection_rate") => "1",
        i if i.starts_with("bulk_throughput") => "2",
        i if i.starts_with("storm") => "3",
        i if i.starts_with("pipeline") => "4",
        i if i.starts_with("stream") => "4",
        i if i.starts_with("policy") => "5",
        i if i.starts_with("event_delay") => "6",
        i if i.starts_with("pinned") => "7",
        i if i.starts_with("relay") => "17",
        _ => "-",
    }
}

fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 { format!("-{out}") } else { out }
}

pub fn fmt_value(v: &Value) -> String {
    let Some(x) = v["value"].as_f64() else {
        return "not run".into();
    };
    let unit = v["unit"].as_str().unwrap_or("");
    let num = if x.abs() >= 10_000.0 {
        thousands(x)
    } else if x.abs() >= 100.0 && unit != "%" {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    };
    if unit.is_empty() {
        num
    } else {
        format!("{num} {unit}")
    }
}

pub fn status(v: &Value) -> &'static str {
    match (v["value"].is_null(), v["met"].as_bool()) {
        (true, _) => "not run",
        (_, Some(true)) => "met",
        (_, Some(false)) => "MISSED",
        (_, None) => "-",
    }
}

fn sorted(results: &[Value]) -> Vec<&Value> {
    let mut v: Vec<&Value> = results.iter().collect();
    v.sort_by_key(|r| item(r["id"].as_str().unwrap_or("")));
    v
}

fn print_table(results: &[Value]) {
    let rows: Vec<[String; 5]> = sorted(results)
        .into_iter()
        .map(|r| {
            [
                item(r["id"].as_str().unwrap_or("")).to_owned(),
                r["name"].as_str().unwrap_or("").to_owned(),
                fmt_value(r),
                r["target"].as_str().unwrap_or("-").to_owned(),
                status(r).to_owned(),
            ]
        })
        .collect();
    let head = ["#", "measurement", "result", "target", "status"].map(String::from);
    let mut w = [0usize; 5];
    for r in rows.iter().chain([&head]) {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |c: &[String; 5]| {
        let cells: Vec<String> = c
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<width$}", width = w[i]))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    };
    println!();
    line(&head);
    line(&w.map(|n| "-".repeat(n)));
    for r in &rows {
        line(r);
    }
    println!();
    for r in sorted(results) {
        let d = r["detail"].as_str().unwrap_or("");
        if !d.is_empty() {
            println!("  {}: {d}", r["id"].as_str().unwrap_or(""));
        }
    }
    println!();
    let missed: Vec<String> = results
        .iter()
        .filter(|r| status(r) == "MISSED")
        .map(|r| {
            format!(
                "{}: {} (target: {})",
                r["name"].as_str().unwrap_or(""),
                fmt_value(r),
                r["target"].as_str().unwrap_or("")
            )
        })
        .collect();
    if missed.is_empty() {
        println!("bench: every stated target that was measured was met");
    } else {
        println!("bench: targets missed:");
        for m in missed {
            println!("  - {m}");
        }
    }
    let not_run = results.iter().filter(|r| status(r) == "not run").count();
    if not_run > 0 {
        println!("bench: {not_run} measurement(s) not run (reasons above)");
    }
}

fn machine(load_before: &str) -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "cpu_model": cpu,
        "memory_gib": mem_gib.round(),
        "load_before": load_before,
    })
}

pub fn markdown(report: &Value) -> String {
    let results = report["results"].as_array().cloned().unwrap_or_default();
    let m = &report["machine"];
    let mut s = format!(
        "Run of {} on commit `{}`: {} cores ({}), {} GiB, kernel {}; load average before the run: {}; \
         the whole `cargo xtask bench` took {:.0} s.\n\n",
        report["finished"].as_str().unwrap_or(""),
        report["commit"].as_str().unwrap_or(""),
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or(""),
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or(""),
        m["load_before"].as_str().unwrap_or(""),
        report["seconds"].as_f64().unwrap_or(0.0)
    );
    s.push_str("| # | Measurement | Result | Target | Status |\n|---|---|---|---|---|\n");
    for r in sorted(&results) {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            item(r["id"].as_str().unwrap_or("")),
            r["name"].as_str().unwrap_or(""),
            fmt_value(r),
            r["target"].as_str().unwrap_or("-"),
            status(r)
        ));
    }
    s.push_str("\nDetails, as the run printed them:\n\n");
    for r in sorted(&results) {
        let d = r["detail"].as_str().unwrap_or("");
        if !d.is_empty() {
            s.push_str(&format!("- `{}`: {}\n", r["id"].as_str().unwrap_or(""), d));
        }
    }
    s
}

/// `text` with everything between the markers replaced by `table`.
pub fn replace_between_markers(text: &str, table: &str) -> Result<String> {
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        bail!("no {BEGIN} ... {END} markers: add them where the table belongs");
    };
    if e < b {
        bail!("{END} comes before {BEGIN}");
    }
    Ok(format!(
        "{}{BEGIN}\n{table}{END}{}",
        &text[..b],
        &text[e + END.len()..]
    ))
}

fn git(args: &[&str]) -> String {
    std::process::Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

pub fn report(args: ReportArgs) -> Result<()> {
    let states: HashMap<&str, &str> = args
        .parts
        .iter()
        .filter_map(|p| p.split_once('='))
        .collect();
    let read = |part: &str| std::fs::read_to_string(args.dir.join(format!("{part}.out"))).ok();
    let read_err = |part: &str| std::fs::read_to_string(args.dir.join(format!("{part}.err"))).ok();
    let mut results: Vec<Value> = Vec::new();
    if let Some(state) = states.get("policy") {
        if *state == "ok" {
            let crit = args
                .criterion
                .clone()
                .unwrap_or_else(|| args.dir.join("../criterion"));
            results.extend(policy(&crit, args.since));
        } else {
            results.push(not_run(
                "policy_eval",
                "Policy evaluation",
                "not run: `cargo bench -p flowaudit-policy` failed (see its output)",
            ));
        }
    }
    if states.contains_key("pipeline") {
        results.extend(agent_test(
            read("pipeline").as_deref(),
            read_err("pipeline").as_deref(),
            states.get("pipeline").copied(),
            "pipeline_capacity",
            "pipeline_capacity",
            "Userspace pipeline: events/s per core, memory at 100,000 open flows",
        ));
    }
    if states.contains_key("instructions") {
        results.extend(agent_test(
            read("instructions").as_deref(),
            read_err("instructions").as_deref(),
            states.get("instructions").copied(),
            "pipeline_instructions",
            "pipeline_instructions",
            "Userspace pipeline: instructions per kernel record (callgrind)",
        ));
    }
    if states.contains_key("stream") {
        results.extend(agent_test(
            read("stream").as_deref(),
            read_err("stream").as_deref(),
            states.get("stream").copied(),
            "stream_throughput",
            "stream_throughput",
            "gRPC stream delivery",
        ));
    }
    if states.contains_key("relay") {
        results.extend(agent_test(
            read("relay").as_deref(),
            read_err("relay").as_deref(),
            states.get("relay").copied(),
            "relay_throughput",
            "relay_throughput",
            "Relay: added delay and throughput with 3 nodes",
        ));
    }
    if states.contains_key("node") {
        let found = read("node").map(|t| parse_results(&t)).unwrap_or_default();
        if states.get("node") != Some(&"ok") {
            results.push(not_run(
                "node",
                "Node measurements (items 1, 2, 3, 6)",
                "failed: flowaudit-bench run stopped with an error (see its output); results before it are kept",
            ));
        }
        results.extend(found);
    }
    // A target of "" is no target: "met" means nothing without one.
    for r in &mut results {
        if r["target"].as_str().is_none_or(str::is_empty) {
            r["target"] = Value::Null;
            r["met"] = Value::Null;
        }
    }
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let finished = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let report = json!({
        "finished": finished,
        "commit": if dirty { format!("{commit} + local changes") } else { commit },
        "seconds": args.seconds,
        "machine": machine(&args.load_before),
        "results": results,
    });
    print_table(&results);
    let path = args.dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("write {}", path.display()))?;
    eprintln!("bench: results written to {}", path.display());
    if let Some(doc) = &args.write_docs {
        let text =
            std::fs::read_to_string(doc).with_context(|| format!("read {}", doc.display()))?;
        let new = replace_between_markers(&text, &markdown(&report))
            .with_context(|| doc.display().to_string())?;
        std::fs::write(doc, new).with_context(|| format!("write {}", doc.display()))?;
        eprintln!("bench: results table written to {}", doc.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bench_result_lines_and_counts_tests() {
        let text = "noise\nbench-result: {\"id\":\"a\",\"value\":1}\nbench-result: not json\n\
                    test result: ok. 1 passed; 0 failed; 0 ignored\n\
                    test result: ok. 0 passed; 0 failed; 3 filtered out\n";
        assert_eq!(parse_results(text).len(), 1);
        assert_eq!(tests_passed(text), 1);
        assert_eq!(tests_passed("test result: ok. 0 passed; 0 failed"), 0);
    }

    #[test]
    fn a_missing_test_is_not_run_with_the_reason() {
        let r = agent_test(
            Some(
                "running 0 tests\ntest result: ok. 0 passed; 0 failed; 0 ignored; 12 filtered out\n",
            ),
            None,
            Some("ok"),
            "pipeline_capacity",
            "pipeline_capacity",
            "P",
        );
        assert_eq!(r.len(), 1);
        assert!(r[0]["value"].is_null());
        assert!(
            r[0]["detail"]
                .as_str()
                .unwrap()
                .contains("no `pipeline_capacity` test")
        );
    }

    #[test]
    fn quotes_the_first_compiler_error() {
        let err = "   Compiling flowaudit\nerror[E0433]: cannot find type `RecordKind` in this scope\n   --> agent/src/flow/build.rs:127:18\n";
        assert_eq!(
            first_compile_error(err).unwrap(),
            "error[E0433]: cannot find type `RecordKind` in this scope at agent/src/flow/build.rs:127:18"
        );
        assert_eq!(first_compile_error("test failed"), None);
    }

    #[test]
    fn reads_the_old_stream_throughput_lines() {
        let r = legacy_stream_lines(
            "stream throughput: 100 subscriber(s): 1234 flows/s each, 123400 flows/s delivered in total, 0 lost",
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0]["id"], "stream_throughput_100");
        assert_eq!(r[0]["value"], 1234.0);
    }

    #[test]
    fn formats_values_and_states() {
        assert_eq!(
            fmt_value(&json!({"value": 21234.4, "unit": "conn/s"})),
            "21,234 conn/s"
        );
        assert_eq!(
            fmt_value(&json!({"value": 1234567.0, "unit": ""})),
            "1,234,567"
        );
        assert_eq!(fmt_value(&json!({"value": 99.456, "unit": "%"})), "99.46 %");
        assert_eq!(fmt_value(&json!({"value": null, "unit": "%"})), "not run");
        assert_eq!(status(&json!({"value": 1.0, "met": false})), "MISSED");
        assert_eq!(status(&json!({"value": null, "met": null})), "not run");
    }

    #[test]
    fn replaces_only_between_markers() {
        let doc = format!("head\n{BEGIN}\nold\n{END}\ntail\n");
        let new = replace_between_markers(&doc, "new\n").unwrap();
        assert_eq!(new, format!("head\n{BEGIN}\nnew\n{END}\ntail\n"));
        assert!(replace_between_markers("no markers", "x").is_err());
    }
}
