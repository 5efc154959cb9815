//! Cost of the reachability check for one organization as the number of organizations grows.
//! Run: `cargo bench --bench network`. Pure CPU, no server; the baseline is the same check with
//! 10 organizations, measured in the same run.
//!
//! Two measurements per size:
//! - `assess`: the check alone, on the cluster view;
//! - `pass`: what a verification pass does before and during the check: make its view of the
//!   cached cluster with the organization's two fresh namespaces (its own and its peer's, labels
//!   and policies read again), then assess. `overlay` is the view the layer makes (the cached
//!   cluster shared, the fresh reads over it); `copy` is the view as it was made before, a deep
//!   copy of the cached cluster with the fresh reads written into it.
//!
//! And once per size, `first pass`: the overlay pass right after the cluster was read again,
//! which also groups the cached cluster's namespaces for the check (built once per read of the
//! cluster, then shared by every pass over it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead::api::platform::NetworkPlatform;
use bulkhead::api::{DeletionPolicy, ORG_ID_LABEL};
use bulkhead::layers::network::assess::assess;
use bulkhead::layers::network::plan::{NetworkConfig, plan, validate};
use bulkhead::layers::network::reach::Cluster;
use bulkhead::layers::{Tenant, Verification};
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

fn labels(t: &Tenant) -> BTreeMap<String, String> {
    BTreeMap::from([(ORG_ID_LABEL.to_owned(), t.org_id.to_string())])
}

/// `n` organizations with their planned policies, read into one cluster.
struct Fixture {
    cfg: NetworkConfig,
    tenants: Vec<Tenant>,
    /// The cached cluster.
    cluster: Arc<Cluster>,
    /// What a pass for org-0 reads again: its namespace and its peer's (org-1), with labels and
    /// policies.
    fresh: Vec<(String, BTreeMap<String, String>, Vec<NetworkPolicy>)>,
}

impl Fixture {
    fn new(n: usize) -> Self {
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
        let namespaces = tenants.iter().map(|t| (t.namespace.clone(), labels(t)));
        let cluster = Arc::new(Cluster::new(namespaces, &policies));
        let fresh = tenants[..2]
            .iter()
            .map(|t| (t.namespace.clone(), labels(t), plan(&cfg, t).policies))
            .collect();
        Self {
            cfg,
            tenants,
            cluster,
            fresh,
        }
    }

    fn assess(&self, view: &Cluster) -> Verification {
        assess(view, &self.cfg, &self.tenants[0])
    }

    /// The pass's view: the fresh reads over the shared cached cluster.
    fn overlay_view(&self) -> Cluster {
        self.read_fresh(Cluster::over(self.cluster.clone()))
    }

    /// The pass's view as a deep copy of the cached cluster.
    fn copied_view(&self) -> Cluster {
        self.read_fresh(Cluster::clone(&self.cluster))
    }

    fn read_fresh(&self, mut view: Cluster) -> Cluster {
        for (ns, labels, policies) in &self.fresh {
            view.set_namespace(ns, labels.clone());
            view.replace_policies(ns, policies);
        }
        view
    }
}

/// Median time of `f` (up to 15 runs, at most about 10 s).
fn median(mut f: impl FnMut() -> Verification) -> Duration {
    median_of(|| {
        let start = Instant::now();
        let v = f();
        let t = start.elapsed();
        assert!(v.verified(), "{:?}", v.failures());
        t
    })
}

/// Median of the times `f` returns (up to 15 runs, at most about 10 s).
fn median_of(mut f: impl FnMut() -> Duration) -> Duration {
    let mut times = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..15 {
        times.push(f());
        if Instant::now() > deadline {
            break;
        }
    }
    times.sort();
    times[times.len() / 2]
}

struct Row {
    assess: Duration,
    overlay: Duration,
    copy: Duration,
    first: Duration,
}

fn measure(n: usize) -> Row {
    let fx = Fixture::new(n);
    assert_eq!(
        fx.assess(&fx.overlay_view()),
        fx.assess(&fx.copied_view()),
        "both views give the same verdict"
    );
    Row {
        assess: median(|| fx.assess(&fx.cluster)),
        overlay: median(|| fx.assess(&fx.overlay_view())),
        copy: median(|| fx.assess(&fx.copied_view())),
        first: median_of(|| {
            // A cluster just read: nothing of it grouped yet (the copy is not timed).
            let cached = Arc::new(Cluster::clone(&fx.cluster));
            let start = Instant::now();
            let mut view = Cluster::over(cached);
            for (ns, labels, policies) in &fx.fresh {
                view.set_namespace(ns, labels.clone());
                view.replace_policies(ns, policies);
            }
            let v = fx.assess(&view);
            let t = start.elapsed();
            assert!(v.verified(), "{:?}", v.failures());
            t
        }),
    }
}

fn line(what: &str, n: usize, t: Duration, base: Duration) {
    if n == 10 {
        println!("{what}, 10 organizations (baseline): {t:?}");
    } else {
        println!(
            "{what}, {n} organizations: {t:?} ({:.1}x baseline)",
            t.as_secs_f64() / base.as_secs_f64()
        );
    }
}

fn main() {
    let sizes = [10, 100, 1_000, 5_000];
    let rows: Vec<(usize, Row)> = sizes.iter().map(|&n| (n, measure(n))).collect();
    let base = &rows[0].1;
    for (n, r) in &rows {
        line("assess", *n, r.assess, base.assess);
    }
    for (n, r) in &rows {
        line("pass (overlay view + assess)", *n, r.overlay, base.overlay);
    }
    for (n, r) in &rows {
        line("pass (copy view + assess)", *n, r.copy, base.copy);
    }
    for (n, r) in &rows {
        line(
            "first pass after a new read (groups built)",
            *n,
            r.first,
            base.first,
        );
    }
}
