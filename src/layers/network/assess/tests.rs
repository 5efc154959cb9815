use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::json;

use super::*;
use crate::api::DeletionPolicy;
use crate::api::platform::NetworkPlatform;
use crate::layers::network::plan::{plan, validate};
use crate::tenant::OrgId;

fn tenant(id: &str, peers: &[&str]) -> Tenant {
    Tenant {
        name: id.to_owned(),
        org_id: OrgId::parse(id).unwrap(),
        display_name: id.to_owned(),
        namespace: format!("org-{id}"),
        deletion_policy: DeletionPolicy::Retain,
        rotate: false,
        peers: std::iter::once(OrgId::sentinel())
            .chain(peers.iter().map(|p| OrgId::parse(p).unwrap()))
            .collect(),
        owner: OwnerReference {
            name: id.to_owned(),
            uid: id.to_owned(),
            ..Default::default()
        },
        adopt_from: None,
        resource_quota: None,
        limit_range: None,
    }
}

fn platform(shared: bool) -> NetworkPlatform {
    let mut pf: NetworkPlatform = serde_json::from_value(json!({
        "ingressNamespaces": ["gateway"],
        "egress": [{"name": "postgres", "namespace": "data", "podLabels": {"app": "pg"}, "ports": [5432]}],
    }))
    .unwrap();
    if shared {
        pf.mode = crate::api::platform::NetworkMode::SharedNamespace;
        pf.shared_namespaces = vec!["apps".into()];
    }
    pf
}

fn foreign(ns: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}))
        .unwrap()
}

fn cluster(cfg: &NetworkConfig, orgs: &[&Tenant], extra: &[NetworkPolicy]) -> Cluster {
    let mut policies: Vec<NetworkPolicy> =
        orgs.iter().flat_map(|t| plan(cfg, t).policies).collect();
    policies.extend(extra.iter().cloned());
    let mut namespaces: Vec<(String, BTreeMap<String, String>)> = orgs
        .iter()
        .map(|t| {
            (
                t.namespace.clone(),
                BTreeMap::from([(ORG_ID_LABEL.to_owned(), t.org_id.to_string())]),
            )
        })
        .collect();
    for n in ["gateway", "kube-system", "data", "apps", "default"] {
        namespaces.push((n.to_owned(), BTreeMap::new()));
    }
    Cluster::new(namespaces, &policies)
}

#[test]
fn planned_policies_pass_every_probe() {
    let cfg = validate(&platform(false)).unwrap();
    let (a, b, c) = (tenant("a", &["b"]), tenant("b", &[]), tenant("c", &[]));
    let v = assess(&cluster(&cfg, &[&a, &b, &c], &[]), &cfg, &a);
    assert!(v.isolated(), "{:?}", v.findings);
    assert!(v.verified(), "{:?}", v.failures());
    let names: Vec<&str> = v.probes.iter().map(|p| p.name.as_str()).collect();
    for want in [
        "ingress into org-a from any other namespace",
        "egress from org-a to any other namespace",
        "ingress into org-a from b's namespace org-b",
        "egress from org-a to b's namespace org-b",
        "ingress into org-a from other organizations' namespaces (2 checked)",
        "within org-a: pods reach each other",
        "egress from org-a to DNS in kube-system (UDP 53)",
        "ingress into org-a from gateway namespace gateway",
    ] {
        assert!(
            names.contains(&want),
            "missing probe {want:?} in {names:#?}"
        );
    }
}

#[test]
fn a_foreign_allow_all_policy_is_caught_by_name_and_clears_when_removed() {
    let cfg = validate(&platform(false)).unwrap();
    let (a, b) = (tenant("a", &["b"]), tenant("b", &[]));
    let allow_all = foreign(
        "org-a",
        "allow-everyone",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
    );
    let mut c = cluster(&cfg, &[&a, &b], std::slice::from_ref(&allow_all));
    let v = assess(&c, &cfg, &a);
    assert!(!v.isolated() && !v.verified());
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains("NetworkPolicy org-a/allow-everyone admits ingress")),
        "{:?}",
        v.findings
    );
    let failed: Vec<&Probe> = v.probes.iter().filter(|p| !p.passed).collect();
    assert!(
        failed
            .iter()
            .any(|p| p.name == "ingress into org-a from any other namespace")
    );
    assert!(
        failed
            .iter()
            .all(|p| p.detail.contains("org-a/allow-everyone")),
        "{failed:#?}"
    );
    // B's egress policies still deny the path, and the detail says so.
    let from_b = v
        .probes
        .iter()
        .find(|p| p.name == "ingress into org-a from b's namespace org-b")
        .unwrap();
    assert!(
        !from_b.passed && from_b.detail.contains("other side's policies still deny"),
        "{from_b:?}"
    );
    // Egress was not opened.
    assert!(
        v.probes
            .iter()
            .filter(|p| p.name.starts_with("egress"))
            .all(|p| p.passed)
    );
    // B is not affected by A's mistake.
    assert!(assess(&c, &cfg, &b).verified());

    let planned = plan(&cfg, &a).policies;
    c.replace_policies("org-a", &planned);
    let v = assess(&c, &cfg, &a);
    assert!(v.isolated() && v.verified(), "{:?}", v.failures());
}

