//! Import of CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and Kubernetes
//! NetworkPolicy documents as intent over pod labels and namespaces. Each document
//! becomes one or more [`ImportedPolicy`] values (subject selector plus per-direction
//! allow/deny rules). Every construct flowaudit cannot judge is reported with its
//! position; none is dropped silently.

use saphyr::MarkedYaml;

use crate::ir::{
    DirectionRules, Entity, ImportKind, ImportedPeer, ImportedPolicy, ImportedRule, LabelKey,
    Origin, Req, Selector,
};
use crate::ports::{PortRange, PortSet, parse_port_spec};
use crate::yaml::{Ctx, Map, pos, scalar_text, seq, string};

const K8S_NS_LABEL: &str = "kubernetes.io/metadata.name";

/// Parses one Cilium policy document (namespaced or clusterwide).
pub fn parse_cilium(ctx: &mut Ctx, top: &Map<'_, '_>, kind: ImportKind) -> Vec<ImportedPolicy> {
    let kname = kind.as_str();
    top.check_fields(
        ctx,
        kname,
        &["apiVersion", "kind", "metadata", "spec", "specs", "status"],
    );
    let (name, namespace) = metadata(ctx, top, kind);
    let mut specs: Vec<&MarkedYaml<'_>> = Vec::new();
    if let Some(s) = top.get("spec") {
        specs.push(s);
    }
    if let Some(list) = top.get("specs") {
        specs.extend(seq(ctx, list, "`specs`"));
    }
    if specs.is_empty() {
        ctx.error_at(top.node, format!("{kname} has neither `spec` nor `specs`"));
        return Vec::new();
    }
    let many = specs.len() > 1;
    let mut out = Vec::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let name = if many {
            format!("{name}[{i}]")
        } else {
            name.clone()
        };
        if let Some(p) = cilium_rule(ctx, spec, kind, &name, namespace.as_deref()) {
            out.push(p);
        }
    }
    out
}

fn metadata(ctx: &mut Ctx, top: &Map<'_, '_>, kind: ImportKind) -> (String, Option<String>) {
    let kname = kind.as_str();
    let Some(meta_node) = top.get("metadata") else {
        ctx.error_at(top.node, format!("{kname} is missing `metadata.name`"));
        return (String::new(), None);
    };
    let Some(meta) = Map::new(ctx, meta_node, "metadata") else {
        return (String::new(), None);
    };
    // Exported objects carry uid, resourceVersion, managedFields...: none matter here.
    let name = meta.req_string(ctx, "name", "metadata").unwrap_or_default();
    let ns = meta.opt_string(ctx, "namespace", "metadata");
    match kind {
        ImportKind::CiliumClusterwideNetworkPolicy => {
            if let (Some(_), Some(n)) = (&ns, meta.get("namespace")) {
                ctx.warn_at(n, "CiliumClusterwideNetworkPolicy is not namespaced; `metadata.namespace` is ignored");
            }
            (name, None)
        }
        _ => match ns {
            Some(ns) => (name, Some(ns)),
            None => {
                ctx.warn_at(
                    meta.node,
                    format!("{kname} `{name}` has no `metadata.namespace`; assuming `default` (kubectl would use the current context's namespace)"),
                );
                (name, Some("default".into()))
            }
        },
    }
}

