//! A pure reachability evaluator that follows Kubernetes NetworkPolicy semantics.
//!
//! It answers questions about *sets* of pods, not only single pods: an adversary controls its
//! own pods' labels (and may control its namespace's), so "can any pod of namespace B, whatever
//! its labels, reach any pod of namespace A" is decided by satisfiability over label
//! constraints. Concrete pods are the special case of a closed label set.
//!
//! Semantics implemented (networking.k8s.io/v1):
//! - A pod is isolated for a direction when at least one policy of its namespace with that
//!   policy type selects it; otherwise that direction is allowed.
//! - For an isolated pod, traffic is allowed when any selecting policy has a rule whose ports
//!   and peers match (the union of all rules). A rule without peers matches every peer; a rule
//!   without ports matches every port.
//! - A peer with only `podSelector` means pods of the policy's own namespace; with only
//!   `namespaceSelector`, every pod of the matching namespaces; with both, pods matching both.
//!   Several peers are OR-ed. `{}` selects everything.
//! - `ipBlock` matches by address, minus `except`. Pod addresses are matched too (what most
//!   CNIs do for pod IPs is implementation-defined; assuming a match is the safe reading).
//! - `policyTypes` absent: Ingress, plus Egress when the policy has egress rules.
//! - Ports: protocol (default TCP), a number with optional `endPort`, or a named container port
//!   of the destination pod.
//! - Connections need both the source's egress and the destination's ingress to allow them.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, btree_map};
use std::iter::Peekable;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

mod orgs;
pub use orgs::{Group, LabelledNamespaces};

/// Label that the API server sets on every namespace to its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Work bound for the search for a pod that no policy selects; beyond it the answer is "maybe",
/// which the evaluator treats as "yes" (the safe side).
const ESCAPE_BUDGET: usize = 100_000;

// ---------------------------------------------------------------------------------------------
// Label constraints
// ---------------------------------------------------------------------------------------------

/// Values a label may take: a finite set, or anything but a finite set.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Values {
    Only(BTreeSet<String>),
    AllBut(BTreeSet<String>),
}

impl Values {
    fn intersect(&self, other: &Values) -> Values {
        match (self, other) {
            (Values::Only(a), Values::Only(b)) => {
                Values::Only(a.intersection(b).cloned().collect())
            }
            (Values::Only(a), Values::AllBut(b)) | (Values::AllBut(b), Values::Only(a)) => {
                Values::Only(a.difference(b).cloned().collect())
            }
            (Values::AllBut(a), Values::AllBut(b)) => Values::AllBut(a.union(b).cloned().collect()),
        }
    }
    fn complement(&self) -> Values {
        match self {
            Values::Only(a) => Values::AllBut(a.clone()),
            Values::AllBut(a) => Values::Only(a.clone()),
        }
    }
    fn is_empty(&self) -> bool {
        // Label values are practically unbounded, so "all but a finite set" is never empty.
        matches!(self, Values::Only(a) if a.is_empty())
    }
}

/// The states one label key may be in: absent, and/or present with some values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyDomain {
    absent: bool,
    values: Values,
}

impl KeyDomain {
    /// Any state.
    pub fn any() -> Self {
        Self {
            absent: true,
            values: Values::AllBut(BTreeSet::new()),
        }
    }
    /// Present with exactly this value.
    pub fn equals(v: &str) -> Self {
        Self::one_of([v])
    }
    /// Present with one of these values (`In`).
    pub fn one_of<'a>(vs: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            absent: false,
            values: Values::Only(vs.into_iter().map(str::to_owned).collect()),
        }
    }
    /// Absent, or present with none of these values (`NotIn`).
    pub fn not_in<'a>(vs: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            absent: true,
            values: Values::AllBut(vs.into_iter().map(str::to_owned).collect()),
        }
    }
    /// Present with none of these values.
    pub fn present_but<'a>(vs: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            absent: false,
            values: Values::AllBut(vs.into_iter().map(str::to_owned).collect()),
        }
    }
    /// Present with any value (`Exists`).
    pub fn exists() -> Self {
        Self::present_but([])
    }
    /// Absent (`DoesNotExist`).
    pub fn absent() -> Self {
        Self {
            absent: true,
            values: Values::Only(BTreeSet::new()),
        }
    }
    fn intersect(&self, other: &KeyDomain) -> KeyDomain {
        KeyDomain {
            absent: self.absent && other.absent,
            values: self.values.intersect(&other.values),
        }
    }
    fn complement(&self) -> KeyDomain {
        KeyDomain {
            absent: !self.absent,
            values: self.values.complement(),
        }
    }
    fn is_empty(&self) -> bool {
        !self.absent && self.values.is_empty()
    }
}