#[test]
fn a_pod_selector_only_peer_elsewhere_does_not_matter_but_a_namespace_selector_does() {
    let cfg = validate(&platform(false)).unwrap();
    let (a, b) = (tenant("a", &["b"]), tenant("b", &[]));
    // In A's namespace a podSelector-only peer means A's own pods: harmless.
    let own_only = foreign(
        "org-a",
        "own",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"x": "y"}}}]}]}),
    );
    assert!(assess(&cluster(&cfg, &[&a, &b], &[own_only]), &cfg, &a).verified());
    // A namespace selector that matches organization namespaces is not.
    let orgs = foreign(
        "org-a",
        "orgs",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "bulkhead.dev/org-id", "operator": "Exists"}]}}]}]}),
    );
    let v = assess(&cluster(&cfg, &[&a, &b], &[orgs]), &cfg, &a);
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains("org-a/orgs") && f.contains("org-b")),
        "{:?}",
        v.findings
    );
    // An ipBlock covering the pod network is a path too; carving it out is not.
    let world = |except: serde_json::Value| {
        foreign(
            "org-a",
            "world",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": except}}]}]}),
        )
    };
    let v = assess(&cluster(&cfg, &[&a, &b], &[world(json!([]))]), &cfg, &a);
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains("org-a/world admits egress")),
        "{:?}",
        v.findings
    );
    assert!(
        assess(
            &cluster(&cfg, &[&a, &b], &[world(json!(["10.0.0.0/8"]))]),
            &cfg,
            &a
        )
        .verified()
    );
}

#[test]
fn deleted_policies_leave_pods_unrestricted() {
    let cfg = validate(&platform(false)).unwrap();
    let (a, b) = (tenant("a", &["b"]), tenant("b", &[]));
    let mut c = cluster(&cfg, &[&a, &b], &[]);
    c.replace_policies("org-a", &[]);
    let v = assess(&c, &cfg, &a);
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains("selected by no NetworkPolicy")),
        "{:?}",
        v.findings
    );
    assert!(!v.verified());
}

#[test]
fn shared_namespace_mode_keeps_organizations_apart() {
    let cfg = validate(&platform(true)).unwrap();
    let (a, b) = (tenant("a", &["b"]), tenant("b", &["a"]));
    let c = cluster(&cfg, &[&a, &b], &[]);
    for t in [&a, &b] {
        let v = assess(&c, &cfg, t);
        assert!(
            v.isolated() && v.verified(),
            "{}: {:?}",
            t.org_id,
            v.failures()
        );
    }
    let v = assess(&c, &cfg, &a);
    assert!(
        v.probes
            .iter()
            .any(|p| p.name == "ingress into a's pods in apps from b's pods in apps" && p.passed)
    );
    // A policy in the shared namespace that lets every pod in breaks both organizations.
    let open = foreign(
        "apps",
        "open",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
    );
    let c = cluster(&cfg, &[&a, &b], &[open]);
    let v = assess(&c, &cfg, &a);
    assert!(
        v.findings.iter().any(|f| f.contains("apps/open")),
        "{:?}",
        v.findings
    );
    let p = v
        .probes
        .iter()
        .find(|p| p.name == "ingress into a's pods in apps from b's pods in apps")
        .unwrap();
    assert!(!p.passed && p.detail.contains("apps/open"));
    // B's own policy selecting A's pods by mistake is caught too.
    let wrong = foreign(
        "apps",
        "bulkhead-b-typo",
        json!({"podSelector": {"matchLabels": {"bulkhead.dev/org-id": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"bulkhead.dev/org-id": "b"}}}]}]}),
    );
    let v = assess(&cluster(&cfg, &[&a, &b], &[wrong]), &cfg, &a);
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains("apps/bulkhead-b-typo")),
        "{:?}",
        v.findings
    );
}

