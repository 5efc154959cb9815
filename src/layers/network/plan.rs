//! The desired Kubernetes objects of one organization's network isolation, built as pure data.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{LimitRange, ResourceQuota};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::reach::{IpRange, NAMESPACE_NAME_LABEL};
use crate::api::platform::{EgressTarget, NetworkMode, NetworkPlatform};
use crate::api::{MANAGED_BY, ORG_ID_LABEL, ORGANIZATION_LABEL};
use crate::layers::Tenant;

/// Standard label marking objects bulkhead manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Annotation carrying the hash of the whole plan the object was applied with; an object that
/// carries the current hash and still differs from the plan was changed by someone else.
pub const PLAN_ANNOTATION: &str = "bulkhead.dev/network-plan";

pub const DEFAULT_DENY: &str = "bulkhead-default-deny";
pub const ALLOW_SAME_NAMESPACE: &str = "bulkhead-allow-same-namespace";
pub const ALLOW_DNS: &str = "bulkhead-allow-dns";
pub const ALLOW_GATEWAYS: &str = "bulkhead-allow-gateways";
pub const EGRESS_PREFIX: &str = "bulkhead-egress-";
pub const RESOURCE_QUOTA: &str = "bulkhead-quota";
pub const LIMIT_RANGE: &str = "bulkhead-limits";

/// Longest egress target name, so that `bulkhead-egress-<name>` stays a short DNS label.
const MAX_TARGET_NAME: usize = 40;

/// One platform backend, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    pub name: String,
    pub peer: NetworkPolicyPeer,
    pub ports: Vec<i32>,
}

/// `NetworkPlatform`, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkConfig {
    pub mode: NetworkMode,
    pub shared_namespaces: Vec<String>,
    pub ingress_namespaces: Vec<String>,
    pub dns_namespace: String,
    pub backends: Vec<Backend>,
    /// Namespaces of backends given by namespace (trusted egress destinations).
    pub backend_namespaces: Vec<String>,
    pub pod_cidrs: Vec<IpRange>,
    /// Real packets beside the evaluator, when the platform asks for them.
    pub traffic: Option<super::traffic::TrafficConfig>,
}

fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn check_namespace(what: &str, ns: &str) -> Result<(), String> {
    if is_dns_label(ns, 63) {
        Ok(())
    } else {
        Err(format!("{what} {ns:?} is not a namespace name"))
    }
}

