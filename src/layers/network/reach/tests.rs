//! The evaluator against cases from the Kubernetes NetworkPolicy documentation's semantics.

use super::*;
use serde_json::json;

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
    .expect("valid NetworkPolicy")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn cluster(policies: &[NetworkPolicy]) -> Cluster {
    Cluster::new(
        [
            ("prod".to_owned(), labels(&[("env", "prod")])),
            ("dev".to_owned(), labels(&[("env", "dev")])),
            ("other".to_owned(), labels(&[])),
        ],
        policies,
    )
}

/// One concrete pod.
fn pod(ns: &str, pairs: &[(&str, &str)], ip: &str) -> PodSet {
    PodSet {
        namespace: NamespaceRef::Known(ns.to_owned()),
        labels: LabelSpace::exactly(&labels(pairs)),
        addresses: AddrSet::parse([ip]).unwrap(),
        named_ports: Some(BTreeMap::new()),
    }
}

fn ep(p: &PodSet) -> Endpoint {
    Endpoint::Pods(p.clone())
}

fn ext(ip: &str) -> Endpoint {
    Endpoint::External(AddrSet::parse([ip]).unwrap())
}

fn ingress_ok(c: &Cluster, src: &PodSet, dst: &PodSet, port: &Port) -> bool {
    c.ingress(&ep(src), dst, port).allowed
}

fn egress_ok(c: &Cluster, src: &PodSet, dst: &PodSet, port: &Port) -> bool {
    c.egress(src, &ep(dst), port).allowed
}

#[test]
fn no_policy_selecting_a_pod_allows_everything() {
    let c = cluster(&[policy(
        "prod",
        "only-db",
        json!({"podSelector": {"matchLabels": {"role": "db"}}, "policyTypes": ["Ingress"]}),
    )]);
    let web = pod("prod", &[("role", "web")], "10.1.0.1");
    let src = pod("dev", &[], "10.2.0.1");
    let side = c.ingress(&ep(&src), &web, &Port::Any);
    assert!(side.allowed && side.unisolated && side.allowed_by.is_empty());
    assert!(egress_ok(&c, &web, &src, &Port::Any));
}

#[test]
fn a_selecting_policy_without_ingress_rules_denies_all_ingress() {
    let c = cluster(&[policy(
        "prod",
        "deny",
        json!({"podSelector": {"matchLabels": {"role": "db"}}, "policyTypes": ["Ingress"]}),
    )]);
    let db = pod("prod", &[("role", "db")], "10.1.0.1");
    let same_ns = pod("prod", &[("role", "web")], "10.1.0.2");
    let side = c.ingress(&ep(&same_ns), &db, &Port::tcp(5432));
    assert!(!side.allowed && !side.unisolated);
    // Ingress-only: the same pod's egress is untouched.
    assert!(egress_ok(&c, &db, &same_ns, &Port::Any));
}