fn cilium_rule(
    ctx: &mut Ctx,
    node: &MarkedYaml<'_>,
    kind: ImportKind,
    name: &str,
    ns: Option<&str>,
) -> Option<ImportedPolicy> {
    let spec = Map::new(ctx, node, "spec")?;
    spec.check_fields(
        ctx,
        "Cilium policy spec",
        &[
            "endpointSelector",
            "nodeSelector",
            "ingress",
            "ingressDeny",
            "egress",
            "egressDeny",
            "labels",
            "description",
            "enableDefaultDeny",
            "log",
        ],
    );
    if let Some(n) = spec.key_node("nodeSelector") {
        ctx.warn_at(
            n,
            "host policies (`nodeSelector`) are not audited by flowaudit: this policy is skipped",
        );
        return None;
    }
    let Some(sel_node) = spec.get("endpointSelector") else {
        ctx.error_at(
            spec.node,
            "Cilium policy spec is missing `endpointSelector`",
        );
        return None;
    };
    let mut subject = cilium_selector(ctx, sel_node, kind)?;
    if let Some(ns) = ns {
        // A namespaced policy only ever selects endpoints of its own namespace.
        subject
            .reqs
            .push(Req::In(LabelKey::Namespace, vec![ns.to_string()]));
    }
    let mut ingress = DirectionRules::default();
    let mut egress = DirectionRules::default();
    for (key, dir, deny) in [
        ("ingress", true, false),
        ("ingressDeny", true, true),
        ("egress", false, false),
        ("egressDeny", false, true),
    ] {
        let Some(list) = spec.get(key) else { continue };
        let target = if dir { &mut ingress } else { &mut egress };
        for item in seq(ctx, list, &format!("`{key}`")) {
            if let Some(r) = cilium_peer_rule(ctx, item, kind, ns, dir, deny) {
                if deny {
                    target.deny.push(r);
                } else {
                    target.allow.push(r);
                }
            }
        }
    }
    // Cilium: a direction with rules goes default-deny unless enableDefaultDeny says no.
    ingress.enforced =
        !ingress.allow.is_empty() || !ingress.deny.is_empty() || has_items(&spec, "ingress");
    egress.enforced =
        !egress.allow.is_empty() || !egress.deny.is_empty() || has_items(&spec, "egress");
    if let Some(edd) = spec.get("enableDefaultDeny")
        && let Some(m) = Map::new(ctx, edd, "enableDefaultDeny")
    {
        m.check_fields(ctx, "enableDefaultDeny", &["ingress", "egress"]);
        for (key, target) in [("ingress", &mut ingress), ("egress", &mut egress)] {
            if let Some(v) = m.get(key) {
                match scalar_text(v).as_deref() {
                    Some("true") => target.enforced = true,
                    Some("false") => target.enforced = false,
                    _ => ctx.error_at(
                        v,
                        format!("`enableDefaultDeny.{key}` must be true or false"),
                    ),
                }
            }
        }
    }
    let (line, col) = pos(node);
    Some(ImportedPolicy {
        kind,
        namespace: ns.map(str::to_string),
        name: name.to_string(),
        subject,
        ingress,
        egress,
        origin: Origin {
            file: ctx.file.clone(),
            line,
            col,
        },
    })
}

fn has_items(spec: &Map<'_, '_>, key: &str) -> bool {
    spec.get(key).is_some_and(
        |n| matches!(&crate::yaml::untag(n).data, saphyr::YamlData::Sequence(s) if !s.is_empty()),
    )
}