/// Validates the platform's network section; every problem is named.
pub fn validate(cfg: &NetworkPlatform) -> Result<NetworkConfig, String> {
    crate::tenant::check_namespace_template(&cfg.namespace_template)?;
    if cfg.mode == NetworkMode::SharedNamespace && cfg.shared_namespaces.is_empty() {
        return Err(
            "network mode sharedNamespace needs at least one of sharedNamespaces".to_owned(),
        );
    }
    for ns in &cfg.shared_namespaces {
        check_namespace("sharedNamespaces entry", ns)?;
    }
    for ns in &cfg.ingress_namespaces {
        check_namespace("ingressNamespaces entry", ns)?;
    }
    check_namespace("dnsNamespace", &cfg.dns_namespace)?;
    if cfg.pod_cidrs.is_empty() {
        return Err("podCidrs must name at least one CIDR".to_owned());
    }
    let pod_cidrs = cfg
        .pod_cidrs
        .iter()
        .map(|c| IpRange::parse_cidr(c).map_err(|e| format!("podCidrs: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut backends = Vec::new();
    let mut backend_namespaces = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for t in &cfg.egress {
        let b = backend(t, &cfg.pod_cidrs, &pod_cidrs)?;
        if !seen.insert(t.name.clone()) {
            return Err(format!("egress target name {:?} is used twice", t.name));
        }
        if let Some(ns) = &t.namespace {
            backend_namespaces.push(ns.clone());
        }
        backends.push(b);
    }
    let traffic = cfg
        .traffic_probe
        .as_ref()
        .map(|t| super::traffic::validate(t, cfg.mode))
        .transpose()?;
    Ok(NetworkConfig {
        traffic,
        mode: cfg.mode,
        shared_namespaces: cfg.shared_namespaces.clone(),
        ingress_namespaces: cfg.ingress_namespaces.clone(),
        dns_namespace: cfg.dns_namespace.clone(),
        backends,
        backend_namespaces,
        pod_cidrs,
    })
}

fn backend(
    t: &EgressTarget,
    pod_cidr_text: &[String],
    pod_cidrs: &[IpRange],
) -> Result<Backend, String> {
    if !is_dns_label(&t.name, MAX_TARGET_NAME) {
        return Err(format!(
            "egress target name {:?} must be 1-{MAX_TARGET_NAME} lowercase letters, digits or '-'",
            t.name
        ));
    }
    if let Some(p) = t.ports.iter().find(|p| !(1..=65535).contains(*p)) {
        return Err(format!(
            "egress target {:?} has port {p} outside 1-65535",
            t.name
        ));
    }
    let peer = match (&t.namespace, &t.cidr) {
        (Some(ns), None) => {
            check_namespace(&format!("egress target {:?} namespace", t.name), ns)?;
            NetworkPolicyPeer {
                namespace_selector: Some(names_selector(std::slice::from_ref(ns))),
                pod_selector: Some(LabelSelector {
                    match_labels: (!t.pod_labels.is_empty()).then(|| t.pod_labels.clone()),
                    match_expressions: None,
                }),
                ip_block: None,
            }
        }
        (None, Some(cidr)) => {
            if !t.pod_labels.is_empty() {
                return Err(format!(
                    "egress target {:?}: podLabels need a namespace, not a CIDR",
                    t.name
                ));
            }
            let range = IpRange::parse_cidr(cidr)
                .map_err(|e| format!("egress target {:?}: {e}", t.name))?;
            // A wide CIDR would open every pod of the cluster; carve the pod network out of it.
            let except: Vec<String> = pod_cidrs
                .iter()
                .zip(pod_cidr_text)
                .filter(|(p, _)| p.within(&range) && **p != range)
                .map(|(_, text)| text.clone())
                .collect();
            NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: cidr.clone(),
                    except: (!except.is_empty()).then_some(except),
                }),
                namespace_selector: None,
                pod_selector: None,
            }
        }
        (Some(_), Some(_)) => {
            return Err(format!(
                "egress target {:?} names both a namespace and a CIDR; give one",
                t.name
            ));
        }
        (None, None) => {
            return Err(format!(
                "egress target {:?} needs a namespace or a CIDR",
                t.name
            ));
        }
    };
    Ok(Backend {
        name: t.name.clone(),
        peer,
        ports: t.ports.clone(),
    })
}

/// Selects namespaces by name (the label the API server sets on every namespace).
fn names_selector(names: &[String]) -> LabelSelector {
    if let [one] = names {
        return LabelSelector {
            match_labels: Some(BTreeMap::from([(
                NAMESPACE_NAME_LABEL.to_owned(),
                one.clone(),
            )])),
            match_expressions: None,
        };
    }
    LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: NAMESPACE_NAME_LABEL.to_owned(),
            operator: "In".to_owned(),
            values: Some(names.to_vec()),
        }]),
    }
}

fn org_pods(tenant: &Tenant) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(
            ORG_ID_LABEL.to_owned(),
            tenant.org_id.to_string(),
        )])),
        match_expressions: None,
    }
}

fn all() -> LabelSelector {
    LabelSelector::default()
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some("TCP".to_owned()),
        port: Some(IntOrString::Int(port)),
        end_port: None,
    }
}

fn udp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some("UDP".to_owned()),
        port: Some(IntOrString::Int(port)),
        end_port: None,
    }
}

fn dns_rule(cfg: &NetworkConfig) -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule {
        to: Some(vec![NetworkPolicyPeer {
            namespace_selector: Some(names_selector(std::slice::from_ref(&cfg.dns_namespace))),
            ..Default::default()
        }]),
        ports: Some(vec![udp(53), tcp(53)]),
    }
}

fn backend_rule(b: &Backend) -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule {
        to: Some(vec![b.peer.clone()]),
        ports: (!b.ports.is_empty()).then(|| b.ports.iter().copied().map(tcp).collect()),
    }
}

fn gateway_rule(cfg: &NetworkConfig) -> Option<NetworkPolicyIngressRule> {
    (!cfg.ingress_namespaces.is_empty()).then(|| NetworkPolicyIngressRule {
        from: Some(vec![NetworkPolicyPeer {
            namespace_selector: Some(names_selector(&cfg.ingress_namespaces)),
            ..Default::default()
        }]),
        ports: None,
    })
}

fn spec(
    selects: LabelSelector,
    ingress: Option<Vec<NetworkPolicyIngressRule>>,
    egress: Option<Vec<NetworkPolicyEgressRule>>,
) -> NetworkPolicySpec {
    let mut types = Vec::new();
    if ingress.is_some() {
        types.push("Ingress".to_owned());
    }
    if egress.is_some() {
        types.push("Egress".to_owned());
    }
    NetworkPolicySpec {
        pod_selector: Some(selects),
        // Empty lists are sent so that bulkhead owns the fields and a forced apply clears them.
        ingress: Some(ingress.unwrap_or_default()),
        egress: Some(egress.unwrap_or_default()),
        policy_types: Some(types),
    }
}