#[test]
fn empty_pod_selector_selects_every_pod_of_the_namespace() {
    let c = cluster(&[policy(
        "prod",
        "default-deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    )]);
    for l in [&[][..], &[("role", "db")][..], &[("anything", "x")][..]] {
        let p = pod("prod", l, "10.1.0.1");
        assert!(!ingress_ok(
            &c,
            &pod("prod", &[], "10.1.0.9"),
            &p,
            &Port::Any
        ));
        assert!(!egress_ok(&c, &p, &pod("dev", &[], "10.2.0.1"), &Port::Any));
    }
    // Other namespaces are not affected.
    assert!(ingress_ok(
        &c,
        &pod("prod", &[], "10.1.0.1"),
        &pod("dev", &[], "10.2.0.1"),
        &Port::Any
    ));
    // Even pods with adversary-chosen labels are selected.
    let any = PodSet::any_in("prod", AddrSet::parse(["10.0.0.0/8"]).unwrap());
    let side = c.ingress(&ext("1.2.3.4"), &any, &Port::Any);
    assert!(!side.allowed && !side.unisolated);
}

#[test]
fn policy_types_default_from_the_rules() {
    // Only ingress rules and no policyTypes: an Ingress policy; egress stays open.
    let ingress_only = policy(
        "prod",
        "i",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
    );
    let c = cluster(&[ingress_only]);
    let a = pod("prod", &[], "10.1.0.1");
    let b = pod("dev", &[], "10.2.0.1");
    assert!(egress_ok(&c, &a, &b, &Port::Any));
    assert!(!ingress_ok(&c, &b, &a, &Port::Any));
    assert!(ingress_ok(
        &c,
        &pod("prod", &[], "10.1.0.2"),
        &a,
        &Port::Any
    ));

    // An egress section and no policyTypes: Ingress and Egress, so ingress is denied as well.
    let with_egress = policy(
        "prod",
        "e",
        json!({"podSelector": {}, "egress": [{"to": [{"podSelector": {}}]}]}),
    );
    let c = cluster(&[with_egress]);
    assert!(!egress_ok(&c, &a, &b, &Port::Any));
    assert!(egress_ok(&c, &a, &pod("prod", &[], "10.1.0.2"), &Port::Any));
    assert!(!ingress_ok(
        &c,
        &pod("prod", &[], "10.1.0.2"),
        &a,
        &Port::Any
    ));

    // Egress only, explicitly: ingress open, egress denied.
    let egress_deny = policy(
        "prod",
        "ed",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    );
    let c = cluster(&[egress_deny]);
    assert!(!egress_ok(&c, &a, &b, &Port::Any));
    assert!(ingress_ok(&c, &b, &a, &Port::Any));
}

#[test]
fn namespace_and_pod_selector_in_one_peer_is_and_in_two_peers_is_or() {
    let and = policy(
        "prod",
        "and",
        json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"env": "dev"}}, "podSelector": {"matchLabels": {"role": "client"}}}
        ]}]}),
    );
    let or = policy(
        "prod",
        "or",
        json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"env": "dev"}}},
            {"podSelector": {"matchLabels": {"role": "client"}}}
        ]}]}),
    );
    let dst = pod("prod", &[("app", "api")], "10.1.0.1");
    let dev_client = pod("dev", &[("role", "client")], "10.2.0.1");
    let dev_other = pod("dev", &[("role", "batch")], "10.2.0.2");
    let prod_client = pod("prod", &[("role", "client")], "10.1.0.2");
    let other_client = pod("other", &[("role", "client")], "10.3.0.1");

    let c = cluster(&[and]);
    assert!(ingress_ok(&c, &dev_client, &dst, &Port::Any));
    assert!(!ingress_ok(&c, &dev_other, &dst, &Port::Any));
    assert!(!ingress_ok(&c, &prod_client, &dst, &Port::Any));
    assert!(!ingress_ok(&c, &other_client, &dst, &Port::Any));

    let c = cluster(&[or]);
    assert!(ingress_ok(&c, &dev_client, &dst, &Port::Any));
    assert!(ingress_ok(&c, &dev_other, &dst, &Port::Any));
    // A podSelector-only peer means pods of the policy's own namespace.
    assert!(ingress_ok(&c, &prod_client, &dst, &Port::Any));
    assert!(!ingress_ok(&c, &other_client, &dst, &Port::Any));
}

#[test]
fn empty_namespace_selector_means_every_namespace() {
    let c = cluster(&[policy(
        "prod",
        "allow-all-ns",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
    )]);
    let dst = pod("prod", &[], "10.1.0.1");
    assert!(ingress_ok(
        &c,
        &pod("other", &[], "10.3.0.1"),
        &dst,
        &Port::Any
    ));
    // ... but no address outside the cluster's pods.
    assert!(!c.ingress(&ext("192.0.2.1"), &dst, &Port::Any).allowed);
    // An unknown namespace with any labels is admitted, and the policy is named.
    let adversary = PodSet {
        namespace: NamespaceRef::Unknown(LabelSpace::any()),
        ..PodSet::any_in("x", AddrSet::parse(["10.0.0.0/8"]).unwrap())
    };
    let side = c.ingress(&Endpoint::Pods(adversary), &dst, &Port::Any);
    assert!(side.allowed);
    assert_eq!(side.allowed_by, vec!["prod/allow-all-ns".to_owned()]);
}