fn cilium_peer_rule(
    ctx: &mut Ctx,
    node: &MarkedYaml<'_>,
    kind: ImportKind,
    ns: Option<&str>,
    ingress: bool,
    deny: bool,
) -> Option<ImportedRule> {
    let what = match (ingress, deny) {
        (true, false) => "ingress rule",
        (true, true) => "ingressDeny rule",
        (false, false) => "egress rule",
        (false, true) => "egressDeny rule",
    };
    let map = Map::new(ctx, node, what)?;
    let (ep, ent, cidr, cidrset, req) = if ingress {
        (
            "fromEndpoints",
            "fromEntities",
            "fromCIDR",
            "fromCIDRSet",
            "fromRequires",
        )
    } else {
        (
            "toEndpoints",
            "toEntities",
            "toCIDR",
            "toCIDRSet",
            "toRequires",
        )
    };
    let unsupported: &[&str] = if ingress {
        &["fromGroups", "fromNodes", "icmps"]
    } else {
        &["toServices", "toFQDNs", "toGroups", "toNodes", "icmps"]
    };
    let mut allowed: Vec<&str> = vec![ep, ent, cidr, cidrset, req, "toPorts"];
    allowed.extend_from_slice(unsupported);
    if !deny {
        allowed.push("authentication");
    }
    map.check_fields(ctx, what, &allowed);

    let mut peers = Vec::new();
    let mut any_peer_field = false;
    if let Some(list) = map.get(ep) {
        any_peer_field = true;
        for s in seq(ctx, list, &format!("`{ep}`")) {
            if let Some(mut sel) = cilium_selector(ctx, s, kind) {
                // In a namespaced policy a peer selector without a namespace means the
                // policy's own namespace.
                if let Some(ns) = ns
                    && !sel.has_namespace_req()
                {
                    sel.reqs
                        .push(Req::In(LabelKey::Namespace, vec![ns.to_string()]));
                }
                peers.push(ImportedPeer::Endpoints(sel));
            }
        }
    }
    if let Some(list) = map.get(ent) {
        any_peer_field = true;
        for e in seq(ctx, list, &format!("`{ent}`")) {
            let Some(text) = string(ctx, e, "an entity") else {
                continue;
            };
            match text.as_str() {
                "world" => peers.push(ImportedPeer::Entity(Entity::World)),
                "host" | "remote-node" => peers.push(ImportedPeer::Entity(Entity::Host)),
                "cluster" => peers.push(ImportedPeer::Entity(Entity::Cluster)),
                "all" => peers.push(ImportedPeer::Entity(Entity::All)),
                "kube-apiserver" | "health" | "init" | "ingress" | "unmanaged" | "world-ipv4" | "world-ipv6" => {
                    ctx.warn_at(
                        e,
                        format!("entity `{text}` cannot be told apart by flowaudit; this entry matches no flow"),
                    );
                }
                other => ctx.error_at(e, format!("unknown entity `{other}`; expected world, host, remote-node, cluster or all")),
            }
        }
    }
    for key in [cidr, cidrset] {
        if let Some(list) = map.get(key) {
            any_peer_field = true;
            for c in seq(ctx, list, &format!("`{key}`")) {
                let text = match Map::new(ctx, c, "a CIDR set entry") {
                    Some(m) if key == cidrset => {
                        if m.has("except") {
                            ctx.warn_at(c, "`except` in a CIDR set is not audited; the entry is taken as all of `world`");
                        }
                        m.opt_string(ctx, "cidr", "a CIDR set entry")
                    }
                    _ => scalar_text(c),
                };
                match text.as_deref() {
                    Some("0.0.0.0/0" | "::/0") => peers.push(ImportedPeer::Entity(Entity::World)),
                    _ => ctx.warn_at(
                        c,
                        "CIDR peers other than 0.0.0.0/0 and ::/0 are not audited (flowaudit sees external addresses only as `world`); this entry matches no flow",
                    ),
                }
            }
        }
    }
    if let Some(k) = map.key_node(req) {
        ctx.warn_at(k, format!("`{req}` is not audited: the rule is taken without this extra requirement, so it may allow more than Cilium does"));
    }
    for key in unsupported {
        if let Some(k) = map.key_node(key) {
            any_peer_field = true;
            ctx.warn_at(
                k,
                format!("`{key}` is not audited by flowaudit; it matches no TCP flow here"),
            );
        }
    }
    let ports = match map.get("toPorts") {
        Some(tp) => cilium_ports(ctx, tp),
        None => PortSet::ANY,
    };
    // Cilium: a rule with ports but no peer is L4-only and applies to every peer; a rule
    // with neither (`- {}`) allows nothing but still puts the direction in default deny.
    if !any_peer_field && map.has("toPorts") {
        peers.push(ImportedPeer::Any);
    }
    let mut auth_required = false;
    if let Some(a) = map.get("authentication")
        && let Some(am) = Map::new(ctx, a, "authentication")
    {
        am.check_fields(ctx, "authentication", &["mode"]);
        match am.opt_string(ctx, "mode", "authentication").as_deref() {
            Some("required") => auth_required = true,
            Some("disabled") | None => {}
            Some(other) => ctx.warn_at(
                a,
                format!(
                    "authentication mode `{other}` is not audited; treated as not requiring mutual authentication"
                ),
            ),
        }
    }
    Some(ImportedRule {
        peers,
        ports,
        auth_required,
    })
}

