//! Other organizations' namespaces as one namespace's policies see them, grouped so that a
//! question about all of them is asked once per group instead of once per namespace.
//!
//! # Why one namespace of a group answers for all of it
//!
//! The check asks, for every other organization's namespace `them`,
//! `ingress(any pod of them → pods P of namespace A)` and `egress(P → any pod of them)`, with
//! `any pod of them` = [`PodSet::any_in`](super::PodSet::any_in)`(them, pod addresses)`. Both
//! questions read the policies of A only (ingress reads the destination's namespace, egress the
//! source's), never those of `them`. Going through `Cluster::side`, `rule_allows` and
//! `peer_matches`, what they read about `them` is:
//! - whether P is isolated (`escapes`), the selected policies and their ports: about A and P
//!   only;
//! - an `ipBlock` peer: the pod addresses of `them`, the same set for every namespace;
//! - a peer with a `podSelector`: matched against the labels of pods of `them`, which are
//!   [`LabelSpace::any`](super::LabelSpace::any) for every namespace;
//! - a peer without a `namespaceSelector`: whether `them` *is* A (its name against the policy's
//!   namespace, which is A);
//! - a peer with a `namespaceSelector`: whether `them`'s labels, exactly as the cluster (or the
//!   view) holds them, match that selector. A parsed selector is a conjunction over keys, each
//!   key absent-or-not plus a finite value set read as "one of" or "none of"; so a match reads,
//!   per key of the selector, only whether the label is absent, and if present whether its value
//!   is one of the values the selector names (every value the selector does not name behaves the
//!   same). `kubernetes.io/metadata.name` is a label like any other here: the cluster sets it
//!   on every namespace it knows, and every `them` is a namespace it knows.
//! - A policy that could not be read has rules without peers: it admits every `them` alike.
//!
//! Hence the [`Spec`] of A: every key named by a `namespaceSelector` of A's policies, with the
//! values named for it. A namespace's [`Signature`] under a spec is, per key, absent / present
//! with the spec's value v / present with a value the spec does not name. Two namespaces other
//! than A with the same signature get the same answers, word for word (same verdict, same
//! policies in the same order). A itself is always asked on its own.
//!
//! # Cost
//!
//! The grouping of a cluster's namespaces by signature is built once per cluster and spec (the
//! shared cached cluster keeps it until it is read again), in time linear in its namespaces. A
//! view over it then only corrects for its own reads and for the organization's own
//! namespaces, which are few.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use super::{Cluster, Labels, Peer, Values};

/// Class indexes one cluster keeps at most (one per organization label key and spec). Planned
/// policies of every organization share one spec; custom ones add more. When full, the
/// indexes are dropped and built again on demand.
const MAX_INDEXES: usize = 16;

/// Label keys that some `namespaceSelector` of a namespace's policies names, and per key the
/// values it names (for `Exists` / `DoesNotExist` none: presence is all they read).
type Spec = BTreeMap<String, BTreeSet<String>>;

/// One key of a namespace's [`Signature`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    Absent,
    /// Present with a value the spec does not name.
    Other,
    /// Present with this value, which the spec names.
    Named(String),
}

/// A namespace's labels as a spec tells them apart: one slot per key of the spec, in key order.
type Signature = Vec<Slot>;

fn signature(spec: &Spec, labels: &Labels) -> Signature {
    spec.iter()
        .map(|(key, values)| match labels.get(key) {
            None => Slot::Absent,
            Some(v) if values.contains(v) => Slot::Named(v.clone()),
            Some(_) => Slot::Other,
        })
        .collect()
}

/// A cluster's namespaces that carry one label key, by that label's value.
struct ByOrg {
    /// Value → namespace names, in name order.
    names: BTreeMap<String, Vec<String>>,
    total: usize,
}

/// A cluster's namespaces that carry one label key, by signature under one spec.
struct Classes {
    /// Signature → namespace names, in name order.
    members: BTreeMap<Signature, Vec<String>>,
}