#[test]
fn ip_block_with_except() {
    let c = cluster(&[policy(
        "prod",
        "cidr",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}], "ports": [{"protocol": "TCP", "port": 5978}]}]}),
    )]);
    let dst = pod("prod", &[], "10.1.0.1");
    assert!(c.ingress(&ext("172.17.2.5"), &dst, &Port::Any).allowed);
    assert!(!c.ingress(&ext("172.17.1.5"), &dst, &Port::Any).allowed);
    assert!(!c.ingress(&ext("172.18.0.1"), &dst, &Port::Any).allowed);
    assert!(c.egress(&dst, &ext("10.0.0.7"), &Port::tcp(5978)).allowed);
    assert!(!c.egress(&dst, &ext("10.0.0.7"), &Port::tcp(5979)).allowed);
    assert!(!c.egress(&dst, &ext("10.0.1.7"), &Port::tcp(5978)).allowed);

    // A range of sources: some address outside the holes suffices, holes covering all deny.
    let wide = Endpoint::External(AddrSet::parse(["172.17.1.0/24", "172.17.3.0/24"]).unwrap());
    assert!(c.ingress(&wide, &dst, &Port::Any).allowed);
    let holes_only = Endpoint::External(AddrSet::parse(["172.17.1.128/25"]).unwrap());
    assert!(!c.ingress(&holes_only, &dst, &Port::Any).allowed);
}

#[test]
fn ip_block_covering_the_pod_cidr_reaches_pods() {
    let allow_world = |except: serde_json::Value| {
        cluster(&[policy(
            "prod",
            "world",
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": except}}]}]}),
        )])
    };
    let dst = pod("prod", &[], "10.1.0.1");
    let foreign = PodSet::any_in("other", AddrSet::parse(["10.0.0.0/8"]).unwrap());
    assert!(ingress_ok(
        &allow_world(json!([])),
        &foreign,
        &dst,
        &Port::Any
    ));
    assert!(!ingress_ok(
        &allow_world(json!(["10.0.0.0/8"])),
        &foreign,
        &dst,
        &Port::Any
    ));
    // Families never mix.
    let v6 = cluster(&[policy(
        "prod",
        "v6",
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "::/0"}}]}]}),
    )]);
    assert!(!ingress_ok(&v6, &foreign, &dst, &Port::Any));
    assert!(v6.ingress(&ext("2001:db8::1"), &dst, &Port::Any).allowed);
}

#[test]
fn ports_numbers_ranges_protocols_and_named_ports() {
    let c = cluster(&[policy(
        "prod",
        "ports",
        json!({"podSelector": {}, "ingress": [{"ports": [
            {"protocol": "TCP", "port": 6379},
            {"port": 32000, "endPort": 32768},
            {"protocol": "UDP", "port": "dns"},
            {"port": "http"}
        ]}]}),
    )]);
    let src = pod("dev", &[], "10.2.0.1");
    let mut dst = pod("prod", &[], "10.1.0.1");
    dst.named_ports = Some(BTreeMap::from([
        ("http".to_owned(), ("TCP".to_owned(), 8080)),
        ("dns".to_owned(), ("UDP".to_owned(), 53)),
    ]));
    assert!(ingress_ok(&c, &src, &dst, &Port::tcp(6379)));
    assert!(!ingress_ok(&c, &src, &dst, &Port::tcp(6380)));
    assert!(!ingress_ok(&c, &src, &dst, &Port::udp(6379)));
    // endPort: the range is inclusive, protocol defaults to TCP.
    assert!(ingress_ok(&c, &src, &dst, &Port::tcp(32000)));
    assert!(ingress_ok(&c, &src, &dst, &Port::tcp(32768)));
    assert!(!ingress_ok(&c, &src, &dst, &Port::tcp(32769)));
    assert!(!ingress_ok(&c, &src, &dst, &Port::udp(32100)));
    // Named ports resolve against the destination pod's container ports.
    assert!(ingress_ok(&c, &src, &dst, &Port::tcp(8080)));
    assert!(!ingress_ok(&c, &src, &dst, &Port::tcp(8081)));
    assert!(ingress_ok(&c, &src, &dst, &Port::udp(53)));
    assert!(!ingress_ok(&c, &src, &dst, &Port::tcp(53)));
    // A pod without a port named "http" is not opened on 8080 by that name.
    let unnamed = pod("prod", &[], "10.1.0.2");
    assert!(!ingress_ok(&c, &src, &unnamed, &Port::tcp(8080)));
    // Pods whose ports are unknown may name any port.
    let mut unknown = pod("prod", &[], "10.1.0.3");
    unknown.named_ports = None;
    assert!(ingress_ok(&c, &src, &unknown, &Port::tcp(8080)));
}

