use super::*;
use crate::api::DeletionPolicy;
use crate::api::platform::EgressTarget;
use crate::layers::network::reach::{
    AddrSet, Cluster, Endpoint, KeyDomain, LabelSpace, NamespaceRef, PodSet, Port,
};
use crate::tenant::OrgId;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::json;

/// A Tenant for pure tests of the network layer.
pub(crate) fn tenant(id: &str) -> Tenant {
    Tenant {
        name: format!("{id}-org"),
        org_id: OrgId::parse(id).unwrap(),
        display_name: id.to_owned(),
        namespace: format!("org-{id}"),
        deletion_policy: DeletionPolicy::Retain,
        rotate: false,
        peers: vec![OrgId::sentinel()],
        owner: OwnerReference {
            api_version: "bulkhead.dev/v1alpha1".into(),
            kind: "Organization".into(),
            name: format!("{id}-org"),
            uid: format!("uid-{id}"),
            controller: Some(true),
            block_owner_deletion: Some(true),
        },
        adopt_from: None,
        resource_quota: None,
        limit_range: None,
    }
}

fn target(v: serde_json::Value) -> EgressTarget {
    serde_json::from_value(v).unwrap()
}

fn platform() -> NetworkPlatform {
    NetworkPlatform {
        ingress_namespaces: vec!["gateway".into()],
        egress: vec![
            target(
                json!({"name": "postgres", "namespace": "data", "podLabels": {"app": "postgres"}, "ports": [5432]}),
            ),
            target(json!({"name": "s3", "cidr": "0.0.0.0/0", "ports": [443]})),
        ],
        ..NetworkPlatform::default()
    }
}

fn names(p: &NetworkPlan) -> Vec<(String, String)> {
    p.policies
        .iter()
        .map(|p| {
            (
                p.metadata.namespace.clone().unwrap(),
                p.metadata.name.clone().unwrap(),
            )
        })
        .collect()
}

#[test]
fn namespace_mode_plans_the_documented_policies() {
    let cfg = validate(&platform()).unwrap();
    let t = tenant("acme");
    let p = plan(&cfg, &t);
    let want: Vec<(String, String)> = [
        DEFAULT_DENY,
        ALLOW_SAME_NAMESPACE,
        ALLOW_DNS,
        ALLOW_GATEWAYS,
        "bulkhead-egress-postgres",
        "bulkhead-egress-s3",
    ]
    .iter()
    .map(|n| ("org-acme".to_owned(), (*n).to_owned()))
    .collect();
    assert_eq!(names(&p), want);
    for np in &p.policies {
        let m = &np.metadata;
        assert_eq!(m.labels.as_ref().unwrap()["bulkhead.dev/org-id"], "acme");
        assert_eq!(
            m.labels.as_ref().unwrap()["bulkhead.dev/organization"],
            "acme-org"
        );
        assert_eq!(m.labels.as_ref().unwrap()[MANAGED_BY_LABEL], "bulkhead");
        assert_eq!(m.owner_references.as_ref().unwrap()[0].uid, "uid-acme");
        assert_eq!(m.annotations.as_ref().unwrap()[PLAN_ANNOTATION], p.hash);
    }
    let deny = serde_json::to_value(&p.policies[0].spec).unwrap();
    assert_eq!(
        deny,
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [], "egress": []})
    );
    let s3 = serde_json::to_value(&p.policies[5].spec).unwrap();
    assert_eq!(
        s3["egress"][0]["to"][0]["ipBlock"],
        json!({"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]})
    );
    assert_eq!(s3["policyTypes"], json!(["Egress"]));
    let pg = serde_json::to_value(&p.policies[4].spec).unwrap();
    assert_eq!(
        pg["egress"][0],
        json!({"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "data"}},
            "podSelector": {"matchLabels": {"app": "postgres"}}}], "ports": [{"protocol": "TCP", "port": 5432}]})
    );
    assert!(p.resource_quota.is_none() && p.limit_range.is_none());
}

#[test]
fn the_hash_is_stable_and_follows_the_plan() {
    let cfg = validate(&platform()).unwrap();
    let t = tenant("acme");
    let a = plan(&cfg, &t);
    assert_eq!(a, plan(&cfg, &t));
    assert_eq!(a.hash.len(), 16);
    let mut changed = platform();
    changed.egress.pop();
    let b = plan(&validate(&changed).unwrap(), &t);
    assert_ne!(a.hash, b.hash);
    assert_eq!(b.policies.len(), 5);
    let mut limited = t.clone();
    limited.resource_quota = Some(serde_json::from_value(json!({"hard": {"pods": "10"}})).unwrap());
    limited.limit_range = Some(
        serde_json::from_value(
            json!({"limits": [{"type": "Container", "default": {"cpu": "500m"}}]}),
        )
        .unwrap(),
    );
    let c = plan(&cfg, &limited);
    assert_ne!(a.hash, c.hash);
    assert_eq!(
        c.resource_quota.as_ref().unwrap().metadata.name.as_deref(),
        Some(RESOURCE_QUOTA)
    );
    assert_eq!(
        c.limit_range
            .as_ref()
            .unwrap()
            .metadata
            .namespace
            .as_deref(),
        Some("org-acme")
    );
}