fn cilium_ports(ctx: &mut Ctx, node: &MarkedYaml<'_>) -> PortSet {
    let mut ranges: Vec<PortRange> = Vec::new();
    let mut any = false;
    let items = seq(ctx, node, "`toPorts`");
    if items.is_empty() {
        return PortSet::ANY;
    }
    for pr in items {
        let Some(m) = Map::new(ctx, pr, "a toPorts entry") else {
            continue;
        };
        m.check_fields(
            ctx,
            "a toPorts entry",
            &[
                "ports",
                "rules",
                "terminatingTLS",
                "originatingTLS",
                "serverNames",
                "listener",
            ],
        );
        for key in [
            "rules",
            "terminatingTLS",
            "originatingTLS",
            "serverNames",
            "listener",
        ] {
            if let Some(k) = m.key_node(key) {
                ctx.warn_at(k, format!("`{key}` (L7 or TLS interception) is not audited; only the L4 ports of this entry are"));
            }
        }
        let Some(list) = m.get("ports") else {
            any = true;
            continue;
        };
        for p in seq(ctx, list, "`ports`") {
            let Some(pm) = Map::new(ctx, p, "a port") else {
                continue;
            };
            pm.check_fields(ctx, "a port", &["port", "endPort", "protocol"]);
            let proto = pm
                .opt_string(ctx, "protocol", "a port")
                .unwrap_or_else(|| "ANY".into());
            match proto.as_str() {
                "TCP" | "ANY" => {}
                "UDP" | "SCTP" | "ICMP" | "ICMPv6" => continue, // not TCP: cannot match a TCP flow
                other => {
                    ctx.error_at(
                        p,
                        format!("unknown protocol `{other}`; expected TCP, UDP, SCTP or ANY"),
                    );
                    continue;
                }
            }
            if let Some(r) = port_entry(ctx, &pm, true) {
                match r {
                    None => any = true,
                    Some(r) => ranges.push(r),
                }
            }
        }
    }
    if any {
        PortSet::ANY
    } else {
        PortSet::of(ranges)
    }
}

/// One `{port, endPort}`: `Some(None)` means every port (Cilium's port 0 or no port).
fn port_entry(ctx: &mut Ctx, pm: &Map<'_, '_>, cilium: bool) -> Option<Option<PortRange>> {
    let Some(pnode) = pm.get("port") else {
        return Some(None);
    };
    let text = scalar_text(pnode).unwrap_or_default();
    if cilium && text == "0" {
        return Some(None);
    }
    // A named port (IANA_SVC_NAME) has a letter; `-1` or `8.5` is a bad
    // number, not a name.
    if text.bytes().any(|b| b.is_ascii_alphabetic()) {
        ctx.warn_at(
            pnode,
            format!("named port `{text}` cannot be resolved without the pod spec; this entry matches no flow"),
        );
        return None;
    }
    let lo = match parse_port_spec(&text) {
        Ok(r) => r.lo,
        Err(e) => {
            ctx.error_at(pnode, e);
            return None;
        }
    };
    let hi = match pm.get("endPort") {
        Some(e) => match scalar_text(e).map(|t| parse_port_spec(&t)) {
            Some(Ok(r)) if r.lo >= lo => r.lo,
            Some(Ok(r)) => {
                ctx.error_at(
                    e,
                    format!("bad port range: endPort {} is below port {lo}", r.lo),
                );
                return None;
            }
            Some(Err(msg)) => {
                ctx.error_at(e, msg);
                return None;
            }
            None => {
                ctx.error_at(e, "`endPort` must be a number");
                return None;
            }
        },
        None => lo,
    };
    Some(Some(PortRange { lo, hi }))
}

/// Cilium label keys carry an optional source prefix (`k8s:`, `any:`, `reserved:`).
fn cilium_key(
    ctx: &mut Ctx,
    knode: &MarkedYaml<'_>,
    raw: &str,
    kind: ImportKind,
) -> Option<Option<LabelKey>> {
    let (source, key) = match raw.split_once(':') {
        Some((s, k))
            if matches!(
                s,
                "k8s" | "any" | "reserved" | "cidr" | "container" | "unspec" | "fqdn" | "cilium"
            ) =>
        {
            (s, k)
        }
        _ => ("any", raw),
    };
    if !matches!(source, "k8s" | "any") {
        ctx.warn_at(knode, format!("label source `{source}:` is not audited (flowaudit knows pod labels only); this selector matches nothing"));
        return None;
    }
    Some(Some(match key {
        "io.kubernetes.pod.namespace" => LabelKey::Namespace,
        "io.cilium.k8s.policy.serviceaccount" => LabelKey::ServiceAccount,
        "io.cilium.k8s.policy.namespace" => {
            if kind == ImportKind::CiliumNetworkPolicy {
                ctx.warn_at(
                    knode,
                    format!(
                        "`{raw}` does not select a namespace in a namespaced CiliumNetworkPolicy: Cilium matches no pod with it, so traffic this rule means to allow is dropped. Use `k8s:io.kubernetes.pod.namespace` instead. flowaudit reads the intent (this namespace), so flows Cilium blocks because of it show up as INTENDED_FLOW_FAILED"
                    ),
                );
            }
            LabelKey::Namespace
        }
        "io.cilium.k8s.policy.cluster" => {
            ctx.warn_at(knode, "the cluster name is not known to flowaudit; this requirement is ignored (every pod is taken to be in this cluster)");
            return Some(None);
        }
        k => match k.strip_prefix("io.cilium.k8s.namespace.labels.") {
            Some(K8S_NS_LABEL) => LabelKey::Namespace,
            Some(nl) => {
                ctx.warn_at(knode, format!("namespace label `{nl}` is not known to flowaudit: flows this selector decides get verdict UNKNOWN"));
                LabelKey::NamespaceLabel(nl.to_string())
            }
            None => LabelKey::Pod(k.to_string()),
        },
    }))
}