#[test]
fn match_expressions_in_notin_exists_doesnotexist() {
    let c = cluster(&[
        policy(
            "prod",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ),
        policy(
            "prod",
            "expr",
            json!({"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["api", "web"]}]},
                "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                    {"key": "env", "operator": "NotIn", "values": ["prod"]},
                    {"key": "team", "operator": "DoesNotExist"}
                ]}, "podSelector": {"matchExpressions": [{"key": "client", "operator": "Exists"}]}}]}]}),
        ),
    ]);
    let api = pod("prod", &[("tier", "api")], "10.1.0.1");
    let db = pod("prod", &[("tier", "db")], "10.1.0.2");
    let dev_client = pod("dev", &[("client", "yes")], "10.2.0.1");
    let other_client = pod("other", &[("client", "")], "10.3.0.1");
    let dev_plain = pod("dev", &[], "10.2.0.2");
    let prod_client = pod("prod", &[("client", "yes")], "10.1.0.3");
    assert!(ingress_ok(&c, &dev_client, &api, &Port::Any));
    // NotIn matches a namespace without the key.
    assert!(ingress_ok(&c, &other_client, &api, &Port::Any));
    assert!(!ingress_ok(&c, &dev_plain, &api, &Port::Any));
    assert!(!ingress_ok(&c, &prod_client, &api, &Port::Any));
    assert!(!ingress_ok(&c, &dev_client, &db, &Port::Any));

    let mut with_team = cluster(&[]);
    with_team.set_namespace("dev", labels(&[("env", "dev"), ("team", "a")]));
    with_team.replace_policies("prod", &[policy(
        "prod",
        "expr",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
            {"key": "team", "operator": "DoesNotExist"}]}}]}]}),
    )]);
    assert!(!ingress_ok(&with_team, &dev_client, &api, &Port::Any));
}

#[test]
fn adversary_labels_are_solved_for_not_guessed() {
    // Two policies that together select every pod: nothing escapes.
    let c = cluster(&[
        policy(
            "prod",
            "in",
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["x"]}]}, "policyTypes": ["Ingress"]}),
        ),
        policy(
            "prod",
            "notin",
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["x"]}]}, "policyTypes": ["Ingress"]}),
        ),
    ]);
    let any = PodSet::any_in("prod", AddrSet::parse(["10.0.0.0/8"]).unwrap());
    let src = PodSet::any_in("other", AddrSet::parse(["10.0.0.0/8"]).unwrap());
    let side = c.ingress(&ep(&src), &any, &Port::Any);
    assert!(!side.allowed && !side.unisolated);

    // One of them alone leaves pods (app absent or other) unselected.
    let c = cluster(&[policy(
        "prod",
        "in",
        json!({"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Ingress"]}),
    )]);
    let side = c.ingress(&ep(&src), &any, &Port::Any);
    assert!(side.allowed && side.unisolated);

    // A label constraint on the target pods (shared-namespace mode) limits what selects them.
    let c = cluster(&[
        policy(
            "prod",
            "org-a",
            json!({"podSelector": {"matchLabels": {"org": "a"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"org": "a"}}}]}]}),
        ),
        policy(
            "prod",
            "org-b",
            json!({"podSelector": {"matchLabels": {"org": "b"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"org": "b"}}}]}]}),
        ),
    ]);
    let a_pods = PodSet {
        labels: LabelSpace::any().with("org", KeyDomain::equals("a")),
        ..any.clone()
    };
    let b_pods = PodSet {
        labels: LabelSpace::any().with("org", KeyDomain::equals("b")),
        ..any.clone()
    };
    let not_a = PodSet {
        labels: LabelSpace::any().with("org", KeyDomain::not_in(["a"])),
        ..any.clone()
    };
    assert!(!c.ingress(&ep(&b_pods), &a_pods, &Port::Any).allowed);
    assert!(!c.ingress(&ep(&not_a), &a_pods, &Port::Any).allowed);
    assert!(c.ingress(&ep(&a_pods), &a_pods, &Port::Any).allowed);
    assert_eq!(
        c.ingress(&ep(&b_pods), &b_pods, &Port::Any).allowed_by,
        vec!["prod/org-b".to_owned()]
    );
}

