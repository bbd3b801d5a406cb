//! Parsing of `kind: FlowPolicy` documents (PRODUCT.md's intended-policy format) into
//! [`Rule`]s: SPIFFE ID patterns confined to the policy's trust domain, `world`,
//! `host`, ports and ranges, per-rule mTLS with a spec-wide default, and deny rules.

use saphyr::MarkedYaml;

use crate::ir::{Action, MtlsMode, Origin, PeerPattern, Rule};
use crate::ports::{PortRange, PortSet, parse_port_spec};
use crate::spiffe::{parse_pattern, valid_trust_domain};
use crate::yaml::{Ctx, Map, pos, scalar_text, seq, string};

pub const API_VERSION: &str = "flowaudit.io/v1alpha1";

/// A parsed FlowPolicy document.
#[derive(Debug, Clone)]
pub struct FlowPolicyDoc {
    pub name: String,
    pub trust_domain: String,
    pub rules: Vec<Rule>,
}

pub fn parse(ctx: &mut Ctx, top: &Map<'_, '_>) -> Option<FlowPolicyDoc> {
    top.check_fields(
        ctx,
        "FlowPolicy",
        &["apiVersion", "kind", "metadata", "spec"],
    );
    let api = top.req_string(ctx, "apiVersion", "FlowPolicy");
    if let (Some(api), Some(node)) = (api, top.get("apiVersion"))
        && api != API_VERSION
    {
        ctx.error_at(
            node,
            format!("unsupported apiVersion `{api}` for FlowPolicy; expected `{API_VERSION}`"),
        );
    }
    let name = match top.get("metadata") {
        Some(m) => {
            let meta = Map::new(ctx, m, "metadata")?;
            meta.check_fields(
                ctx,
                "metadata",
                &["name", "namespace", "labels", "annotations"],
            );
            meta.req_string(ctx, "name", "metadata")
        }
        None => {
            ctx.error_at(top.node, "FlowPolicy is missing `metadata.name`");
            None
        }
    };
    let Some(spec_node) = top.get("spec") else {
        ctx.error_at(top.node, "FlowPolicy is missing `spec`");
        return None;
    };
    let spec = Map::new(ctx, spec_node, "spec")?;
    spec.check_fields(
        ctx,
        "FlowPolicy spec",
        &["trustDomain", "mtls", "rules", "deny"],
    );
    let td = spec.req_string(ctx, "trustDomain", "FlowPolicy spec");
    if let (Some(td), Some(node)) = (&td, spec.get("trustDomain"))
        && !valid_trust_domain(td)
    {
        ctx.error_at(
            node,
            format!(
                "`{td}` is not a valid trust domain (lower-case letters, digits, `.`, `-`, `_`)"
            ),
        );
    }
    // Zero trust: mTLS is required unless the policy says otherwise.
    let default_mtls = match spec.get("mtls") {
        Some(n) => parse_mtls(ctx, n).unwrap_or(MtlsMode::Required),
        None => MtlsMode::Required,
    };
    let name = name.unwrap_or_default();
    let td = td.unwrap_or_default();
    let mut rules = Vec::new();
    if let Some(list) = spec.get("rules") {
        for item in seq(ctx, list, "`rules`") {
            if let Some(r) = parse_rule(ctx, item, &name, &td, Some(default_mtls)) {
                rules.push(r);
            }
        }
    }
    if let Some(list) = spec.get("deny") {
        for item in seq(ctx, list, "`deny`") {
            if let Some(r) = parse_rule(ctx, item, &name, &td, None) {
                rules.push(r);
            }
        }
    }
    if !spec.has("rules") && !spec.has("deny") {
        ctx.warn_at(
            spec.node,
            "FlowPolicy has neither `rules` nor `deny`: it allows nothing",
        );
    }
    Some(FlowPolicyDoc {
        name,
        trust_domain: td,
        rules,
    })
}