/// One fresh read: a namespace's labels and its policies.
type Read = (&'static str, BTreeMap<String, String>, Vec<NetworkPolicy>);

fn org_labels(id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(ORG_ID_LABEL.to_owned(), id.to_owned())])
}

/// The cached cluster shared, a pass's view of it with `reads` over it, and the same reads
/// written into a copy of it.
fn view_and_copy(cached: Cluster, reads: &[Read]) -> (Arc<Cluster>, Cluster, Cluster) {
    let cached = Arc::new(cached);
    let mut view = Cluster::over(cached.clone());
    let mut copy = Cluster::clone(&cached);
    for (ns, labels, policies) in reads {
        for c in [&mut view, &mut copy] {
            c.set_namespace(ns, labels.clone());
            c.replace_policies(ns, policies);
        }
    }
    (cached, view, copy)
}

fn has_probe(v: &Verification, name: &str) -> bool {
    v.probes.iter().any(|p| p.name == name)
}

#[test]
fn a_fresh_read_over_the_cached_cluster_is_assessed_like_a_copy() {
    let cfg = validate(&platform(false)).unwrap();
    let (a, b, c) = (tenant("a", &["b"]), tenant("b", &[]), tenant("c", &[]));
    let planned = |t: &Tenant| plan(&cfg, t).policies;
    let allow_all = foreign(
        "org-a",
        "allow-everyone",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
    );
    let with = |t: &Tenant, extra: &NetworkPolicy| {
        let mut p = planned(t);
        p.push(extra.clone());
        p
    };

    // A policy created since the cached read: the view sees it.
    let (cached, view, copy) = view_and_copy(
        cluster(&cfg, &[&a, &b, &c], &[]),
        &[("org-a", org_labels("a"), with(&a, &allow_all))],
    );
    let v = assess(&view, &cfg, &a);
    assert_eq!(v, assess(&copy, &cfg, &a));
    assert!(!v.verified());
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains("org-a/allow-everyone admits ingress")),
        "{:?}",
        v.findings
    );
    assert!(assess(&cached, &cfg, &a).verified());
    // B's pass, over the same cache, does not see A's fresh read.
    assert!(assess(&Cluster::over(cached.clone()), &cfg, &b).verified());

    // A policy deleted since the cached read: the view no longer counts it.
    let (cached, view, copy) = view_and_copy(
        cluster(&cfg, &[&a, &b, &c], std::slice::from_ref(&allow_all)),
        &[
            ("org-a", org_labels("a"), planned(&a)),
            ("org-b", org_labels("b"), planned(&b)),
        ],
    );
    let v = assess(&view, &cfg, &a);
    assert_eq!(v, assess(&copy, &cfg, &a));
    assert!(v.verified(), "{:?}", v.failures());
    assert!(!assess(&cached, &cfg, &a).verified());

    // The traffic probe's re-read goes over the pass's view in turn.
    let mut again = view.clone();
    let mut again_copy = copy.clone();
    for x in [&mut again, &mut again_copy] {
        x.replace_policies("org-a", &with(&a, &allow_all));
    }
    let v = assess(&again, &cfg, &a);
    assert_eq!(v, assess(&again_copy, &cfg, &a));
    assert!(!v.verified());
    assert!(assess(&view, &cfg, &a).verified());
}

#[test]
fn namespaces_read_fresh_change_who_counts_as_another_organization() {
    let cfg = validate(&platform(false)).unwrap();
    let (a, b, c) = (tenant("a", &["c"]), tenant("b", &[]), tenant("c", &[]));
    // C's namespace is newer than the cached read, and B's lost its org-id label since.
    let (cached, view, copy) = view_and_copy(
        cluster(&cfg, &[&a, &b], &[]),
        &[
            ("org-a", org_labels("a"), plan(&cfg, &a).policies),
            ("org-c", org_labels("c"), plan(&cfg, &c).policies),
            ("org-b", BTreeMap::new(), plan(&cfg, &b).policies),
        ],
    );
    let v = assess(&view, &cfg, &a);
    assert_eq!(v, assess(&copy, &cfg, &a));
    assert!(v.verified(), "{:?}", v.failures());
    let checked = "ingress into org-a from other organizations' namespaces (1 checked)";
    assert!(has_probe(&v, "ingress into org-a from c's namespace org-c"));
    assert!(has_probe(&v, checked));
    let old = assess(&cached, &cfg, &a);
    assert!(!has_probe(
        &old,
        "ingress into org-a from c's namespace org-c"
    ));
    assert!(has_probe(&old, checked));
    // The view knows both org-c and a label-less org-b; the cache knows org-b only.
    let names = |c: &Cluster| {
        c.namespaces()
            .filter(|(_, l)| l.contains_key(ORG_ID_LABEL))
            .map(|(n, _)| n.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&view), ["org-a", "org-c"]);
    assert_eq!(names(&cached), ["org-a", "org-b"]);

    // A's policies let in the org-id namespaces: the fresh org-c is named, org-b is not.
    let orgs = foreign(
        "org-a",
        "orgs",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "bulkhead.dev/org-id", "operator": "Exists"}]}}]}]}),
    );
    let mut open = plan(&cfg, &a).policies;
    open.push(orgs);
    let (_, view, copy) = view_and_copy(
        cluster(&cfg, &[&a, &b], &[]),
        &[
            ("org-a", org_labels("a"), open),
            ("org-c", org_labels("c"), plan(&cfg, &c).policies),
            ("org-b", BTreeMap::new(), plan(&cfg, &b).policies),
        ],
    );
    let v = assess(&view, &cfg, &a);
    assert_eq!(v, assess(&copy, &cfg, &a));
    let f = v
        .findings
        .iter()
        .find(|f| f.contains("org-a/orgs admits ingress"))
        .unwrap_or_else(|| panic!("{:?}", v.findings));
    assert!(f.contains("org-c") && !f.contains("org-b"), "{f}");
}