/// Indexes of a cluster's own namespaces, built on demand. Only a cluster that is not a view
/// uses its own; a view uses its base's. They read namespaces' labels only (policies are read
/// per question, through the spec): every change of labels drops them, and a clone starts
/// without them.
#[derive(Default)]
pub(super) struct Indexes {
    by_org: Mutex<BTreeMap<String, Arc<ByOrg>>>,
    classes: Mutex<BTreeMap<(String, Spec), Arc<Classes>>>,
}

impl Indexes {
    pub(super) fn clear(&mut self) {
        *self = Self::default();
    }
}

impl Clone for Indexes {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl fmt::Debug for Indexes {
    // Derived data only: a cluster prints the same whether or not it was asked yet.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Indexes")
    }
}

/// Namespaces that share the answers to the questions about them, as the check needs them:
/// how many, the first few names (in name order) and thereby a representative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The group's first namespaces in name order, at most the limit asked for and at least one.
    pub first: Vec<String>,
    /// How many namespaces the group has.
    pub count: usize,
}

impl Group {
    /// The namespace to ask about: any member answers for all.
    pub fn representative(&self) -> &str {
        &self.first[0]
    }
}

/// The namespaces of a cluster (or view) that carry the label `key`, bar those whose value is
/// `except_value` and the namespace `except_namespace`: other organizations' namespaces.
pub struct LabelledNamespaces<'a> {
    cluster: &'a Cluster,
    root: &'a Cluster,
    key: String,
    by_org: Arc<ByOrg>,
    /// Names of `root`'s namespaces with the key that do not count as `root` holds them: excluded,
    /// or read again by the view.
    removed: BTreeSet<&'a str>,
    /// The view's own reads that count: name → value of the key.
    added: BTreeMap<&'a str, &'a str>,
}

impl Cluster {
    /// Namespaces that carry the label `key`, bar those with value `except_value` and the
    /// namespace `except_namespace`; a view sees its own reads in place of its base's.
    pub fn labelled_namespaces(
        &self,
        key: &str,
        except_value: &str,
        except_namespace: &str,
    ) -> LabelledNamespaces<'_> {
        let root = self.base.as_deref().unwrap_or(self);
        let by_org = root.by_org(key);
        let own_reads = if self.base.is_some() {
            Some(&self.namespaces)
        } else {
            None
        };
        let in_root = |name: &str| {
            root.namespaces
                .get(name)
                .is_some_and(|l| l.contains_key(key))
        };
        let mut removed: BTreeSet<&str> = by_org
            .names
            .get(except_value)
            .into_iter()
            .flatten()
            .filter_map(|n| root.namespaces.get_key_value(n).map(|(n, _)| n.as_str()))
            .collect();
        if let Some((name, _)) = root.namespaces.get_key_value(except_namespace)
            && in_root(name)
        {
            removed.insert(name);
        }
        let mut added = BTreeMap::new();
        for (name, labels) in own_reads.into_iter().flatten() {
            if in_root(name) {
                removed.insert(name);
            }
            if let Some(v) = labels.get(key)
                && v != except_value
                && name != except_namespace
            {
                added.insert(name.as_str(), v.as_str());
            }
        }
        LabelledNamespaces {
            cluster: self,
            root,
            key: key.to_owned(),
            by_org,
            removed,
            added,
        }
    }

    fn by_org(&self, key: &str) -> Arc<ByOrg> {
        let mut cache = self
            .indexes
            .by_org
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(ix) = cache.get(key) {
            return ix.clone();
        }
        let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut total = 0;
        for (name, labels) in &self.namespaces {
            if let Some(v) = labels.get(key) {
                names.entry(v.clone()).or_default().push(name.clone());
                total += 1;
            }
        }
        let ix = Arc::new(ByOrg { names, total });
        if cache.len() >= MAX_INDEXES {
            cache.clear();
        }
        cache.insert(key.to_owned(), ix.clone());
        ix
    }

    fn classes(&self, key: &str, spec: &Spec) -> Arc<Classes> {
        let mut cache = self
            .indexes
            .classes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let id = (key.to_owned(), spec.clone());
        if let Some(ix) = cache.get(&id) {
            return ix.clone();
        }
        let mut members: BTreeMap<Signature, Vec<String>> = BTreeMap::new();
        for (name, labels) in self.namespaces.iter().filter(|(_, l)| l.contains_key(key)) {
            members
                .entry(signature(spec, labels))
                .or_default()
                .push(name.clone());
        }
        let ix = Arc::new(Classes { members });
        if cache.len() >= MAX_INDEXES {
            cache.clear();
        }
        cache.insert(id, ix.clone());
        ix
    }

    /// The [`Spec`] of `namespace`'s policies: every key its `namespaceSelector`s name, with
    /// the values they name for it.
    fn spec(&self, namespace: &str) -> Spec {
        let mut spec = Spec::new();
        let rules = self
            .policies_in(namespace)
            .iter()
            .flat_map(|p| p.ingress.iter().flatten().chain(p.egress.iter().flatten()));
        for peer in rules.flat_map(|r| r.peers.iter().flatten()) {
            match peer {
                Peer::Pods {
                    namespaces: Some(sel),
                    ..
                } => {
                    for (key, domain) in &sel.0 {
                        let (Values::Only(vs) | Values::AllBut(vs)) = &domain.values;
                        spec.entry(key.clone())
                            .or_default()
                            .extend(vs.iter().cloned());
                    }
                }
                // The same addresses for every namespace; or `namespace` alone, which is asked
                // about on its own.
                Peer::Block { .. }
                | Peer::Pods {
                    namespaces: None, ..
                } => {}
            }
        }
        spec
    }
}

