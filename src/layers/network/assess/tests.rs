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

// ---------------------------------------------------------------------------------------------
// Grouped namespaces against asking each one
// ---------------------------------------------------------------------------------------------

use crate::layers::network::reach::tests::Lcg;

const IDS: [&str; 5] = ["a", "b", "c", "d", "e"];
const KEYS: [&str; 4] = ["env", "team", "odd/key.x", NAMESPACE_NAME_LABEL];
const VALUES: [&str; 6] = ["prod", "dev", "", "x.y", "org-b", "apps"];

/// Random labels for a namespace: maybe an organization, maybe odd keys and values, maybe a
/// name label that is not the namespace's name.
fn random_labels(rng: &mut Lcg) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    if !rng.chance(5) {
        let org = if rng.chance(3) {
            format!("z{}", rng.below(4))
        } else {
            (*rng.pick(&IDS)).to_owned()
        };
        l.insert(ORG_ID_LABEL.to_owned(), org);
    }
    for _ in 0..rng.below(3) {
        l.insert(
            (*rng.pick(&KEYS)).to_owned(),
            (*rng.pick(&VALUES)).to_owned(),
        );
    }
    l
}

/// A namespaceSelector of any of the shapes the evaluator reads.
fn random_namespace_selector(rng: &mut Lcg, names: &[String]) -> serde_json::Value {
    let key = *rng.pick(&KEYS);
    let value = |rng: &mut Lcg| -> String {
        if key == NAMESPACE_NAME_LABEL && !rng.chance(3) {
            rng.pick(names).clone()
        } else {
            (*rng.pick(&VALUES)).to_owned()
        }
    };
    let (a, b) = (value(rng), value(rng));
    match rng.below(8) {
        0 => json!({}),
        1 => json!({"matchLabels": {key: a}}),
        2 => json!({"matchExpressions": [{"key": key, "operator": "In", "values": [a, b]}]}),
        3 => json!({"matchExpressions": [{"key": key, "operator": "NotIn", "values": [a]}]}),
        4 => json!({"matchExpressions": [{"key": key, "operator": "Exists"}]}),
        5 => json!({"matchExpressions": [{"key": key, "operator": "DoesNotExist"}]}),
        6 => json!({"matchLabels": {ORG_ID_LABEL: rng.pick(&IDS).to_owned()},
                    "matchExpressions": [{"key": key, "operator": "NotIn", "values": [a, b]}]}),
        _ => {
            json!({"matchExpressions": [{"key": ORG_ID_LABEL, "operator": "In", "values": [a, "c"]},
                                         {"key": key, "operator": "Exists"}]})
        }
    }
}

/// A policy of namespace `ns` that may let other namespaces in or out.
fn random_policy(rng: &mut Lcg, ns: &str, i: usize, names: &[String]) -> NetworkPolicy {
    let name = format!("p{i}");
    let peer = |rng: &mut Lcg| match rng.below(6) {
        0 => json!({"podSelector": {}}),
        1 => json!({"ipBlock": {"cidr": "10.0.0.0/8"}}),
        2 => json!({"namespaceSelector": random_namespace_selector(rng, names),
                    "podSelector": {"matchLabels": {"app": "x"}}}),
        _ => json!({"namespaceSelector": random_namespace_selector(rng, names)}),
    };
    let selects = if rng.chance(4) {
        json!({"matchLabels": {"role": "db"}})
    } else {
        json!({})
    };
    let spec = match rng.below(7) {
        // Unreadable: counted as allowing everything.
        0 => {
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}})
        }
        1 => json!({"podSelector": selects, "ingress": [{"from": [peer(rng), peer(rng)]}],
                    "egress": [{"to": [peer(rng)]}], "policyTypes": ["Ingress", "Egress"]}),
        2 => {
            json!({"podSelector": selects, "egress": [{"to": [peer(rng)], "ports": [{"port": 443}]}],
                    "policyTypes": ["Egress"]})
        }
        3 => {
            json!({"podSelector": selects, "ingress": [{"from": [peer(rng)], "ports": [{"port": "http"}]}]})
        }
        4 => json!({"podSelector": selects, "policyTypes": ["Ingress", "Egress"]}),
        _ => json!({"podSelector": selects, "ingress": [{"from": [peer(rng)]}]}),
    };
    foreign(ns, &name, spec)
}

