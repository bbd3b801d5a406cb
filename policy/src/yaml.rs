//! A thin, position-aware view over saphyr's marked YAML tree: typed accessors that
//! record a [`Diagnostic`] (with line and column) instead of failing, so one pass over a
//! document reports every problem in it.

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use crate::diag::{Diagnostic, Severity};

/// Inputs above this size are refused before parsing: policies are small, and the
/// limit bounds the work an accidental or hostile file can cause.
pub const MAX_SOURCE_BYTES: usize = 4 * 1024 * 1024;
/// Deeper nesting than this is refused; no policy format needs more than ~12 levels,
/// and the limit keeps recursive walks (and drops) far from the stack's end.
pub const MAX_DEPTH: usize = 64;

/// Collects diagnostics for one source file.
pub struct Ctx {
    pub file: String,
    pub diags: Vec<Diagnostic>,
}

impl Ctx {
    pub fn new(file: impl Into<String>) -> Self {
        Ctx {
            file: file.into(),
            diags: Vec::new(),
        }
    }

    pub fn error_at(&mut self, node: &MarkedYaml<'_>, msg: impl Into<String>) {
        self.push(Severity::Error, node, msg.into());
    }

    pub fn warn_at(&mut self, node: &MarkedYaml<'_>, msg: impl Into<String>) {
        self.push(Severity::Warning, node, msg.into());
    }

    pub fn error_pos(&mut self, line: usize, col: usize, msg: impl Into<String>) {
        self.diags.push(Diagnostic {
            severity: Severity::Error,
            file: self.file.clone(),
            line,
            col,
            message: msg.into(),
        });
    }

    fn push(&mut self, severity: Severity, node: &MarkedYaml<'_>, message: String) {
        let (line, col) = pos(node);
        self.diags.push(Diagnostic {
            severity,
            file: self.file.clone(),
            line,
            col,
            message,
        });
    }
}

/// 1-based line and column of a node.
pub fn pos(node: &MarkedYaml<'_>) -> (usize, usize) {
    (node.span.start.line(), node.span.start.col() + 1)
}

/// Parses a (possibly multi-document) YAML source. Syntax errors come back as a single
/// diagnostic, as the parser cannot recover from them.
pub fn load(ctx: &mut Ctx, text: &str) -> Vec<MarkedYaml<'static>> {
    if text.len() > MAX_SOURCE_BYTES {
        ctx.error_pos(
            0,
            0,
            format!(
                "file is larger than {} bytes; refusing to parse it",
                MAX_SOURCE_BYTES
            ),
        );
        return Vec::new();
    }
    // Nesting is checked on the raw text first: the loader itself builds the tree
    // recursively deep, and a file of 100k `[` must not take the process down.
    if let Some((line, col)) = too_deep(text) {
        ctx.error_pos(line, col, format!("nesting deeper than {MAX_DEPTH} levels"));
        return Vec::new();
    }
    // Owned strings let documents outlive the text (the loader borrows otherwise).
    match MarkedYaml::load_from_str(text) {
        Ok(docs) => docs.into_iter().map(into_owned).collect(),
        Err(e) => {
            let m = e.marker();
            ctx.error_pos(m.line(), m.col() + 1, format!("invalid YAML: {}", e.info()));
            Vec::new()
        }
    }
}

/// The first place where collections nest deeper than [`MAX_DEPTH`], read
/// from the parser's events (which keep their own stack on the heap, never
/// recursing), so that brackets in comments and quoted strings do not count.
/// A syntax error ends the check (the loader reports it), except the
/// scanner's own limit of 255 open brackets, which it can reach while it
/// reads ahead of the events: that is this error too, where it says.
fn too_deep(text: &str) -> Option<(usize, usize)> {
    let mut depth: usize = 0;
    for item in saphyr_parser::Parser::new_from_str(text) {
        let (event, span) = match item {
            Ok(e) => e,
            Err(e) if e.info().contains("recursion limit") => {
                return Some((e.marker().line(), e.marker().col() + 1));
            }
            Err(_) => return None,
        };
        match event {
            saphyr_parser::Event::SequenceStart(..) | saphyr_parser::Event::MappingStart(..) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some((span.start.line(), span.start.col() + 1));
                }
            }
            saphyr_parser::Event::SequenceEnd | saphyr_parser::Event::MappingEnd => {
                depth = depth.saturating_sub(1)
            }
            saphyr_parser::Event::StreamEnd => return None,
            _ => {}
        }
    }
    None
}