impl LabelledNamespaces<'_> {
    /// How many namespaces there are.
    pub fn count(&self) -> usize {
        self.by_org.total - self.removed.len() + self.added.len()
    }

    /// Those whose label has the value `value`, in name order.
    pub fn with_value(&self, value: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .by_org
            .names
            .get(value)
            .into_iter()
            .flatten()
            .filter(|n| !self.removed.contains(n.as_str()))
            .cloned()
            .chain(
                self.added
                    .iter()
                    .filter(|(_, v)| **v == value)
                    .map(|(n, _)| (*n).to_owned()),
            )
            .collect();
        names.sort();
        names
    }

    /// All of them, split into groups whose members get the same answers to "may any pod of
    /// this namespace reach pods of `namespace`" and "may pods of `namespace` reach any pod of
    /// this namespace", as `namespace`'s policies decide (see the module's documentation).
    /// Each group lists its first `limit` (at least 1) members in name order. Namespaces the
    /// view read again, and `namespace` itself, are groups of their own.
    pub fn groups(&self, namespace: &str, limit: usize) -> Vec<Group> {
        let limit = limit.max(1);
        let spec = self.cluster.spec(namespace);
        let classes = self.root.classes(&self.key, &spec);
        // `namespace` is asked on its own: its policies' podSelector-only peers admit it alone.
        let mut alone: BTreeSet<&str> = self.added.keys().copied().collect();
        let mut skip = self.removed.clone();
        if let Some((name, labels)) = self.root.namespaces.get_key_value(namespace)
            && labels.contains_key(&self.key)
            && !self.removed.contains(namespace)
        {
            alone.insert(name);
            skip.insert(name);
        }
        let mut skipped: BTreeMap<Signature, usize> = BTreeMap::new();
        for name in &skip {
            if let Some(labels) = self.root.namespaces.get(*name) {
                *skipped.entry(signature(&spec, labels)).or_default() += 1;
            }
        }
        let mut groups: Vec<Group> = classes
            .members
            .iter()
            .filter_map(|(sig, members)| {
                let count = members.len() - skipped.get(sig).copied().unwrap_or(0);
                (count > 0).then(|| Group {
                    first: members
                        .iter()
                        .filter(|n| !skip.contains(n.as_str()))
                        .take(limit)
                        .cloned()
                        .collect(),
                    count,
                })
            })
            .collect();
        groups.extend(alone.into_iter().map(|n| Group {
            first: vec![n.to_owned()],
            count: 1,
        }));
        groups
    }
}