#[test]
fn grouped_namespaces_are_assessed_like_each_one_asked() {
    let mut rng = Lcg(11);
    let (mut compared, mut admitting) = (0, 0);
    for round in 0..400 {
        let shared = rng.chance(3);
        let cfg = validate(&platform(shared)).unwrap();
        let own_ns = if shared { "apps" } else { "org-a" };
        let me = tenant("a", &[*rng.pick(&IDS), *rng.pick(&IDS)]);
        let others: Vec<Tenant> = IDS[1..].iter().map(|id| tenant(id, &[])).collect();
        let mut orgs: Vec<&Tenant> = others.iter().collect();
        orgs.push(&me);

        // Planned policies and namespaces, plus many more with random labels.
        let mut names: Vec<String> = (0..rng.below(40)).map(|i| format!("ns-{i:02}")).collect();
        names.extend(["org-b", "org-c", "apps", "default", "gateway"].map(String::from));
        let mut policies: Vec<NetworkPolicy> =
            orgs.iter().flat_map(|t| plan(&cfg, t).policies).collect();
        for i in 0..rng.below(4) {
            policies.push(random_policy(&mut rng, own_ns, i, &names));
        }
        for i in 0..rng.below(3) {
            let ns = rng.pick(&names).clone();
            policies.push(random_policy(&mut rng, &ns, 10 + i, &names));
        }
        let mut base = cluster(&cfg, &orgs, &policies);
        for n in &names {
            if !rng.chance(4) {
                base.set_namespace(n, random_labels(&mut rng));
            }
        }
        let base = Arc::new(base);

        // A pass's view: some namespaces read again (labels, policies), some new.
        let mut view = Cluster::over(base.clone());
        for _ in 0..rng.below(5) {
            let ns = if rng.chance(4) {
                format!("new-{}", rng.below(3))
            } else {
                rng.pick(&names).clone()
            };
            view.set_namespace(&ns, random_labels(&mut rng));
        }
        let mut fresh_names = names.clone();
        fresh_names.extend(["org-a", "new-0"].map(String::from));
        for ns in [own_ns, "org-a"] {
            if rng.chance(2) {
                // Sometimes without the planned policies: then nothing may tell the shared
                // namespace apart by name from other namespaces.
                let mut read = if rng.chance(2) {
                    plan(&cfg, &me).policies
                } else {
                    Vec::new()
                };
                for i in 0..rng.below(4) {
                    read.push(random_policy(&mut rng, ns, 20 + i, &fresh_names));
                }
                view.replace_policies(ns, &read);
            }
        }

        for c in [&*base, &view] {
            let grouped = assess(c, &cfg, &me);
            let each = assess_each(c, &cfg, &me);
            assert_eq!(grouped, each, "round {round}");
            compared += 1;
            if grouped
                .findings
                .iter()
                .any(|f| f.contains("other organizations ("))
            {
                admitting += 1;
            }
        }
    }
    // The rounds must exercise both outcomes, admitting namespaces included.
    assert!(
        admitting > 100 && compared - admitting > 100,
        "{admitting} of {compared}"
    );
}

#[test]
fn an_admitting_group_names_its_first_members_and_counts_the_rest() {
    let cfg = validate(&platform(false)).unwrap();
    let a = tenant("a", &[]);
    let team = foreign(
        "org-a",
        "team",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]}]}),
    );
    let mut c = cluster(&cfg, &[&a], std::slice::from_ref(&team));
    for i in 0..12 {
        let mut l = org_labels(&format!("o{i}"));
        if i % 2 == 0 {
            l.insert("team".to_owned(), "red".to_owned());
        }
        c.set_namespace(&format!("t-{i:02}"), l);
    }
    let base = Arc::new(c);
    let mut view = Cluster::over(base.clone());
    // Read again: t-00 left team red, t-03 joined it.
    view.set_namespace("t-00", org_labels("o0"));
    let mut l = org_labels("o3");
    l.insert("team".to_owned(), "red".to_owned());
    view.set_namespace("t-03", l);
    let v = assess(&view, &cfg, &a);
    assert_eq!(v, assess_each(&view, &cfg, &a));
    let probe = v
        .probes
        .iter()
        .find(|p| p.name == "ingress into org-a from other organizations' namespaces (12 checked)")
        .unwrap();
    assert!(!probe.passed);
    assert!(
        v.findings
            .iter()
            .any(|f| f.starts_with("NetworkPolicy org-a/team admits ingress")
                && f.contains("t-02, t-03, t-04, t-06, t-08 and 1 more")),
        "{:?}",
        v.findings
    );
}