#[test]
fn a_connection_needs_both_sides() {
    let c = cluster(&[
        policy(
            "prod",
            "deny-egress",
            json!({"podSelector": {}, "policyTypes": ["Egress"]}),
        ),
        policy(
            "dev",
            "allow-from-prod",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}]}]}),
        ),
    ]);
    let p = pod("prod", &[], "10.1.0.1");
    let d = pod("dev", &[], "10.2.0.1");
    let path = c.path(&ep(&p), &ep(&d), &Port::Any);
    assert!(path.ingress.allowed && !path.egress.allowed && !path.reachable());
    let back = c.path(&ep(&d), &ep(&p), &Port::Any);
    assert!(back.reachable());
}

#[test]
fn an_unreadable_policy_counts_as_allowing_everything() {
    let bad = policy(
        "prod",
        "bad",
        json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}, "policyTypes": ["Ingress"]}),
    );
    let c = cluster(&[
        policy(
            "prod",
            "deny",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ),
        bad,
    ]);
    let unreadable: Vec<_> = c.unreadable().collect();
    assert_eq!(unreadable.len(), 1);
    assert_eq!(unreadable[0].0, "prod/bad");
    let side = c.ingress(
        &ep(&pod("other", &[], "10.3.0.1")),
        &pod("prod", &[], "10.1.0.1"),
        &Port::Any,
    );
    assert!(side.allowed);
    assert_eq!(side.allowed_by, vec!["prod/bad".to_owned()]);
}