/// Where the organization's pods run: its namespace, or the shared namespaces.
pub fn pod_namespaces(cfg: &NetworkConfig, tenant: &Tenant) -> Vec<String> {
    match cfg.mode {
        NetworkMode::Namespace => vec![tenant.namespace.clone()],
        NetworkMode::SharedNamespace => cfg.shared_namespaces.clone(),
    }
}

/// Name of an organization's policy in a shared namespace.
pub fn shared_policy_name(tenant: &Tenant) -> String {
    format!("bulkhead-{}-isolation", tenant.org_id)
}

/// Every object the organization's network isolation consists of.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkPlan {
    pub policies: Vec<NetworkPolicy>,
    pub resource_quota: Option<ResourceQuota>,
    pub limit_range: Option<LimitRange>,
    /// Hash of the whole plan, carried by every object in [`PLAN_ANNOTATION`].
    pub hash: String,
}

/// Labels on every object bulkhead creates for the organization.
pub fn labels(tenant: &Tenant) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        (ORG_ID_LABEL.to_owned(), tenant.org_id.to_string()),
        (ORGANIZATION_LABEL.to_owned(), tenant.name.clone()),
    ])
}

/// Label selector that finds every object bulkhead manages for the organization.
pub fn managed_selector(tenant: &Tenant) -> String {
    format!(
        "{MANAGED_BY_LABEL}={MANAGED_BY},{ORG_ID_LABEL}={}",
        tenant.org_id
    )
}

fn meta(tenant: &Tenant, namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels(tenant)),
        owner_references: Some(vec![tenant.owner.clone()]),
        ..Default::default()
    }
}

fn policy(tenant: &Tenant, namespace: &str, name: &str, spec: NetworkPolicySpec) -> NetworkPolicy {
    NetworkPolicy {
        metadata: meta(tenant, namespace, name),
        spec: Some(spec),
    }
}

/// Builds the organization's objects. Pure: the same inputs give the same plan and hash.
pub fn plan(cfg: &NetworkConfig, tenant: &Tenant) -> NetworkPlan {
    let mut policies = Vec::new();
    match cfg.mode {
        NetworkMode::Namespace => {
            let ns = tenant.namespace.as_str();
            policies.push(policy(
                tenant,
                ns,
                DEFAULT_DENY,
                spec(all(), Some(vec![]), Some(vec![])),
            ));
            let same = NetworkPolicyPeer {
                pod_selector: Some(all()),
                ..Default::default()
            };
            policies.push(policy(
                tenant,
                ns,
                ALLOW_SAME_NAMESPACE,
                spec(
                    all(),
                    Some(vec![NetworkPolicyIngressRule {
                        from: Some(vec![same.clone()]),
                        ports: None,
                    }]),
                    Some(vec![NetworkPolicyEgressRule {
                        to: Some(vec![same]),
                        ports: None,
                    }]),
                ),
            ));
            policies.push(policy(
                tenant,
                ns,
                ALLOW_DNS,
                spec(all(), None, Some(vec![dns_rule(cfg)])),
            ));
            if let Some(rule) = gateway_rule(cfg) {
                policies.push(policy(
                    tenant,
                    ns,
                    ALLOW_GATEWAYS,
                    spec(all(), Some(vec![rule]), None),
                ));
            }
            for b in &cfg.backends {
                let name = format!("{EGRESS_PREFIX}{}", b.name);
                policies.push(policy(
                    tenant,
                    ns,
                    &name,
                    spec(all(), None, Some(vec![backend_rule(b)])),
                ));
            }
        }
        NetworkMode::SharedNamespace => {
            // The organization's pods in any shared namespace, and only those.
            let own = NetworkPolicyPeer {
                namespace_selector: Some(names_selector(&cfg.shared_namespaces)),
                pod_selector: Some(org_pods(tenant)),
                ip_block: None,
            };
            let mut ingress = vec![NetworkPolicyIngressRule {
                from: Some(vec![own.clone()]),
                ports: None,
            }];
            ingress.extend(gateway_rule(cfg));
            let mut egress = vec![
                NetworkPolicyEgressRule {
                    to: Some(vec![own]),
                    ports: None,
                },
                dns_rule(cfg),
            ];
            egress.extend(cfg.backends.iter().map(backend_rule));
            let name = shared_policy_name(tenant);
            for ns in &cfg.shared_namespaces {
                policies.push(policy(
                    tenant,
                    ns,
                    &name,
                    spec(
                        org_pods(tenant),
                        Some(ingress.clone()),
                        Some(egress.clone()),
                    ),
                ));
            }
        }
    }
    let resource_quota = tenant.resource_quota.clone().map(|spec| ResourceQuota {
        metadata: meta(tenant, &tenant.namespace, RESOURCE_QUOTA),
        spec: Some(spec),
        status: None,
    });
    let limit_range = tenant.limit_range.clone().map(|spec| LimitRange {
        metadata: meta(tenant, &tenant.namespace, LIMIT_RANGE),
        spec: Some(spec),
    });
    let mut plan = NetworkPlan {
        policies,
        resource_quota,
        limit_range,
        hash: String::new(),
    };
    plan.hash = plan_hash(&plan);
    let hash = plan.hash.clone();
    let stamp = |m: &mut ObjectMeta| {
        m.annotations = Some(BTreeMap::from([(PLAN_ANNOTATION.to_owned(), hash.clone())]));
    };
    plan.policies
        .iter_mut()
        .for_each(|p| stamp(&mut p.metadata));
    plan.resource_quota
        .iter_mut()
        .for_each(|q| stamp(&mut q.metadata));
    plan.limit_range
        .iter_mut()
        .for_each(|l| stamp(&mut l.metadata));
    plan
}