/// A set of label maps. Open: keys without a constraint may hold anything (someone else picks
/// the labels). Closed: keys without a constraint are absent (a concrete object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSpace {
    keys: BTreeMap<String, KeyDomain>,
    closed: bool,
}

impl LabelSpace {
    /// Every label map: labels chosen by an adversary.
    pub fn any() -> Self {
        Self {
            keys: BTreeMap::new(),
            closed: false,
        }
    }
    /// Exactly these labels.
    pub fn exactly(labels: &BTreeMap<String, String>) -> Self {
        Self {
            keys: labels
                .iter()
                .map(|(k, v)| (k.clone(), KeyDomain::equals(v)))
                .collect(),
            closed: true,
        }
    }
    /// Adds a constraint on one key.
    pub fn with(mut self, key: &str, domain: KeyDomain) -> Self {
        let d = self.domain(key).intersect(&domain);
        self.keys.insert(key.to_owned(), d);
        self
    }
    fn domain(&self, key: &str) -> KeyDomain {
        match self.keys.get(key) {
            Some(d) => d.clone(),
            None if self.closed => KeyDomain::absent(),
            None => KeyDomain::any(),
        }
    }
    /// Whether the set holds at least one label map.
    pub fn is_empty(&self) -> bool {
        self.keys.values().any(KeyDomain::is_empty)
    }
    /// Whether some label map of the set matches the selector.
    pub fn admits(&self, sel: &Selector) -> bool {
        !self.is_empty()
            && sel
                .0
                .iter()
                .all(|(k, d)| !self.domain(k).intersect(d).is_empty())
    }
    /// Whether some label map of the set matches none of the selectors.
    fn escapes(&self, sels: &[&Selector], budget: &mut usize) -> bool {
        if self.is_empty() {
            return false;
        }
        let Some((first, rest)) = sels.split_first() else {
            return true;
        };
        for (k, d) in &first.0 {
            if *budget == 0 {
                return true;
            }
            *budget -= 1;
            let narrowed = self.clone().with(k, d.complement());
            if narrowed.escapes(rest, budget) {
                return true;
            }
        }
        false
    }
}

/// A label selector as a conjunction of per-key domains. `{}` (no constraint) selects all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector(BTreeMap<String, KeyDomain>);

impl Selector {
    /// Parses a `LabelSelector`; an unknown operator or a malformed requirement is an error.
    pub fn parse(sel: &LabelSelector) -> Result<Self, String> {
        let mut keys: BTreeMap<String, KeyDomain> = BTreeMap::new();
        let mut add = |k: &str, d: KeyDomain| {
            let merged = keys.get(k).map_or(d.clone(), |old| old.intersect(&d));
            keys.insert(k.to_owned(), merged);
        };
        for (k, v) in sel.match_labels.iter().flatten() {
            add(k, KeyDomain::equals(v));
        }
        for req in sel.match_expressions.iter().flatten() {
            let values = req.values.as_deref().unwrap_or_default();
            let vs = values.iter().map(String::as_str);
            let d = match req.operator.as_str() {
                "In" if !values.is_empty() => KeyDomain::one_of(vs),
                "NotIn" if !values.is_empty() => KeyDomain::not_in(vs),
                "Exists" if values.is_empty() => KeyDomain::exists(),
                "DoesNotExist" if values.is_empty() => KeyDomain::absent(),
                op => {
                    return Err(format!(
                        "unsupported selector requirement {:?} {op} {values:?}",
                        req.key
                    ));
                }
            };
            add(&req.key, d);
        }
        Ok(Self(keys))
    }
    /// Selects everything.
    pub fn everything() -> Self {
        Self(BTreeMap::new())
    }
}

// ---------------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------------

/// An inclusive range of addresses of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IpRange {
    v6: bool,
    start: u128,
    end: u128,
}