fn into_owned(node: MarkedYaml<'_>) -> MarkedYaml<'static> {
    let data = match node.data {
        YamlData::Representation(s, style, tag) => YamlData::Representation(
            s.into_owned().into(),
            style,
            tag.map(|t| std::borrow::Cow::Owned(t.into_owned())),
        ),
        YamlData::Value(v) => YamlData::Value(scalar_owned(v)),
        YamlData::Sequence(seq) => YamlData::Sequence(seq.into_iter().map(into_owned).collect()),
        YamlData::Mapping(map) => YamlData::Mapping(
            map.into_iter()
                .map(|(k, v)| (into_owned(k), into_owned(v)))
                .collect(),
        ),
        YamlData::Tagged(tag, inner) => YamlData::Tagged(
            std::borrow::Cow::Owned(tag.into_owned()),
            Box::new(into_owned(*inner)),
        ),
        YamlData::Alias(a) => YamlData::Alias(a),
        YamlData::BadValue => YamlData::BadValue,
    };
    MarkedYaml {
        span: node.span,
        data,
    }
}

fn scalar_owned(s: Scalar<'_>) -> Scalar<'static> {
    match s {
        Scalar::Null => Scalar::Null,
        Scalar::Boolean(b) => Scalar::Boolean(b),
        Scalar::Integer(i) => Scalar::Integer(i),
        Scalar::FloatingPoint(f) => Scalar::FloatingPoint(f),
        Scalar::String(s) => Scalar::String(s.into_owned().into()),
    }
}

/// Looks through tags (`!!str x`), which carry no meaning for policies.
pub fn untag<'n, 'i>(node: &'n MarkedYaml<'i>) -> &'n MarkedYaml<'i> {
    let mut n = node;
    // Bounded: tags cannot nest deeper than the document.
    for _ in 0..MAX_DEPTH {
        match &n.data {
            YamlData::Tagged(_, inner) => n = inner,
            _ => break,
        }
    }
    n
}

pub fn is_null(node: &MarkedYaml<'_>) -> bool {
    matches!(untag(node).data, YamlData::Value(Scalar::Null))
}

/// The node's text if it is a scalar (numbers and booleans as written in canonical form).
pub fn scalar_text(node: &MarkedYaml<'_>) -> Option<String> {
    match &untag(node).data {
        YamlData::Value(Scalar::String(s)) => Some(s.to_string()),
        YamlData::Value(Scalar::Integer(i)) => Some(i.to_string()),
        YamlData::Value(Scalar::Boolean(b)) => Some(b.to_string()),
        YamlData::Value(Scalar::FloatingPoint(f)) => Some(f.to_string()),
        YamlData::Representation(s, _, _) => Some(s.to_string()),
        _ => None,
    }
}

fn kind_name(node: &MarkedYaml<'_>) -> &'static str {
    match &untag(node).data {
        YamlData::Value(Scalar::Null) => "null",
        YamlData::Value(Scalar::Boolean(_)) => "a boolean",
        YamlData::Value(Scalar::Integer(_)) => "a number",
        YamlData::Value(Scalar::FloatingPoint(_)) => "a number",
        YamlData::Value(Scalar::String(_)) | YamlData::Representation(..) => "a string",
        YamlData::Sequence(_) => "a list",
        YamlData::Mapping(_) => "a mapping",
        _ => "an invalid value",
    }
}

/// A required string; records an error and returns `None` otherwise.
pub fn string(ctx: &mut Ctx, node: &MarkedYaml<'_>, what: &str) -> Option<String> {
    match &untag(node).data {
        YamlData::Value(Scalar::String(s)) => Some(s.to_string()),
        // Unquoted numbers and booleans are accepted as text: `app: 1` is a fine label.
        YamlData::Value(Scalar::Integer(_) | Scalar::Boolean(_) | Scalar::FloatingPoint(_)) => {
            scalar_text(node)
        }
        _ => {
            ctx.error_at(
                node,
                format!("{what} must be a string, found {}", kind_name(node)),
            );
            None
        }
    }
}

/// Items of a list; a missing (null) list is empty; anything else is an error.
pub fn seq<'n, 'i>(ctx: &mut Ctx, node: &'n MarkedYaml<'i>, what: &str) -> &'n [MarkedYaml<'i>] {
    match &untag(node).data {
        YamlData::Sequence(items) => items,
        YamlData::Value(Scalar::Null) => &[],
        _ => {
            ctx.error_at(
                node,
                format!("{what} must be a list, found {}", kind_name(node)),
            );
            &[]
        }
    }
}

/// A mapping's entries as (key text, key node, value node), in document order, with
/// unknown keys reported. `allowed` lists every accepted key; `ignored` lists keys that
/// are accepted but carry nothing for flowaudit (Kubernetes metadata, status, ...).
pub struct Map<'n, 'i> {
    pub node: &'n MarkedYaml<'i>,
    entries: Vec<(String, &'n MarkedYaml<'i>, &'n MarkedYaml<'i>)>,
}

impl<'n, 'i> Map<'n, 'i> {
    /// Views `node` as a mapping (null counts as empty); reports an error otherwise.
    pub fn new(ctx: &mut Ctx, node: &'n MarkedYaml<'i>, what: &str) -> Option<Self> {
        let node = untag(node);
        match &node.data {
            YamlData::Mapping(m) => {
                let mut entries = Vec::with_capacity(m.len());
                for (k, v) in m.iter() {
                    match scalar_text(k) {
                        Some(key) => entries.push((key, k, v)),
                        None => ctx.error_at(k, format!("keys in {what} must be strings")),
                    }
                }
                Some(Map { node, entries })
            }
            YamlData::Value(Scalar::Null) => Some(Map {
                node,
                entries: Vec::new(),
            }),
            _ => {
                ctx.error_at(
                    node,
                    format!("{what} must be a mapping, found {}", kind_name(node)),
                );
                None
            }
        }
    }

    /// Reports every key not in `allowed` as an unknown field.
    pub fn check_fields(&self, ctx: &mut Ctx, what: &str, allowed: &[&str]) {
        for (key, knode, _) in &self.entries {
            if !allowed.contains(&key.as_str()) {
                ctx.error_at(
                    knode,
                    format!(
                        "unknown field `{key}` in {what}; expected one of: {}",
                        allowed.join(", ")
                    ),
                );
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&'n MarkedYaml<'i>> {
        self.entries
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, _, v)| *v)
            .filter(|v| !is_null(v))
    }

    pub fn key_node(&self, key: &str) -> Option<&'n MarkedYaml<'i>> {
        self.entries
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, k, _)| *k)
    }

    pub fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, _, _)| k == key)
    }

    pub fn entries(
        &self,
    ) -> impl Iterator<Item = (&str, &'n MarkedYaml<'i>, &'n MarkedYaml<'i>)> + '_ {
        self.entries.iter().map(|(k, kn, v)| (k.as_str(), *kn, *v))
    }

    /// A required string field.
    pub fn req_string(&self, ctx: &mut Ctx, key: &str, what: &str) -> Option<String> {
        match self.get(key) {
            Some(v) => string(ctx, v, &format!("`{key}` of {what}")),
            None => {
                ctx.error_at(
                    self.node,
                    format!("{what} is missing required field `{key}`"),
                );
                None
            }
        }
    }

    pub fn opt_string(&self, ctx: &mut Ctx, key: &str, what: &str) -> Option<String> {
        self.get(key)
            .and_then(|v| string(ctx, v, &format!("`{key}` of {what}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> (usize, Vec<Diagnostic>) {
        let mut ctx = Ctx::new("p.yaml");
        let docs = load(&mut ctx, text);
        (docs.len(), ctx.diags)
    }

    #[test]
    fn brackets_in_comments_and_strings_are_not_nesting() {
        let text = format!(
            "# {open}\nkind: FlowPolicy\nnote: \"{open}\"\nother: '{close}{open}'\nlist: [a, {{b: c}}]\n",
            open = "{[".repeat(70),
            close = "]}".repeat(3),
        );
        let (docs, diags) = load_text(&text);
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(docs, 1);
    }

    #[test]
    fn nesting_past_the_limit_is_refused_where_it_goes_too_deep() {
        // Flow style: 100,000 brackets must neither crash nor be parsed.
        let (docs, diags) = load_text(&format!("a: {}", "[".repeat(100_000)));
        assert_eq!(docs, 0);
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(
            diags[0].message,
            format!("nesting deeper than {MAX_DEPTH} levels")
        );
        assert_eq!(diags[0].line, 1);
        // Block style, one mapping per line.
        let block: String = (0..=MAX_DEPTH)
            .map(|i| format!("{}k{i}:\n", "  ".repeat(i)))
            .collect();
        let (docs, diags) = load_text(&block);
        assert_eq!(docs, 0);
        assert_eq!(diags[0].line, MAX_DEPTH + 1, "{diags:?}");
        // At the limit it loads.
        let (docs, diags) = load_text(&format!(
            "{}{}",
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        ));
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(docs, 1);
    }
}