fn plan_hash(plan: &NetworkPlan) -> String {
    let value = serde_json::json!([plan.policies, plan.resource_quota, plan.limit_range]);
    let digest = Sha256::digest(value.to_string().as_bytes());
    hex::encode(&digest[..8])
}

/// A NetworkPolicy spec in a form where what the API server fills in or drops (default
/// protocol, empty lists, `policyTypes`) no longer makes two equivalent specs differ.
pub fn normalize(spec: &NetworkPolicySpec) -> Value {
    let mut s = spec.clone();
    if s.policy_types.as_ref().is_none_or(Vec::is_empty) {
        let mut types = vec!["Ingress".to_owned()];
        if s.egress.as_ref().is_some_and(|e| !e.is_empty()) {
            types.push("Egress".to_owned());
        }
        s.policy_types = Some(types);
    }
    if s.pod_selector.is_none() {
        s.pod_selector = Some(LabelSelector::default());
    }
    let default_tcp = |ports: &mut Option<Vec<NetworkPolicyPort>>| {
        for p in ports.iter_mut().flatten() {
            p.protocol.get_or_insert_with(|| "TCP".to_owned());
        }
    };
    s.ingress
        .iter_mut()
        .flatten()
        .for_each(|r| default_tcp(&mut r.ports));
    s.egress
        .iter_mut()
        .flatten()
        .for_each(|r| default_tcp(&mut r.ports));
    let mut v = serde_json::to_value(&s).unwrap_or(Value::Null);
    strip_empty(&mut v);
    v
}

/// Drops nulls, empty lists and empty `matchLabels`; keeps empty selectors (`{}` means "all").
fn strip_empty(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.values_mut().for_each(strip_empty);
            map.retain(|k, v| match v {
                Value::Null => false,
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) if k == "matchLabels" => !o.is_empty(),
                _ => true,
            });
        }
        Value::Array(a) => a.iter_mut().for_each(strip_empty),
        _ => {}
    }
}

/// Whether a live policy has the planned spec.
pub fn same_spec(live: &NetworkPolicy, planned: &NetworkPolicy) -> bool {
    let empty = NetworkPolicySpec::default();
    normalize(live.spec.as_ref().unwrap_or(&empty))
        == normalize(planned.spec.as_ref().unwrap_or(&empty))
}

/// Whether a live object carries what bulkhead requires of its metadata: its labels, the owner
/// reference and the plan hash.
pub fn same_meta(live: &ObjectMeta, planned: &ObjectMeta) -> bool {
    let has_all = |want: &Option<BTreeMap<String, String>>,
                   got: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| got.as_ref().and_then(|g| g.get(k)) == Some(v))
    };
    let owned = planned.owner_references.iter().flatten().all(|want| {
        live.owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == want.uid && o.kind == want.kind && o.name == want.name)
    });
    has_all(&planned.labels, &live.labels)
        && has_all(&planned.annotations, &live.annotations)
        && owned
}

#[cfg(test)]
pub(crate) mod tests;