impl IpRange {
    /// Parses `a.b.c.d/n` or `x::y/n` (a bare address is a /32 or /128). Host bits are ignored.
    pub fn parse_cidr(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR"))?;
        let (v6, bits, value) = match ip {
            IpAddr::V4(v4) => (false, 32u32, u128::from(u32::from(v4))),
            IpAddr::V6(v6) => (true, 128u32, u128::from(v6)),
        };
        let len = match len {
            Some(l) => l
                .trim()
                .parse::<u32>()
                .map_err(|_| format!("{s:?} has a bad prefix length"))?,
            None => bits,
        };
        if len > bits {
            return Err(format!("{s:?} has a prefix longer than {bits} bits"));
        }
        let host_bits = bits - len;
        let host_mask = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        let start = value & !host_mask;
        Ok(Self {
            v6,
            start,
            end: start | host_mask,
        })
    }
    fn intersect(&self, o: &IpRange) -> Option<IpRange> {
        if self.v6 != o.v6 || self.end < o.start || o.end < self.start {
            return None;
        }
        Some(IpRange {
            v6: self.v6,
            start: self.start.max(o.start),
            end: self.end.min(o.end),
        })
    }
    /// Whether `self` lies entirely inside `o`.
    pub fn within(&self, o: &IpRange) -> bool {
        self.v6 == o.v6 && o.start <= self.start && self.end <= o.end
    }
    /// Whether the two ranges share an address.
    pub fn overlaps(&self, o: &IpRange) -> bool {
        self.intersect(o).is_some()
    }
}

/// A set of addresses, e.g. the cluster's pod CIDRs or one pod's IP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddrSet(Vec<IpRange>);

impl AddrSet {
    pub fn new(ranges: Vec<IpRange>) -> Self {
        Self(ranges)
    }
    /// Parses CIDRs; the first bad one is the error.
    pub fn parse<'a>(cidrs: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        cidrs
            .into_iter()
            .map(IpRange::parse_cidr)
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }
    /// Whether some address of the set lies in `block` and in none of `except`.
    pub fn meets_block(&self, block: &IpRange, except: &[IpRange]) -> bool {
        self.0
            .iter()
            .filter_map(|r| r.intersect(block))
            .any(|clip| {
                let mut holes: Vec<IpRange> =
                    except.iter().filter_map(|e| e.intersect(&clip)).collect();
                holes.sort();
                let mut cur = clip.start;
                for h in holes {
                    if h.start > cur {
                        return true;
                    }
                    match h.end.checked_add(1) {
                        Some(next) => cur = cur.max(next),
                        None => return false,
                    }
                }
                cur <= clip.end
            })
    }
}

// ---------------------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum PortRef {
    All,
    Range(i32, i32),
    Named(String),
}

#[derive(Clone, Debug)]
struct PortRule {
    protocol: String,
    port: PortRef,
}

#[derive(Clone, Debug)]
enum Peer {
    Block {
        cidr: IpRange,
        except: Vec<IpRange>,
    },
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
}

#[derive(Clone, Debug)]
struct Rule {
    /// `None`: every peer.
    peers: Option<Vec<Peer>>,
    /// Empty: every port.
    ports: Vec<PortRule>,
}

/// A NetworkPolicy as the evaluator reads it.
#[derive(Clone, Debug)]
struct Policy {
    id: String,
    namespace: String,
    selects: Selector,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
}

fn parse_port(p: &NetworkPolicyPort) -> Result<PortRule, String> {
    let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
    let port = match (&p.port, p.end_port) {
        (None, _) => PortRef::All,
        (Some(IntOrString::Int(n)), None) => PortRef::Range(*n, *n),
        (Some(IntOrString::Int(n)), Some(e)) => PortRef::Range(*n, e.max(*n)),
        (Some(IntOrString::String(s)), _) => match s.parse::<i32>() {
            Ok(n) => PortRef::Range(n, p.end_port.unwrap_or(n).max(n)),
            Err(_) => PortRef::Named(s.clone()),
        },
    };
    Ok(PortRule { protocol, port })
}