fn parse_mtls(ctx: &mut Ctx, node: &MarkedYaml<'_>) -> Option<MtlsMode> {
    match string(ctx, node, "`mtls`")?.as_str() {
        "required" => Some(MtlsMode::Required),
        "optional" => Some(MtlsMode::Optional),
        other => {
            ctx.error_at(
                node,
                format!("`mtls` must be `required` or `optional`, not `{other}`"),
            );
            None
        }
    }
}

/// `default_mtls` is `None` for deny rules.
fn parse_rule(
    ctx: &mut Ctx,
    node: &MarkedYaml<'_>,
    policy: &str,
    td: &str,
    default_mtls: Option<MtlsMode>,
) -> Option<Rule> {
    let what = if default_mtls.is_some() {
        "rule"
    } else {
        "deny rule"
    };
    let map = Map::new(ctx, node, what)?;
    if default_mtls.is_some() {
        map.check_fields(
            ctx,
            what,
            &["name", "description", "from", "to", "ports", "mtls"],
        );
    } else {
        if let Some(k) = map.key_node("mtls") {
            ctx.error_at(k, "`mtls` has no meaning on a deny rule (a denied flow is a violation however it is encrypted)");
        }
        map.check_fields(
            ctx,
            what,
            &["name", "description", "from", "to", "ports", "mtls"],
        );
    }
    let name = map.req_string(ctx, "name", what);
    let from = peers(ctx, &map, "from", what, td);
    let to = peers(ctx, &map, "to", what, td);
    let ports = match map.get("ports") {
        Some(p) => ports(ctx, p)?,
        None => PortSet::ANY,
    };
    let action = match default_mtls {
        Some(default) => {
            let m = match map.get("mtls") {
                Some(n) => parse_mtls(ctx, n)?,
                None => default,
            };
            Action::Allow(m)
        }
        None => Action::Deny,
    };
    let (line, col) = pos(node);
    Some(Rule {
        name: name?,
        policy: policy.to_string(),
        from: from?,
        to: to?,
        ports,
        action,
        origin: Origin {
            file: ctx.file.clone(),
            line,
            col,
        },
    })
}

fn peers(
    ctx: &mut Ctx,
    map: &Map<'_, '_>,
    key: &str,
    what: &str,
    td: &str,
) -> Option<Vec<PeerPattern>> {
    let Some(list) = map.get(key) else {
        ctx.error_at(
            map.node,
            format!(
                "{what} is missing required field `{key}` (a list of SPIFFE IDs, `world` or `host`)"
            ),
        );
        return None;
    };
    let items = seq(ctx, list, &format!("`{key}`"));
    if items.is_empty() {
        ctx.error_at(
            list,
            format!("`{key}` is empty: the rule could never match"),
        );
        return None;
    }
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for item in items {
        let Some(text) = string(ctx, item, &format!("an entry of `{key}`")) else {
            ok = false;
            continue;
        };
        match text.as_str() {
            "world" => out.push(PeerPattern::World),
            "host" => out.push(PeerPattern::Host),
            _ => match parse_pattern(&text) {
                Ok(p) if !td.is_empty() && p.trust_domain != td => {
                    ctx.error_at(
                        item,
                        format!("`{text}` is outside the policy's trust domain `{td}`"),
                    );
                    ok = false;
                }
                Ok(p) => out.push(PeerPattern::Spiffe(p)),
                Err(e) => {
                    ctx.error_at(item, e);
                    ok = false;
                }
            },
        }
    }
    ok.then_some(out)
}

fn ports(ctx: &mut Ctx, node: &MarkedYaml<'_>) -> Option<PortSet> {
    let items = seq(ctx, node, "`ports`");
    if items.is_empty() {
        ctx.error_at(node, "`ports` is empty; leave it out to mean every port");
        return None;
    }
    let mut ranges: Vec<PortRange> = Vec::with_capacity(items.len());
    let mut ok = true;
    for item in items {
        let parsed = match scalar_text(item) {
            Some(t) => parse_port_spec(&t),
            None => Err("a port must be a number or a \"lo-hi\" range string".to_string()),
        };
        match parsed {
            Ok(r) => ranges.push(r),
            Err(e) => {
                ctx.error_at(item, e);
                ok = false;
            }
        }
    }
    ok.then(|| PortSet::of(ranges))
}