fn cilium_selector(ctx: &mut Ctx, node: &MarkedYaml<'_>, kind: ImportKind) -> Option<Selector> {
    label_selector(ctx, node, "endpoint selector", &mut |ctx, knode, raw| {
        cilium_key(ctx, knode, raw, kind)
    })
}

type KeyMapper<'f> = dyn FnMut(&mut Ctx, &MarkedYaml<'_>, &str) -> Option<Option<LabelKey>> + 'f;

/// matchLabels and matchExpressions, with keys translated by `key`: `None` makes the
/// selector match nothing (already reported), `Some(None)` drops the requirement
/// (already reported).
fn label_selector(
    ctx: &mut Ctx,
    node: &MarkedYaml<'_>,
    what: &str,
    key: &mut KeyMapper<'_>,
) -> Option<Selector> {
    let m = Map::new(ctx, node, what)?;
    m.check_fields(ctx, what, &["matchLabels", "matchExpressions"]);
    let mut sel = Selector::default();
    if let Some(ml) = m.get("matchLabels") {
        let labels = Map::new(ctx, ml, "matchLabels")?;
        for (k, knode, v) in labels.entries() {
            let Some(val) = string(ctx, v, &format!("the value of label `{k}`")) else {
                continue;
            };
            match key(ctx, knode, k) {
                None => sel.reqs.push(Req::Never),
                Some(None) => {}
                Some(Some(lk)) => sel.reqs.push(Req::In(lk, vec![val])),
            }
        }
    }
    if let Some(me) = m.get("matchExpressions") {
        for e in seq(ctx, me, "`matchExpressions`") {
            let Some(em) = Map::new(ctx, e, "a match expression") else {
                continue;
            };
            em.check_fields(ctx, "a match expression", &["key", "operator", "values"]);
            let (Some(k), Some(op)) = (
                em.req_string(ctx, "key", "a match expression"),
                em.req_string(ctx, "operator", "a match expression"),
            ) else {
                continue;
            };
            let values: Vec<String> = match em.get("values") {
                Some(v) => seq(ctx, v, "`values`")
                    .iter()
                    .filter_map(|x| string(ctx, x, "a value"))
                    .collect(),
                None => Vec::new(),
            };
            let knode = em.get("key").unwrap_or(e);
            let lk = match key(ctx, knode, &k) {
                None => {
                    sel.reqs.push(Req::Never);
                    continue;
                }
                Some(None) => continue,
                Some(Some(lk)) => lk,
            };
            if !matches!(op.as_str(), "In" | "NotIn" | "Exists" | "DoesNotExist") {
                let opnode = em.get("operator").unwrap_or(e);
                ctx.error_at(
                    opnode,
                    format!("unknown operator `{op}`; expected In, NotIn, Exists or DoesNotExist"),
                );
                continue;
            }
            let needs_values = matches!(op.as_str(), "In" | "NotIn");
            if needs_values && values.is_empty() {
                ctx.error_at(
                    e,
                    format!("operator `{op}` needs a non-empty `values` list"),
                );
                continue;
            }
            if !needs_values && !values.is_empty() {
                ctx.error_at(e, format!("operator `{op}` takes no `values`"));
                continue;
            }
            sel.reqs.push(match op.as_str() {
                "In" => Req::In(lk, values),
                "NotIn" => Req::NotIn(lk, values),
                "Exists" => Req::Exists(lk),
                _ => Req::DoesNotExist(lk),
            });
        }
    }
    Some(sel)
}