fn parse_peer(p: &NetworkPolicyPeer) -> Result<Peer, String> {
    if let Some(b) = &p.ip_block {
        if p.namespace_selector.is_some() || p.pod_selector.is_some() {
            return Err("a peer with ipBlock also has selectors".to_owned());
        }
        let cidr = IpRange::parse_cidr(&b.cidr)?;
        let except = b
            .except
            .iter()
            .flatten()
            .map(|e| IpRange::parse_cidr(e))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Peer::Block { cidr, except });
    }
    if p.namespace_selector.is_none() && p.pod_selector.is_none() {
        return Err("a peer without ipBlock, namespaceSelector or podSelector".to_owned());
    }
    Ok(Peer::Pods {
        namespaces: p
            .namespace_selector
            .as_ref()
            .map(Selector::parse)
            .transpose()?,
        pods: p.pod_selector.as_ref().map(Selector::parse).transpose()?,
    })
}

fn parse_rule(
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
) -> Result<Rule, String> {
    let peers = match peers {
        Some(list) if !list.is_empty() => {
            Some(list.iter().map(parse_peer).collect::<Result<Vec<_>, _>>()?)
        }
        _ => None,
    };
    let ports = ports
        .into_iter()
        .flatten()
        .map(parse_port)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Rule { peers, ports })
}

fn parse_policy(np: &NetworkPolicy) -> Result<Policy, String> {
    let namespace = np.metadata.namespace.clone().unwrap_or_default();
    let id = format!(
        "{namespace}/{}",
        np.metadata.name.clone().unwrap_or_default()
    );
    let spec = np.spec.clone().unwrap_or_default();
    let selects = spec
        .pod_selector
        .as_ref()
        .map(Selector::parse)
        .transpose()?
        .unwrap_or_else(Selector::everything);
    let has_egress_rules = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let (ingress_type, egress_type) = match &spec.policy_types {
        Some(types) if !types.is_empty() => {
            for t in types {
                if t != "Ingress" && t != "Egress" {
                    return Err(format!("unknown policy type {t:?}"));
                }
            }
            (
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
            )
        }
        _ => (true, has_egress_rules),
    };
    let ingress = if ingress_type {
        Some(
            spec.ingress
                .iter()
                .flatten()
                .map(|r| parse_rule(r.from.as_ref(), r.ports.as_ref()))
                .collect::<Result<Vec<_>, _>>()?,
        )
    } else {
        None
    };
    let egress = if egress_type {
        Some(
            spec.egress
                .iter()
                .flatten()
                .map(|r| parse_rule(r.to.as_ref(), r.ports.as_ref()))
                .collect::<Result<Vec<_>, _>>()?,
        )
    } else {
        None
    };
    Ok(Policy {
        id,
        namespace,
        selects,
        ingress,
        egress,
    })
}

/// A policy the evaluator cannot read stands for the worst case: it selects every pod of its
/// namespace and allows everything, in both directions.
fn unreadable_policy(np: &NetworkPolicy) -> Policy {
    let namespace = np.metadata.namespace.clone().unwrap_or_default();
    let id = format!(
        "{namespace}/{}",
        np.metadata.name.clone().unwrap_or_default()
    );
    let all = || {
        Some(vec![Rule {
            peers: None,
            ports: Vec::new(),
        }])
    };
    Policy {
        id,
        namespace,
        selects: Selector::everything(),
        ingress: all(),
        egress: all(),
    }
}

// ---------------------------------------------------------------------------------------------
// Endpoints and questions
// ---------------------------------------------------------------------------------------------

/// The namespace of a set of pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceRef {
    /// A namespace of the cluster: its labels and its policies are known.
    Known(String),
    /// A namespace the evaluator does not know, with these possible labels and no policies of its
    /// own (an adversary's namespace allows all of its own egress and ingress).
    Unknown(LabelSpace),
}

/// A set of pods: one namespace, labels from a label space, addresses from a set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSet {
    pub namespace: NamespaceRef,
    pub labels: LabelSpace,
    pub addresses: AddrSet,
    /// Named container ports of the pods (`name` → protocol, number). `None`: unknown, any name may
    /// exist (pods someone else defines).
    pub named_ports: Option<NamedPorts>,
}

/// Named container ports: name → (protocol, number).
pub type NamedPorts = BTreeMap<String, (String, i32)>;

impl PodSet {
    /// Any pod of a known namespace, whatever its labels, with an address in `addresses`.
    pub fn any_in(namespace: &str, addresses: AddrSet) -> Self {
        Self {
            namespace: NamespaceRef::Known(namespace.to_owned()),
            labels: LabelSpace::any(),
            addresses,
            named_ports: None,
        }
    }
}