#[test]
fn an_unreadable_policy_read_again_is_assessed_like_a_copy() {
    let cfg = validate(&platform(false)).unwrap();
    let (a, b) = (tenant("a", &["b"]), tenant("b", &[]));
    let bad = |ns: &str| {
        foreign(
            ns,
            "bad",
            json!({"podSelector": {"matchExpressions": [{"key": "x", "operator": "Gt", "values": ["1"]}]}, "policyTypes": ["Ingress"]}),
        )
    };
    let unreadable_finding = |v: &Verification| {
        v.findings
            .iter()
            .any(|f| f.contains("NetworkPolicy org-a/bad could not be read"))
    };
    // Gone from A's namespace since the cached read; B's is still there.
    let (cached, view, copy) = view_and_copy(
        cluster(&cfg, &[&a, &b], &[bad("org-a"), bad("org-b")]),
        &[("org-a", org_labels("a"), plan(&cfg, &a).policies)],
    );
    let v = assess(&view, &cfg, &a);
    assert_eq!(v, assess(&copy, &cfg, &a));
    assert!(!unreadable_finding(&v));
    assert!(unreadable_finding(&assess(&cached, &cfg, &a)));
    assert_eq!(view.unreadable().count(), 1);
    assert_eq!(cached.unreadable().count(), 2);

    // New in A's namespace since the cached read.
    let mut read = plan(&cfg, &a).policies;
    read.push(bad("org-a"));
    let (cached, view, copy) = view_and_copy(
        cluster(&cfg, &[&a, &b], &[]),
        &[("org-a", org_labels("a"), read)],
    );
    let v = assess(&view, &cfg, &a);
    assert_eq!(v, assess(&copy, &cfg, &a));
    assert!(unreadable_finding(&v) && !v.verified());
    assert!(assess(&cached, &cfg, &a).verified());
}

#[test]
fn a_fresh_read_of_a_shared_namespace_is_assessed_like_a_copy() {
    let cfg = validate(&platform(true)).unwrap();
    let (a, b) = (tenant("a", &["b"]), tenant("b", &["a"]));
    let open = foreign(
        "apps",
        "open",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
    );
    let both: Vec<NetworkPolicy> = [&a, &b]
        .iter()
        .flat_map(|t| plan(&cfg, t).policies)
        .collect();
    let (cached, view, copy) = view_and_copy(
        cluster(&cfg, &[&a, &b], std::slice::from_ref(&open)),
        &[("apps", BTreeMap::new(), both.clone())],
    );
    for t in [&a, &b] {
        let v = assess(&view, &cfg, t);
        assert_eq!(v, assess(&copy, &cfg, t));
        assert!(v.verified(), "{}: {:?}", t.org_id, v.failures());
        assert!(!assess(&cached, &cfg, t).verified());
    }
    let mut read = both;
    read.push(open);
    let (cached, view, copy) = view_and_copy(
        cluster(&cfg, &[&a, &b], &[]),
        &[("apps", BTreeMap::new(), read)],
    );
    let v = assess(&view, &cfg, &a);
    assert_eq!(v, assess(&copy, &cfg, &a));
    assert!(
        v.findings.iter().any(|f| f.contains("apps/open")),
        "{:?}",
        v.findings
    );
    assert!(assess(&cached, &cfg, &a).verified());
}