/// Parses one Kubernetes NetworkPolicy.
pub fn parse_netpol(ctx: &mut Ctx, top: &Map<'_, '_>) -> Vec<ImportedPolicy> {
    top.check_fields(
        ctx,
        "NetworkPolicy",
        &["apiVersion", "kind", "metadata", "spec", "status"],
    );
    let (name, ns) = metadata(ctx, top, ImportKind::NetworkPolicy);
    let ns = ns.unwrap_or_else(|| "default".into());
    let Some(spec_node) = top.get("spec") else {
        ctx.error_at(top.node, "NetworkPolicy is missing `spec`");
        return Vec::new();
    };
    let Some(spec) = Map::new(ctx, spec_node, "spec") else {
        return Vec::new();
    };
    spec.check_fields(
        ctx,
        "NetworkPolicy spec",
        &["podSelector", "policyTypes", "ingress", "egress"],
    );
    let mut subject = match spec.get("podSelector") {
        Some(s) => match label_selector(ctx, s, "podSelector", &mut pod_key) {
            Some(s) => s,
            None => return Vec::new(),
        },
        // `podSelector: {}` parses as present; only a missing key is an error.
        None if spec.has("podSelector") => Selector::default(),
        None => {
            ctx.error_at(
                spec.node,
                "NetworkPolicy spec is missing `podSelector` (use `{}` for every pod)",
            );
            return Vec::new();
        }
    };
    subject
        .reqs
        .push(Req::In(LabelKey::Namespace, vec![ns.clone()]));
    let (mut ing_enf, mut egr_enf) = (true, spec.has("egress"));
    if let Some(pt) = spec.get("policyTypes") {
        ing_enf = false;
        egr_enf = false;
        for t in seq(ctx, pt, "`policyTypes`") {
            match string(ctx, t, "a policy type").as_deref() {
                Some("Ingress") => ing_enf = true,
                Some("Egress") => egr_enf = true,
                Some(other) => ctx.error_at(
                    t,
                    format!("unknown policy type `{other}`; expected Ingress or Egress"),
                ),
                None => {}
            }
        }
    }
    let mut ingress = DirectionRules {
        enforced: ing_enf,
        ..Default::default()
    };
    let mut egress = DirectionRules {
        enforced: egr_enf,
        ..Default::default()
    };
    for (key, peer_key, target) in [
        ("ingress", "from", &mut ingress),
        ("egress", "to", &mut egress),
    ] {
        let Some(list) = spec.get(key) else { continue };
        if !target.enforced {
            ctx.warn_at(list, format!("`{key}` rules are present but `policyTypes` leaves them out, so Kubernetes ignores them; so does flowaudit"));
            continue;
        }
        for item in seq(ctx, list, &format!("`{key}`")) {
            if let Some(r) = netpol_rule(ctx, item, peer_key, &ns) {
                target.allow.push(r);
            }
        }
    }
    let (line, col) = pos(top.node);
    vec![ImportedPolicy {
        kind: ImportKind::NetworkPolicy,
        namespace: Some(ns),
        name,
        subject,
        ingress,
        egress,
        origin: Origin {
            file: ctx.file.clone(),
            line,
            col,
        },
    }]
}

fn pod_key(_: &mut Ctx, _: &MarkedYaml<'_>, raw: &str) -> Option<Option<LabelKey>> {
    Some(Some(LabelKey::Pod(raw.to_string())))
}

fn ns_key(ctx: &mut Ctx, knode: &MarkedYaml<'_>, raw: &str) -> Option<Option<LabelKey>> {
    if raw == K8S_NS_LABEL {
        return Some(Some(LabelKey::Namespace));
    }
    ctx.warn_at(
        knode,
        format!("namespace label `{raw}` is not known to flowaudit (only `{K8S_NS_LABEL}` is): flows this selector decides get verdict UNKNOWN"),
    );
    Some(Some(LabelKey::NamespaceLabel(raw.to_string())))
}