/// One end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Pods(PodSet),
    /// Addresses outside the cluster's pods (selectors never match them).
    External(AddrSet),
}

/// The destination port of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Port {
    /// Some port: the question is whether any traffic at all gets through.
    Any,
    Number {
        protocol: String,
        port: i32,
    },
}

impl Port {
    pub fn tcp(port: i32) -> Self {
        Self::Number {
            protocol: "TCP".to_owned(),
            port,
        }
    }
    pub fn udp(port: i32) -> Self {
        Self::Number {
            protocol: "UDP".to_owned(),
            port,
        }
    }
}

/// One side's answer (the source's egress, or the destination's ingress).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Side {
    pub allowed: bool,
    /// Some pods of the set are selected by no policy of that direction, so everything is allowed.
    pub unisolated: bool,
    /// Policies (`namespace/name`) that allow the traffic.
    pub allowed_by: Vec<String>,
}

impl Side {
    fn unrestricted() -> Self {
        Self {
            allowed: true,
            unisolated: true,
            allowed_by: Vec::new(),
        }
    }
}

/// Both sides of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Path {
    pub egress: Side,
    pub ingress: Side,
}

impl Path {
    pub fn reachable(&self) -> bool {
        self.egress.allowed && self.ingress.allowed
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

/// A namespace's labels.
type Labels = BTreeMap<String, String>;

/// Every NetworkPolicy and namespace of a cluster, read for reachability questions.
///
/// Either read whole ([`Cluster::new`]), or a view over a shared cluster ([`Cluster::over`]):
/// a view holds only what was read again since (namespaces' labels, whole namespaces'
/// policies) and answers from the shared cluster for everything else, exactly as a copy of it
/// with those reads written in would. The shared cluster is never copied nor changed, and
/// cloning a view copies only its own reads.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// The cluster this one is a view over; never a view itself.
    base: Option<Arc<Cluster>>,
    /// Labels by namespace. In a view, a namespace here hides the base's labels for it.
    namespaces: BTreeMap<String, Labels>,
    /// Policies by namespace: a question only ever reads one namespace's. In a view, a namespace
    /// here (even with no policy) was read again: none of the base's policies in it count.
    policies: BTreeMap<String, Vec<Policy>>,
    /// Policies of `policies` that could not be read (`namespace/name`, why).
    unreadable: Vec<(String, String)>,
    /// Groupings of `namespaces`, built when first asked for ([`Cluster::labelled_namespaces`]);
    /// they read labels only, and every change of labels drops them.
    indexes: orgs::Indexes,
}

impl Cluster {
    /// Reads namespaces (name → labels) and policies. The `kubernetes.io/metadata.name` label is
    /// added where missing, as the API server does.
    pub fn new(
        namespaces: impl IntoIterator<Item = (String, BTreeMap<String, String>)>,
        policies: &[NetworkPolicy],
    ) -> Self {
        let mut c = Self::default();
        for (name, labels) in namespaces {
            c.set_namespace(&name, labels);
        }
        for np in policies {
            c.add_policy(np);
        }
        c
    }

    /// Records (or replaces) a namespace's labels.
    pub fn set_namespace(&mut self, name: &str, mut labels: BTreeMap<String, String>) {
        labels
            .entry(NAMESPACE_NAME_LABEL.to_owned())
            .or_insert_with(|| name.to_owned());
        self.indexes.clear();
        self.namespaces.insert(name.to_owned(), labels);
    }

    /// A view over `base` that has read nothing yet: it answers as `base` until namespaces are
    /// read again into it with [`set_namespace`](Self::set_namespace) and
    /// [`replace_policies`](Self::replace_policies). Nothing of `base` is copied. A view over a
    /// view shares that view's base and starts with a copy of that view's own reads.
    pub fn over(base: Arc<Cluster>) -> Self {
        if base.base.is_some() {
            return Cluster::clone(&base);
        }
        Self {
            base: Some(base),
            ..Self::default()
        }
    }