#[test]
fn shared_mode_plans_one_policy_per_shared_namespace() {
    let mut pf = platform();
    pf.mode = NetworkMode::SharedNamespace;
    pf.shared_namespaces = vec!["apps".into(), "workers".into()];
    let cfg = validate(&pf).unwrap();
    let t = tenant("acme");
    let p = plan(&cfg, &t);
    assert_eq!(
        names(&p),
        vec![
            ("apps".to_owned(), "bulkhead-acme-isolation".to_owned()),
            ("workers".to_owned(), "bulkhead-acme-isolation".to_owned())
        ]
    );
    let s = serde_json::to_value(&p.policies[0].spec).unwrap();
    assert_eq!(
        s["podSelector"],
        json!({"matchLabels": {"bulkhead.dev/org-id": "acme"}})
    );
    assert_eq!(s["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        pod_namespaces(&cfg, &t),
        vec!["apps".to_owned(), "workers".to_owned()]
    );
}

#[test]
fn bad_configuration_is_refused_with_its_reason() {
    let cases: Vec<(NetworkPlatform, &str)> = vec![
        (
            NetworkPlatform {
                mode: NetworkMode::SharedNamespace,
                ..Default::default()
            },
            "sharedNamespaces",
        ),
        (
            NetworkPlatform {
                ingress_namespaces: vec!["Bad_NS".into()],
                ..Default::default()
            },
            "Bad_NS",
        ),
        (
            NetworkPlatform {
                pod_cidrs: vec!["10.0.0.0/40".into()],
                ..Default::default()
            },
            "podCidrs",
        ),
        (
            NetworkPlatform {
                pod_cidrs: vec![],
                ..Default::default()
            },
            "podCidrs",
        ),
        (
            NetworkPlatform {
                egress: vec![target(
                    json!({"name": "x", "namespace": "a", "cidr": "1.2.3.4/32"}),
                )],
                ..Default::default()
            },
            "both",
        ),
        (
            NetworkPlatform {
                egress: vec![target(json!({"name": "x"}))],
                ..Default::default()
            },
            "needs a namespace",
        ),
        (
            NetworkPlatform {
                egress: vec![target(json!({"name": "X y", "namespace": "a"}))],
                ..Default::default()
            },
            "\"X y\"",
        ),
        (
            NetworkPlatform {
                egress: vec![target(json!({"name": "x", "namespace": "a", "ports": [0]}))],
                ..Default::default()
            },
            "port 0",
        ),
        (
            NetworkPlatform {
                egress: vec![target(
                    json!({"name": "x", "cidr": "1.2.3.4/32", "podLabels": {"a": "b"}}),
                )],
                ..Default::default()
            },
            "podLabels",
        ),
        (
            NetworkPlatform {
                egress: vec![target(json!({"name": "x", "cidr": "nope"}))],
                ..Default::default()
            },
            "not a CIDR",
        ),
        (
            NetworkPlatform {
                egress: vec![
                    target(json!({"name": "x", "namespace": "a"})),
                    target(json!({"name": "x", "namespace": "b"})),
                ],
                ..Default::default()
            },
            "twice",
        ),
    ];
    for (pf, want) in cases {
        let err = validate(&pf).unwrap_err();
        assert!(err.contains(want), "{err:?} should mention {want:?}");
    }
}

#[test]
fn namespace_templates_without_one_org_id_are_refused() {
    for bad in [
        "shared",
        "org-{orgId}-{orgId}",
        "Org-{orgId}",
        "org_{orgId}",
    ] {
        let pf = NetworkPlatform {
            namespace_template: bad.into(),
            ..Default::default()
        };
        let err = validate(&pf).unwrap_err();
        assert!(err.contains("namespaceTemplate"), "{bad}: {err}");
    }
    assert!(validate(&NetworkPlatform::default()).is_ok());
}

#[test]
fn normalize_ignores_what_the_server_fills_in() {
    let cfg = validate(&platform()).unwrap();
    let p = plan(&cfg, &tenant("acme"));
    for planned in &p.policies {
        // What the API server returns: empty lists dropped, defaults filled.
        let mut v = serde_json::to_value(planned).unwrap();
        let spec = v["spec"].as_object_mut().unwrap();
        spec.retain(|_, x| !matches!(x, serde_json::Value::Array(a) if a.is_empty()));
        let live: NetworkPolicy = serde_json::from_value(v).unwrap();
        assert!(same_spec(&live, planned), "{:?}", planned.metadata.name);
    }
    let a: NetworkPolicy =
        serde_json::from_value(json!({"metadata": {}, "spec": {"podSelector": {},
        "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}]}}))
        .unwrap();
    let b: NetworkPolicy = serde_json::from_value(json!({"metadata": {}, "spec": {"podSelector": {"matchLabels": {}},
        "policyTypes": ["Ingress"], "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"protocol": "TCP", "port": 80}]}]}})).unwrap();
    assert!(same_spec(&a, &b));
    // `{}` selectors keep their meaning: all namespaces is not the own namespace.
    let c: NetworkPolicy =
        serde_json::from_value(json!({"metadata": {}, "spec": {"podSelector": {},
        "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 80}]}]}}))
        .unwrap();
    assert!(!same_spec(&a, &c));
}

#[test]
fn metadata_drift_is_seen() {
    let cfg = validate(&platform()).unwrap();
    let p = plan(&cfg, &tenant("acme"));
    let planned = &p.policies[0].metadata;
    assert!(same_meta(planned, planned));
    let mut extra = planned.clone();
    extra
        .labels
        .as_mut()
        .unwrap()
        .insert("team".into(), "x".into());
    assert!(same_meta(&extra, planned));
    let mut unlabelled = planned.clone();
    unlabelled
        .labels
        .as_mut()
        .unwrap()
        .remove("bulkhead.dev/org-id");
    assert!(!same_meta(&unlabelled, planned));
    let mut orphaned = planned.clone();
    orphaned.owner_references = None;
    assert!(!same_meta(&orphaned, planned));
    let mut old = planned.clone();
    old.annotations = Some(BTreeMap::from([(
        PLAN_ANNOTATION.to_owned(),
        "0000".to_owned(),
    )]));
    assert!(!same_meta(&old, planned));
}

/// The plan, read by the evaluator: other organizations are shut out, the allowed paths work.
#[test]
fn the_planned_policies_isolate_according_to_the_evaluator() {
    let cfg = validate(&platform()).unwrap();
    let a = plan(&cfg, &tenant("a"));
    let b = plan(&cfg, &tenant("b"));
    let ns = |n: &str, id: Option<&str>| {
        let mut l = BTreeMap::new();
        if let Some(id) = id {
            l.insert(ORG_ID_LABEL.to_owned(), id.to_owned());
        }
        (n.to_owned(), l)
    };
    let policies: Vec<NetworkPolicy> = a.policies.iter().chain(&b.policies).cloned().collect();
    let c = Cluster::new(
        [
            ns("org-a", Some("a")),
            ns("org-b", Some("b")),
            ns("gateway", None),
            ns("kube-system", None),
            ns("data", None),
        ],
        &policies,
    );
    let pods = AddrSet::parse(["10.0.0.0/8"]).unwrap();
    let in_ns = |n: &str| Endpoint::Pods(PodSet::any_in(n, pods.clone()));
    let pa = PodSet::any_in("org-a", pods.clone());
    assert!(
        !c.path(&in_ns("org-b"), &in_ns("org-a"), &Port::Any)
            .reachable()
    );
    assert!(!c.ingress(&in_ns("org-b"), &pa, &Port::Any).allowed);
    assert!(!c.egress(&pa, &in_ns("org-b"), &Port::Any).allowed);
    assert!(c.ingress(&in_ns("gateway"), &pa, &Port::tcp(8080)).allowed);
    assert!(
        c.path(&in_ns("org-a"), &in_ns("org-a"), &Port::Any)
            .reachable()
    );
    assert!(c.egress(&pa, &in_ns("kube-system"), &Port::udp(53)).allowed);
    assert!(
        !c.egress(&pa, &in_ns("kube-system"), &Port::tcp(443))
            .allowed
    );
    let pg = PodSet {
        labels: LabelSpace::any().with("app", KeyDomain::equals("postgres")),
        ..PodSet::any_in("data", pods.clone())
    };
    assert!(
        c.egress(&pa, &Endpoint::Pods(pg.clone()), &Port::tcp(5432))
            .allowed
    );
    assert!(!c.egress(&pa, &Endpoint::Pods(pg), &Port::tcp(5433)).allowed);
    assert!(
        c.egress(
            &pa,
            &Endpoint::External(AddrSet::parse(["52.1.2.3"]).unwrap()),
            &Port::tcp(443)
        )
        .allowed
    );
    // The wide S3 CIDR does not open the pod network.
    assert!(!c.egress(&pa, &in_ns("org-b"), &Port::tcp(443)).allowed);
    // An adversary namespace whatever its labels (but not the gateway's name) is shut out.
    let adversary = Endpoint::Pods(PodSet {
        namespace: NamespaceRef::Unknown(LabelSpace::any().with(
            "kubernetes.io/metadata.name",
            KeyDomain::present_but(["gateway", "org-a"]),
        )),
        ..PodSet::any_in("x", pods.clone())
    });
    assert!(!c.ingress(&adversary, &pa, &Port::Any).allowed);
}
