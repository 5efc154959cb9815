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
    assert_eq!(c.unreadable().len(), 1);
    assert_eq!(c.unreadable()[0].0, "prod/bad");
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