    /// Replaces every policy of `namespace` with `policies` (a fresher read of that namespace).
    pub fn replace_policies(&mut self, namespace: &str, policies: &[NetworkPolicy]) {
        // Kept even when empty: in a view it hides the base's policies of the namespace.
        self.policies.insert(namespace.to_owned(), Vec::new());
        self.unreadable
            .retain(|(id, _)| !in_namespace(id, namespace));
        for np in policies
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
        {
            self.add_policy(np);
        }
    }

    fn add_policy(&mut self, np: &NetworkPolicy) {
        match parse_policy(np) {
            Ok(p) => self
                .policies
                .entry(p.namespace.clone())
                .or_default()
                .push(p),
            Err(e) => {
                let p = unreadable_policy(np);
                self.unreadable.push((p.id.clone(), e));
                self.policies
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p);
            }
        }
    }

    /// Policies that could not be read (`namespace/name`, why); each is taken to allow everything.
    /// A view lists the base's, bar those of the namespaces it read again, then its own.
    pub fn unreadable(&self) -> impl Iterator<Item = &(String, String)> {
        let inherited = self
            .base
            .iter()
            .flat_map(|b| &b.unreadable)
            .filter(|(id, _)| {
                !self
                    .policies
                    .keys()
                    .any(|namespace| in_namespace(id, namespace))
            });
        inherited.chain(&self.unreadable)
    }

    /// Names of the known namespaces with their labels, in name order. A view merges its own
    /// with its base's as it goes, without copying either.
    pub fn namespaces(&self) -> impl Iterator<Item = (&String, &Labels)> {
        Namespaces {
            own: self.namespaces.iter().peekable(),
            base: self
                .base
                .as_deref()
                .map(|b| b.namespaces.iter())
                .unwrap_or_default()
                .peekable(),
        }
    }

    /// A namespace's labels, if the namespace is known.
    fn labels(&self, namespace: &str) -> Option<&Labels> {
        self.namespaces
            .get(namespace)
            .or_else(|| self.base.as_deref()?.namespaces.get(namespace))
    }

    /// A namespace's policies.
    fn policies_in(&self, namespace: &str) -> &[Policy] {
        self.policies
            .get(namespace)
            .or_else(|| self.base.as_deref()?.policies.get(namespace))
            .map_or(&[], Vec::as_slice)
    }

    fn namespace_space(&self, ns: &NamespaceRef) -> LabelSpace {
        match ns {
            NamespaceRef::Known(name) => match self.labels(name) {
                Some(labels) => LabelSpace::exactly(labels),
                None => LabelSpace::exactly(&BTreeMap::from([(
                    NAMESPACE_NAME_LABEL.to_owned(),
                    name.clone(),
                )])),
            },
            NamespaceRef::Unknown(space) => space.clone(),
        }
    }

    /// Whether `dst`'s namespace policies let `src` in on `port`.
    pub fn ingress(&self, src: &Endpoint, dst: &PodSet, port: &Port) -> Side {
        self.side(Direction::Ingress, dst, src, dst.named_ports.as_ref(), port)
    }

    /// Whether `src`'s namespace policies let it out to `dst` on `port`.
    pub fn egress(&self, src: &PodSet, dst: &Endpoint, port: &Port) -> Side {
        let no_names = BTreeMap::new();
        let named = match dst {
            Endpoint::Pods(p) => p.named_ports.as_ref(),
            Endpoint::External(_) => Some(&no_names),
        };
        self.side(Direction::Egress, src, dst, named, port)
    }

    /// Both sides of a connection from `src` to `dst`.
    pub fn path(&self, src: &Endpoint, dst: &Endpoint, port: &Port) -> Path {
        let egress = match src {
            Endpoint::Pods(s) => self.egress(s, dst, port),
            Endpoint::External(_) => Side::unrestricted(),
        };
        let ingress = match dst {
            Endpoint::Pods(d) => self.ingress(src, d, port),
            Endpoint::External(_) => Side::unrestricted(),
        };
        Path { egress, ingress }
    }

