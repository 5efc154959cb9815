//! Cost of the reachability check for one organization as the number of organizations grows.
//! Run: `cargo bench --bench network`. Pure CPU, no server; the baseline is the same check with
//! 10 organizations, measured in the same run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bulkhead::api::DeletionPolicy;
use bulkhead::api::platform::NetworkPlatform;
use bulkhead::layers::Tenant;
use bulkhead::layers::network::assess::assess;
use bulkhead::layers::network::plan::{plan, validate};
use bulkhead::layers::network::reach::Cluster;
use bulkhead::tenant::OrgId;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

fn tenant(i: usize) -> Tenant {
    let id = format!("org-{i}");
    Tenant {
        name: id.clone(),
        org_id: OrgId::parse(&id).expect("valid id"),
        display_name: id.clone(),
        namespace: format!("ns-{id}"),
        deletion_policy: DeletionPolicy::Retain,
        rotate: false,
        peers: vec![OrgId::sentinel(), OrgId::parse("org-1").expect("valid id")],
        owner: OwnerReference {
            name: id.clone(),
            uid: id,
            ..Default::default()
        },
        adopt_from: None,
        resource_quota: None,
        limit_range: None,
    }
}

/// Median time of one `assess` for org-0 among `n` organizations.
fn measure(n: usize) -> Duration {
    let pf: NetworkPlatform = serde_json::from_value(serde_json::json!({
        "ingressNamespaces": ["gateway"],
        "egress": [{"name": "postgres", "namespace": "data", "podLabels": {"app": "pg"}, "ports": [5432]},
                   {"name": "s3", "cidr": "0.0.0.0/0", "ports": [443]}],
    }))
    .expect("platform");
    let cfg = validate(&pf).expect("valid config");
    let tenants: Vec<Tenant> = (0..n).map(tenant).collect();
    let policies: Vec<NetworkPolicy> = tenants
        .iter()
        .flat_map(|t| plan(&cfg, t).policies)
        .collect();
    let namespaces = tenants.iter().map(|t| {
        (
            t.namespace.clone(),
            BTreeMap::from([("bulkhead.dev/org-id".to_owned(), t.org_id.to_string())]),
        )
    });
    let cluster = Cluster::new(namespaces, &policies);
    let mut times = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..15 {
        let start = Instant::now();
        let v = assess(&cluster, &cfg, &tenants[0]);
        times.push(start.elapsed());
        assert!(v.verified(), "{:?}", v.failures());
        if Instant::now() > deadline {
            break;
        }
    }
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let base = measure(10);
    println!("assess, 10 organizations (baseline): {base:?}");
    for n in [100, 1_000, 5_000] {
        let t = measure(n);
        println!(
            "assess, {n} organizations: {t:?} ({:.1}x baseline)",
            t.as_secs_f64() / base.as_secs_f64()
        );
    }
}
