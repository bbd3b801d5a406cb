//! `flowaudit observe -f --input-file` on the agent's export file while the
//! agent's own writer (`ExportFile`) writes and rotates it: every line comes
//! out once, in order, across rotations. The writer goes on appending to
//! the file it rotated away until its renames are done, so a follower must
//! read the old file to its end before it moves to the new one.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flowaudit::export::file::ExportFile;
use flowaudit::flow::FlowEvent;
use flowaudit_tests::support::TestDir;

/// Lines per file before it rotates.
const PER_FILE: u64 = 20;
const LINES: u64 = 200;

/// Writes `LINES` flows, one every `every`, through the agent's writer
/// into a file that rotates every `PER_FILE` lines, with `observe -f
/// --input-file` following it: observe prints every line once, in order.
fn follow(name: &str, every: Duration) {
    let dir = TestDir::new(name);
    let path = dir.join("flows.jsonl");
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/flows.jsonl");
    let text = std::fs::read_to_string(&golden).unwrap();
    let template: FlowEvent = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let line_len = serde_json::to_string(&template).unwrap().len() as u64 + 1;
    let mut ex = ExportFile::open(&path, line_len * PER_FILE, 1000).unwrap();

    let mut observe = Command::new(env!("CARGO_BIN_EXE_flowaudit"))
        .args(["observe", "-f", "-o", "json", "--input-file"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = observe.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<u64>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let flow: FlowEvent = serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!("observe printed a line that is not a flow ({e}): {line}")
            });
            if tx.send(flow.socket.cookie).is_err() {
                break;
            }
        }
    });

    for i in 0..LINES {
        let mut f = template.clone();
        f.socket.cookie = i;
        ex.write(&f).unwrap();
        ex.flush().unwrap();
        std::thread::sleep(every);
    }
    let rotations = (1..)
        .take_while(|n| dir.join(format!("flows.jsonl.{n}")).exists())
        .count();

    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (got.len() as u64) < LINES {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(cookie) => got.push(cookie),
            Err(_) => break,
        }
    }
    // Anything more would be a line printed twice.
    while let Ok(cookie) = rx.recv_timeout(Duration::from_millis(500)) {
        got.push(cookie);
    }
    let _ = observe.kill();
    let status = observe.wait().unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = observe.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    let _ = reader.join();

    assert!(
        rotations as u64 >= LINES / PER_FILE - 1,
        "the file rotated only {rotations} times"
    );
    assert_eq!(
        got,
        (0..LINES).collect::<Vec<_>>(),
        "observe printed every line once, in order, across {rotations} rotations (observe {status}; its stderr: {stderr})"
    );
    assert_eq!(
        ex.stats.errors.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// One line every 15 ms: a file rotates every 300 ms or so, slower than
/// observe looks (every 100 ms), and lines keep coming around each
/// rotation, into the file rotated away too.
#[test]
fn observe_follows_the_export_file_across_rotations_without_losing_a_line() {
    follow("fa-observe-follow", Duration::from_millis(15));
}

/// One line every 2 ms: the file rotates every 40 ms or so, several times
/// between two looks of observe; the files in between are read in turn.
#[test]
fn observe_reads_every_file_of_rotations_faster_than_it_looks() {
    follow("fa-observe-follow-fast", Duration::from_millis(2));
}