    /// `owner`: the pods whose namespace's policies decide; `peer`: the other end; `named`: the
    /// destination's named ports.
    fn side(
        &self,
        dir: Direction,
        owner: &PodSet,
        peer: &Endpoint,
        named: Option<&NamedPorts>,
        port: &Port,
    ) -> Side {
        let NamespaceRef::Known(ns) = &owner.namespace else {
            return Side::unrestricted();
        };
        if owner.labels.is_empty() {
            return Side::default();
        }
        let relevant: Vec<&Policy> = self
            .policies_in(ns)
            .iter()
            .filter(|p| match dir {
                Direction::Ingress => p.ingress.is_some(),
                Direction::Egress => p.egress.is_some(),
            })
            .collect();
        let selectors: Vec<&Selector> = relevant.iter().map(|p| &p.selects).collect();
        let mut budget = ESCAPE_BUDGET;
        let unisolated = owner.labels.escapes(&selectors, &mut budget);
        let allowed_by: Vec<String> = relevant
            .iter()
            .filter(|p| owner.labels.admits(&p.selects))
            .filter(|p| {
                let rules = match dir {
                    Direction::Ingress => p.ingress.as_deref(),
                    Direction::Egress => p.egress.as_deref(),
                };
                rules
                    .into_iter()
                    .flatten()
                    .any(|r| self.rule_allows(r, &p.namespace, peer, named, port))
            })
            .map(|p| p.id.clone())
            .collect();
        Side {
            allowed: unisolated || !allowed_by.is_empty(),
            unisolated,
            allowed_by,
        }
    }

    fn rule_allows(
        &self,
        rule: &Rule,
        policy_ns: &str,
        peer: &Endpoint,
        named: Option<&NamedPorts>,
        port: &Port,
    ) -> bool {
        let port_ok =
            rule.ports.is_empty() || rule.ports.iter().any(|p| port_matches(p, named, port));
        port_ok
            && match &rule.peers {
                None => true,
                Some(peers) => peers.iter().any(|p| self.peer_matches(p, policy_ns, peer)),
            }
    }

    fn peer_matches(&self, peer: &Peer, policy_ns: &str, ep: &Endpoint) -> bool {
        match (peer, ep) {
            (Peer::Block { cidr, except }, Endpoint::Pods(p)) => {
                p.addresses.meets_block(cidr, except)
            }
            (Peer::Block { cidr, except }, Endpoint::External(a)) => a.meets_block(cidr, except),
            (Peer::Pods { .. }, Endpoint::External(_)) => false,
            (Peer::Pods { namespaces, pods }, Endpoint::Pods(p)) => {
                let ns_ok = match namespaces {
                    Some(sel) => self.namespace_space(&p.namespace).admits(sel),
                    None => p.namespace == NamespaceRef::Known(policy_ns.to_owned()),
                };
                let pod_ok = pods.as_ref().is_none_or(|sel| p.labels.admits(sel));
                ns_ok && pod_ok
            }
        }
    }
}

/// Whether a policy id (`namespace/name`) is of `namespace`.
fn in_namespace(id: &str, namespace: &str) -> bool {
    id.strip_prefix(namespace)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// A view's namespaces merged with its base's, in name order; the view's labels win.
struct Namespaces<'a> {
    own: Peekable<btree_map::Iter<'a, String, Labels>>,
    base: Peekable<btree_map::Iter<'a, String, Labels>>,
}

impl<'a> Iterator for Namespaces<'a> {
    type Item = (&'a String, &'a Labels);

    fn next(&mut self) -> Option<Self::Item> {
        let order = match (self.own.peek(), self.base.peek()) {
            (None, None) => return None,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((own, _)), Some((base, _))) => own.cmp(base),
        };
        match order {
            Ordering::Less => self.own.next(),
            Ordering::Equal => {
                self.base.next();
                self.own.next()
            }
            Ordering::Greater => self.base.next(),
        }
    }
}

fn port_matches(rule: &PortRule, named: Option<&NamedPorts>, port: &Port) -> bool {
    match port {
        Port::Any => match &rule.port {
            PortRef::All | PortRef::Range(..) => true,
            PortRef::Named(name) => named.is_none_or(|m| {
                m.get(name)
                    .is_some_and(|(proto, _)| *proto == rule.protocol)
            }),
        },
        Port::Number { protocol, port } => {
            if *protocol != rule.protocol {
                return false;
            }
            match &rule.port {
                PortRef::All => true,
                PortRef::Range(a, b) => a <= port && port <= b,
                PortRef::Named(name) => match named {
                    None => true,
                    Some(m) => m
                        .get(name)
                        .is_some_and(|(proto, n)| proto == protocol && n == port),
                },
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