fn netpol_rule(
    ctx: &mut Ctx,
    node: &MarkedYaml<'_>,
    peer_key: &str,
    ns: &str,
) -> Option<ImportedRule> {
    let what = if peer_key == "from" {
        "ingress rule"
    } else {
        "egress rule"
    };
    let m = Map::new(ctx, node, what)?;
    m.check_fields(ctx, what, &[peer_key, "ports"]);
    let mut peers = Vec::new();
    let peer_items = m
        .get(peer_key)
        .map(|l| seq(ctx, l, &format!("`{peer_key}`")))
        .unwrap_or(&[]);
    // No `from`/`to` (or an empty list) means every peer.
    if peer_items.is_empty() {
        peers.push(ImportedPeer::Any);
    }
    for p in peer_items {
        let Some(pm) = Map::new(ctx, p, "a peer") else {
            continue;
        };
        pm.check_fields(
            ctx,
            "a peer",
            &["podSelector", "namespaceSelector", "ipBlock"],
        );
        if let Some(ib) = pm.get("ipBlock") {
            let Some(ibm) = Map::new(ctx, ib, "ipBlock") else {
                continue;
            };
            ibm.check_fields(ctx, "ipBlock", &["cidr", "except"]);
            let cidr = ibm.req_string(ctx, "cidr", "ipBlock");
            match cidr.as_deref() {
                Some("0.0.0.0/0" | "::/0") if !ibm.has("except") => peers.push(ImportedPeer::Entity(Entity::All)),
                Some("0.0.0.0/0" | "::/0") => {
                    ctx.warn_at(ib, "`except` is not audited; this ipBlock is taken as all of `world`");
                    peers.push(ImportedPeer::Entity(Entity::World));
                }
                Some(_) => ctx.warn_at(ib, "ipBlock CIDRs other than 0.0.0.0/0 and ::/0 are not audited (flowaudit sees external addresses only as `world`); this peer matches no flow"),
                None => {}
            }
            continue;
        }
        let mut sel = Selector::default();
        if let Some(ps) = pm.get("podSelector") {
            match label_selector(ctx, ps, "podSelector", &mut pod_key) {
                Some(s) => sel.reqs.extend(s.reqs),
                None => continue,
            }
        }
        if pm.has("namespaceSelector") {
            if let Some(nsn) = pm.get("namespaceSelector") {
                match label_selector(ctx, nsn, "namespaceSelector", &mut ns_key) {
                    Some(s) => sel.reqs.extend(s.reqs),
                    None => continue,
                }
            }
        } else {
            sel.reqs
                .push(Req::In(LabelKey::Namespace, vec![ns.to_string()]));
        }
        if !pm.has("podSelector") && !pm.has("namespaceSelector") {
            ctx.error_at(
                p,
                "a peer needs `podSelector`, `namespaceSelector` or `ipBlock`",
            );
            continue;
        }
        peers.push(ImportedPeer::Endpoints(sel));
    }
    let ports = match m.get("ports") {
        None => PortSet::ANY,
        Some(list) => {
            let items = seq(ctx, list, "`ports`");
            if items.is_empty() {
                PortSet::ANY
            } else {
                let mut ranges = Vec::new();
                let mut any = false;
                for p in items {
                    let Some(pm) = Map::new(ctx, p, "a port") else {
                        continue;
                    };
                    pm.check_fields(ctx, "a port", &["port", "endPort", "protocol"]);
                    let proto = pm
                        .opt_string(ctx, "protocol", "a port")
                        .unwrap_or_else(|| "TCP".into());
                    match proto.as_str() {
                        "TCP" => {}
                        "UDP" | "SCTP" => continue,
                        other => {
                            ctx.error_at(
                                p,
                                format!("unknown protocol `{other}`; expected TCP, UDP or SCTP"),
                            );
                            continue;
                        }
                    }
                    match port_entry(ctx, &pm, false) {
                        Some(None) => any = true,
                        Some(Some(r)) => ranges.push(r),
                        None => {}
                    }
                }
                if any {
                    PortSet::ANY
                } else {
                    PortSet::of(ranges)
                }
            }
        }
    };
    Some(ImportedRule {
        peers,
        ports,
        auth_required: false,
    })
}
