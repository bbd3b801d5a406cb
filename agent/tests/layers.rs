//! The agent's modules form layers that point one way (docs/architecture.md,
//! "Layers"): a module's production code uses only modules of lower layers.
//! This reads `src/` and checks every `crate::` path outside `#[cfg(test)]`
//! items, so an import cycle (or a sink reaching up into the CLI) fails the
//! build's tests with the file and line that made it. Tests may assemble
//! any modules they like and are not checked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Lowest first. Modules on one line may not use each other.
const LAYERS: &[&[&str]] = &[
    // The vocabulary, and process setup: nothing of the agent below them.
    &["flow", "runtime"],
    // Kernel programs and their records.
    &["capture"],
    // Facts about the node: pods, Cilium's maps.
    &["endpoints", "cilium"],
    // Stages: who each end is; what the policy says of a flow.
    &["identity", "judge"],
    // Kernel records in, flows out to the sinks it owns the trait of.
    &["pipeline"],
    // Sinks and front ends: file, metrics, stream, status.
    &["export"],
    // The cluster stream, built on the agents' export side.
    &["relay"],
    // The commands: the only place the agent is put together.
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// `src/a/b.rs` and `src/a.rs` belong to module `a`; `lib.rs`/`main.rs` to none.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text with comments, string and char literals blanked (newlines
/// kept, so line numbers stay right).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if b[i] == b'r'
            && (b[i + 1..].starts_with(b"\"") || b[i + 1..].starts_with(b"#"))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            // Raw string r"..." / r#"..."#.
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                out.push(b[i]);
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let start = i + 2 + hashes;
            let end = b[start..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| start + p + close.len());
            for &c in &b[i..end] {
                blank(&mut out, c);
            }
            i = end;
        } else if b[i] == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    blank(&mut out, b[i]);
                    i += 1;
                }
                if i < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\''), not a lifetime ('a).
            let lit_end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map(|p| i + 2 + p + 1)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 3)
            } else {
                None
            };
            match lit_end {
                Some(end) => {
                    out.extend(std::iter::repeat_n(b' ', end - i));
                    i = end;
                }
                None => {
                    out.push(b[i]);
                    i += 1;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("only ASCII was replaced")
}

/// Blanks every item under `#[cfg(test)]` (a `mod tests { ... }`, a
/// test-only `use` or field), keeping newlines.
fn without_tests(code: &str) -> String {
    let mut b = code.as_bytes().to_vec();
    let mut from = 0;
    while let Some(p) = code[from..].find("#[cfg(test)]") {
        let start = from + p;
        // The item ends at its `;` or at the `}` closing its first `{`.
        let mut i = start + "#[cfg(test)]".len();
        let mut depth = 0usize;
        while i < b.len() {
            match b[i] {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                b';' | b',' if depth == 0 => {
                    i += 1;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        for c in &mut b[start..i.min(code.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
        from = i.min(code.len());
    }
    String::from_utf8(b).expect("only ASCII was replaced")
}

/// The first path segment after each `crate::`, with its line: `crate::x`,
/// and every top-level name in `crate::{x::a, y}`.
fn crate_uses(code: &str) -> Vec<(String, usize)> {
    let mut uses = Vec::new();
    let line_of = |pos: usize| code[..pos].matches('\n').count() + 1;
    for (pos, _) in code.match_indices("crate::") {
        if pos > 0 {
            let prev = code.as_bytes()[pos - 1];
            if prev.is_ascii_alphanumeric() || prev == b'_' {
                continue; // e.g. `flowaudit_crate::`
            }
        }
        let rest = &code[pos + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut names = Vec::new();
            let mut at_name = true;
            for (k, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => at_name = true,
                    c if c.is_whitespace() => {}
                    _ if at_name && depth == 1 => {
                        let name: String = group[k..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        names.push(name);
                        at_name = false;
                    }
                    _ => {}
                }
            }
            uses.extend(names.into_iter().map(|n| (n, line_of(pos))));
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            uses.push((name, line_of(pos)));
        }
    }
    uses
}

#[test]
fn modules_use_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut modules_seen = BTreeMap::new();
    let mut wrong = Vec::new();
    for file in &files {
        let Some(module) = top_module(&src, file) else {
            continue;
        };
        let Some(layer) = layer_of(&module) else {
            panic!(
                "module `{module}` ({}) is in no layer: add it to LAYERS in {} and to docs/architecture.md",
                file.display(),
                file!()
            );
        };
        *modules_seen.entry(module.clone()).or_insert(0) += 1;
        let text = std::fs::read_to_string(file).expect("read a source file");
        for (used, line) in crate_uses(&without_tests(&code_only(&text))) {
            if used == module || used == "self" || used == "super" {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l < layer => {}
                Some(l) => wrong.push(format!(
                    "{}:{line}: `{module}` (layer {layer}) uses `crate::{used}` (layer {l}); \
                     a module may use only lower layers",
                    file.strip_prefix(&src).unwrap_or(file).display()
                )),
                None => wrong.push(format!(
                    "{}:{line}: `crate::{used}` is not a module in LAYERS",
                    file.strip_prefix(&src).unwrap_or(file).display()
                )),
            }
        }
    }
    for name in LAYERS.iter().flat_map(|l| l.iter()) {
        assert!(
            modules_seen.contains_key(*name),
            "LAYERS names `{name}`, but src/ has no such module (found: {:?})",
            modules_seen.keys().collect::<Vec<_>>()
        );
    }
    assert!(
        wrong.is_empty(),
        "uses against the layers:\n{}",
        wrong.join("\n")
    );
}

/// The checker itself: it must see what it is meant to see, and nothing else.
#[test]
fn the_checker_finds_uses_outside_tests_comments_and_strings() {
    let text = r####"
use crate::flow::FlowEvent;
use crate::{capture::Clock, judge};
// use crate::cli::agent;
/* crate::relay */
const S: &str = "crate::export";
const R: &str = r#"crate::export"#;
const C: char = '"';
fn f() { crate::pipeline::run(); }
#[cfg(test)]
mod tests {
    use crate::cli::agent;
}
#[cfg(test)]
use crate::relay;
fn g<'a>(x: &'a str) { crate::identity::x(x) }
"####;
    let found: Vec<(String, usize)> = crate_uses(&without_tests(&code_only(text)));
    let expected: Vec<(String, usize)> = [
        ("flow", 2),
        ("capture", 3),
        ("judge", 3),
        ("pipeline", 9),
        ("identity", 16),
    ]
    .iter()
    .map(|(n, l)| (n.to_string(), *l))
    .collect();
    assert_eq!(found, expected);
}