#[test]
fn replacing_a_namespace_policies_takes_effect() {
    let mut c = cluster(&[policy(
        "prod",
        "deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    )]);
    let src = pod("dev", &[], "10.2.0.1");
    let dst = pod("prod", &[], "10.1.0.1");
    assert!(!ingress_ok(&c, &src, &dst, &Port::Any));
    c.replace_policies("prod", &[]);
    assert!(ingress_ok(&c, &src, &dst, &Port::Any));
}

#[test]
fn cidrs_parse_and_compare() {
    let r = IpRange::parse_cidr("10.1.2.3/8").unwrap();
    assert!(IpRange::parse_cidr("10.200.0.0/16").unwrap().within(&r));
    assert!(!IpRange::parse_cidr("11.0.0.0/16").unwrap().overlaps(&r));
    assert!(IpRange::parse_cidr("0.0.0.0/0").unwrap().overlaps(&r));
    assert!(
        IpRange::parse_cidr("::/0")
            .unwrap()
            .within(&IpRange::parse_cidr("::/0").unwrap())
    );
    assert!(!IpRange::parse_cidr("::/0").unwrap().overlaps(&r));
    for bad in ["10.0.0.0/33", "x/8", "10.0.0.0/a", "::/129"] {
        assert!(IpRange::parse_cidr(bad).is_err(), "{bad}");
    }
    let all = AddrSet::parse(["0.0.0.0/0"]).unwrap();
    let top = IpRange::parse_cidr("255.255.255.255/32").unwrap();
    assert!(all.meets_block(&top, &[]));
    assert!(!all.meets_block(&top, &[top]));
    let v6_all = IpRange::parse_cidr("::/0").unwrap();
    assert!(!AddrSet::new(vec![v6_all]).meets_block(&v6_all, &[v6_all]));
}

// ---------------------------------------------------------------------------------------------
// Views over a shared cluster
// ---------------------------------------------------------------------------------------------

fn deny_ingress(ns: &str) -> NetworkPolicy {
    policy(
        ns,
        "deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    )
}

fn unreadable(ns: &str, name: &str) -> NetworkPolicy {
    policy(
        ns,
        name,
        json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}, "policyTypes": ["Ingress"]}),
    )
}

fn from_env(ns: &str, env: &str) -> NetworkPolicy {
    policy(
        ns,
        &format!("from-{env}"),
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": env}}}]}]}),
    )
}

fn names(c: &Cluster) -> Vec<String> {
    c.namespaces().map(|(n, _)| n.clone()).collect()
}

fn unreadable_ids(c: &Cluster) -> Vec<String> {
    c.unreadable().map(|(id, _)| id.clone()).collect()
}

#[test]
fn a_view_that_read_nothing_answers_as_its_base() {
    let base = Arc::new(cluster(&[deny_ingress("prod"), unreadable("dev", "bad")]));
    let view = Cluster::over(base.clone());
    assert_eq!(names(&view), names(&base));
    assert_eq!(names(&view), ["dev", "other", "prod"]);
    assert_eq!(unreadable_ids(&view), ["dev/bad"]);
    for (src, dst) in [("dev", "prod"), ("prod", "dev"), ("other", "prod")] {
        let (s, d) = (pod(src, &[], "10.2.0.1"), pod(dst, &[], "10.1.0.1"));
        assert_eq!(
            view.path(&ep(&s), &ep(&d), &Port::Any),
            base.path(&ep(&s), &ep(&d), &Port::Any),
            "{src} -> {dst}"
        );
    }
    assert!(!ingress_ok(
        &view,
        &pod("dev", &[], "10.2.0.1"),
        &pod("prod", &[], "10.1.0.1"),
        &Port::Any
    ));
}

#[test]
fn a_view_replaces_a_namespace_labels() {
    // dev lets in the namespaces labelled env=prod.
    let base = Arc::new(cluster(&[from_env("dev", "prod")]));
    let mut view = Cluster::over(base.clone());
    view.set_namespace("prod", labels(&[("env", "staging")]));
    let (p, d) = (pod("prod", &[], "10.1.0.1"), pod("dev", &[], "10.2.0.1"));
    assert!(ingress_ok(&base, &p, &d, &Port::Any));
    assert!(!ingress_ok(&view, &p, &d, &Port::Any));
    let prod: Vec<_> = view.namespaces().filter(|(n, _)| *n == "prod").collect();
    assert_eq!(
        prod,
        [(
            &"prod".to_owned(),
            &labels(&[("env", "staging"), (NAMESPACE_NAME_LABEL, "prod")])
        )]
    );
    // Labels only: the namespace's policies are still the base's.
    view.set_namespace("dev", labels(&[("env", "prod")]));
    let side = view.ingress(&ep(&pod("other", &[], "10.3.0.1")), &d, &Port::Any);
    assert!(!side.allowed && !side.unisolated, "{side:?}");
    // dev now lets itself in: it is labelled env=prod.
    assert!(!ingress_ok(
        &base,
        &pod("dev", &[], "10.2.0.2"),
        &d,
        &Port::Any
    ));
    assert!(ingress_ok(
        &view,
        &pod("dev", &[], "10.2.0.2"),
        &d,
        &Port::Any
    ));
    assert_eq!(names(&view), ["dev", "other", "prod"]);
}

#[test]
fn a_view_replaces_a_namespace_policies_and_hides_their_unreadable_entries() {
    let base = Arc::new(cluster(&[
        deny_ingress("prod"),
        unreadable("prod", "bad"),
        unreadable("dev", "bad"),
    ]));
    let src = pod("other", &[], "10.3.0.1");
    let dst = pod("prod", &[], "10.1.0.1");
    assert_eq!(
        base.ingress(&ep(&src), &dst, &Port::Any).allowed_by,
        ["prod/bad"]
    );

    let mut view = Cluster::over(base.clone());
    view.replace_policies("prod", &[deny_ingress("prod")]);
    let side = view.ingress(&ep(&src), &dst, &Port::Any);
    assert!(!side.allowed && !side.unisolated, "{side:?}");
    assert_eq!(unreadable_ids(&view), ["dev/bad"]);

    // Read again with a new unreadable policy: it is the view's own.
    view.replace_policies("prod", &[unreadable("prod", "worse")]);
    assert_eq!(unreadable_ids(&view), ["dev/bad", "prod/worse"]);
    assert_eq!(
        view.ingress(&ep(&src), &dst, &Port::Any).allowed_by,
        ["prod/worse"]
    );

    // Read again with none: none count, not the base's.
    view.replace_policies("prod", &[]);
    let side = view.ingress(&ep(&src), &dst, &Port::Any);
    assert!(side.allowed && side.unisolated && side.allowed_by.is_empty());
    assert_eq!(unreadable_ids(&view), ["dev/bad"]);

    // A namespace whose name is a prefix of another's hides only its own entries.
    let base = Arc::new(cluster(&[
        unreadable("prod", "bad"),
        unreadable("prod2", "bad"),
    ]));
    let mut view = Cluster::over(base);
    view.replace_policies("prod", &[]);
    assert_eq!(unreadable_ids(&view), ["prod2/bad"]);
}

#[test]
fn policies_of_other_namespaces_in_a_read_are_ignored() {
    let base = Arc::new(cluster(&[]));
    let mut view = Cluster::over(base);
    view.replace_policies("prod", &[deny_ingress("dev"), unreadable("dev", "bad")]);
    assert!(unreadable_ids(&view).is_empty());
    let (p, d) = (pod("prod", &[], "10.1.0.1"), pod("dev", &[], "10.2.0.1"));
    assert!(ingress_ok(&view, &p, &d, &Port::Any));
    assert!(ingress_ok(&view, &d, &p, &Port::Any));
}

#[test]
fn a_namespace_only_in_the_view_is_visible() {
    let base = Arc::new(cluster(&[]));
    let mut view = Cluster::over(base.clone());
    view.set_namespace("new", labels(&[("env", "prod")]));
    view.replace_policies("new", &[deny_ingress("new")]);
    view.set_namespace("aaa", labels(&[]));
    assert_eq!(names(&view), ["aaa", "dev", "new", "other", "prod"]);
    assert_eq!(names(&base), ["dev", "other", "prod"]);
    let n = pod("new", &[], "10.4.0.1");
    let d = pod("dev", &[], "10.2.0.1");
    assert!(!ingress_ok(&view, &d, &n, &Port::Any));
    assert!(ingress_ok(&base, &d, &n, &Port::Any));

    // Its labels answer namespaceSelector questions.
    let mut view = Cluster::over(Arc::new(cluster(&[from_env("dev", "prod")])));
    let (x, d) = (pod("x", &[], "10.5.0.1"), pod("dev", &[], "10.2.0.1"));
    assert!(!ingress_ok(&view, &x, &d, &Port::Any));
    view.set_namespace("x", labels(&[("env", "prod")]));
    assert!(ingress_ok(&view, &x, &d, &Port::Any));
}

#[test]
fn the_base_is_shared_and_unchanged_by_its_views() {
    let base = Arc::new(cluster(&[
        deny_ingress("prod"),
        unreadable("prod", "bad"),
        from_env("dev", "prod"),
    ]));
    let before = format!("{base:?}");
    let mut view = Cluster::over(base.clone());
    assert_eq!(Arc::strong_count(&base), 2);
    view.set_namespace("prod", labels(&[("env", "x")]));
    view.replace_policies("prod", &[]);
    view.set_namespace("new", labels(&[]));
    view.replace_policies("dev", &[unreadable("dev", "bad")]);

    // Cloning a view, or a view over a view, copies only what the view read.
    let copy = view.clone();
    let mut nested = Cluster::over(Arc::new(view.clone()));
    assert_eq!(Arc::strong_count(&base), 4);
    for v in [&view, &copy, &nested] {
        assert!(Arc::ptr_eq(v.base.as_ref().unwrap(), &base));
    }
    nested.replace_policies("other", &[deny_ingress("other")]);
    assert_eq!(format!("{view:?}"), format!("{copy:?}"));
    assert_eq!(unreadable_ids(&nested), ["dev/bad"]);
    assert_eq!(names(&nested), ["dev", "new", "other", "prod"]);

    assert_eq!(format!("{base:?}"), before);
    assert!(base.base.is_none());
    assert_eq!(names(&base), ["dev", "other", "prod"]);
    assert_eq!(unreadable_ids(&base), ["prod/bad"]);
    drop((view, copy, nested));
    assert_eq!(Arc::strong_count(&base), 1);
}

/// A small deterministic generator for the network layer's equivalence tests.
pub(crate) struct Lcg(pub(crate) u64);

impl Lcg {
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
    pub(crate) fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }
    pub(crate) fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

#[test]
fn a_view_answers_as_a_copy_with_the_same_reads() {
    let spaces = ["prod", "dev", "other", "new", "prod2"];
    let envs = ["prod", "dev", "staging"];
    let menu = |ns: &str| -> Vec<NetworkPolicy> {
        let mut all = vec![
            deny_ingress(ns),
            unreadable(ns, "bad"),
            policy(
                ns,
                "deny-egress",
                json!({"podSelector": {"matchLabels": {"role": "db"}}, "policyTypes": ["Egress"]}),
            ),
            policy(
                ns,
                "same-ns",
                json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}], "egress": [{"to": [{"podSelector": {}}]}]}),
            ),
        ];
        all.extend(envs.iter().map(|e| from_env(ns, e)));
        all
    };
    let mut rng = Lcg(7);
    for round in 0..60 {
        let pick = |rng: &mut Lcg| -> Vec<NetworkPolicy> {
            (0..rng.below(4))
                .map(|_| {
                    let ns = spaces[rng.below(spaces.len())];
                    let m = menu(ns);
                    m[rng.below(m.len())].clone()
                })
                .collect()
        };
        let base_policies: Vec<NetworkPolicy> = (0..3).flat_map(|_| pick(&mut rng)).collect();
        let base = Arc::new(cluster(&base_policies));
        let mut copy = Cluster::clone(&base);
        let mut view = Cluster::over(base.clone());
        let before = format!("{base:?}");
        for _ in 0..rng.below(5) {
            let ns = spaces[rng.below(spaces.len())];
            match rng.below(3) {
                0 => {
                    let l = labels(&[("env", envs[rng.below(envs.len())])]);
                    copy.set_namespace(ns, l.clone());
                    view.set_namespace(ns, l);
                }
                _ => {
                    let mut read = pick(&mut rng);
                    read.extend(menu(ns).into_iter().filter(|_| rng.below(3) == 0));
                    copy.replace_policies(ns, &read);
                    view.replace_policies(ns, &read);
                }
            }
        }
        assert_eq!(format!("{base:?}"), before, "round {round}");
        let ns_of = |c: &Cluster| -> Vec<(String, BTreeMap<String, String>)> {
            c.namespaces()
                .map(|(n, l)| (n.clone(), l.clone()))
                .collect()
        };
        assert_eq!(ns_of(&view), ns_of(&copy), "round {round}");
        assert_eq!(
            unreadable_ids(&view),
            unreadable_ids(&copy),
            "round {round}"
        );
        let sets: Vec<PodSet> = spaces
            .iter()
            .flat_map(|ns| {
                [
                    PodSet::any_in(ns, AddrSet::parse(["10.0.0.0/8"]).unwrap()),
                    pod(ns, &[("role", "db")], "10.9.0.1"),
                ]
            })
            .chain(std::iter::once(PodSet {
                namespace: NamespaceRef::Unknown(
                    LabelSpace::any().with("env", KeyDomain::not_in(["prod"])),
                ),
                ..PodSet::any_in("", AddrSet::parse(["10.0.0.0/8"]).unwrap())
            }))
            .collect();
        for s in &sets {
            for d in &sets {
                assert_eq!(
                    view.path(&ep(s), &ep(d), &Port::Any),
                    copy.path(&ep(s), &ep(d), &Port::Any),
                    "round {round}: {s:?} -> {d:?}"
                );
            }
        }
    }
}
