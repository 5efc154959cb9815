//! Logs, Prometheus metrics, and the HTTP endpoints `/metrics`, `/healthz` and `/readyz`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::{ConditionStatus, Organization};
use k8s_openapi::jiff::Timestamp;

/// Initialises structured logging; `json` switches to one JSON object per line.
pub fn init_logging(json: bool) {
    use tracing_subscriber::{EnvFilter, fmt, prelude::*};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(fmt::layer().json().flatten_event(true))
            .init();
    } else {
        registry
            .with(
                fmt::layer()
                    .with_target(false)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
            )
            .init();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub kind: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LayerFailureLabels {
    pub layer: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LayerLabels {
    pub layer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub layer: String,
    pub result: String,
}

/// The operator's metrics.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<KindLabel, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub layer_failures: Family<LayerFailureLabels, Counter>,
    pub duration: Family<KindLabel, Histogram>,
    pub probes: Family<ProbeLabels, Counter>,
    pub repairs: Family<LayerLabels, Counter>,
    pub status_patches: Family<KindLabel, Counter>,
    pub organizations_ready: Gauge,
    pub leader: Gauge,
    /// Gauges summed over the Organizations' statuses when `/metrics` is scraped.
    pub fleet: FleetGauges,
    fleet_source: OnceLock<FleetSource>,
}

/// Where the fleet gauges read the Organizations from at scrape time: it shows each one to the
/// visitor in place (the controller's cache is not copied per scrape).
type FleetSource = Box<dyn Fn(&mut dyn FnMut(&Organization)) + Send + Sync>;

/// The fleet gauges: what every Organization's status says, summed when `/metrics` is scraped
/// (computed from the controller's cache; no API call).
#[derive(Default)]
pub struct FleetGauges {
    pub organizations: Gauge,
    pub verified: Gauge,
    pub probe_failed: Family<LayerLabels, Gauge>,
    pub not_ready_max_seconds: Gauge,
    pub verification_age_max_seconds: Gauge,
}

/// The layers every per-layer fleet gauge reports, even at zero, so that alert expressions
/// always have a series.
pub const LAYERS: [&str; 4] = ["database", "storage", "cache", "network"];

/// The reasons of a layer's failure (`LayerError::reason`) that the failure counter starts with
/// at zero: `increase()` misses the first failure of a series that appears at 1.
const FAILURE_REASONS: [&str; 5] = [
    "ConfigurationError",
    "BackendUnreachable",
    "BackendError",
    "KubernetesError",
    "Refused",
];

/// What the Organizations' statuses say, summed over the fleet (pure).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fleet {
    pub total: i64,
    pub ready: i64,
    pub verified: i64,
    /// Organizations whose last cross-tenant probes failed at least once, by layer.
    pub probe_failed: BTreeMap<String, i64>,
    /// The longest time any Organization has been not Ready (0 when all are).
    pub not_ready_max_seconds: i64,
    /// The longest time since any Organization's oldest layer was last probed.
    pub verification_age_max_seconds: i64,
}

impl Fleet {
    /// The fleet of `orgs` at `now`.
    pub fn of<'a>(orgs: impl IntoIterator<Item = &'a Organization>, now: Timestamp) -> Fleet {
        let mut fleet = Fleet::empty();
        for org in orgs {
            fleet.add(org, now);
        }
        fleet
    }

    /// No Organization yet, with every layer's failure count at zero.
    pub fn empty() -> Fleet {
        Fleet {
            probe_failed: LAYERS.iter().map(|l| ((*l).to_owned(), 0)).collect(),
            ..Fleet::default()
        }
    }

    /// Counts one Organization, as seen at `now`.
    pub fn add(&mut self, org: &Organization, now: Timestamp) {
        let seconds_since = |t: Timestamp| (now.as_second() - t.as_second()).max(0);
        self.total += 1;
        let status = org.status.as_ref();
        let condition =
            |type_: &str| status.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_));
        let ready = condition("Ready");
        if ready.is_some_and(|c| c.status == ConditionStatus::True) {
            self.ready += 1;
        } else {
            let since = ready
                .map(|c| c.last_transition_time.0)
                .or_else(|| org.metadata.creation_timestamp.as_ref().map(|t| t.0));
            if let Some(since) = since {
                self.not_ready_max_seconds = self.not_ready_max_seconds.max(seconds_since(since));
            }
        }
        if condition("IsolationVerified").is_some_and(|c| c.status == ConditionStatus::True) {
            self.verified += 1;
        }
        let layers = status.map(|s| s.layers.as_slice()).unwrap_or_default();
        for layer in layers {
            if layer.probes_failed > 0 {
                *self.probe_failed.entry(layer.layer.clone()).or_default() += 1;
            }
        }
        if let Some(oldest) = layers
            .iter()
            .filter_map(|l| l.last_probe_time.as_ref().map(|t| t.0))
            .min()
        {
            self.verification_age_max_seconds =
                self.verification_age_max_seconds.max(seconds_since(oldest));
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("bulkhead");
        let reconciles = Family::<KindLabel, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let layer_failures = Family::<LayerFailureLabels, Counter>::default();
        let duration = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 12))
        });
        let probes = Family::<ProbeLabels, Counter>::default();
        let repairs = Family::<LayerLabels, Counter>::default();
        let status_patches = Family::<KindLabel, Counter>::default();
        let organizations_ready = Gauge::default();
        let leader = Gauge::default();
        let fleet = FleetGauges::default();
        // Counters the alerts and the dashboard take increase() of start at zero.
        for layer in LAYERS.iter().chain(&["workspace"]) {
            for reason in FAILURE_REASONS {
                let _ = layer_failures.get_or_create(&LayerFailureLabels {
                    layer: (*layer).to_owned(),
                    reason: reason.to_owned(),
                });
            }
            let _ = repairs.get_or_create(&LayerLabels {
                layer: (*layer).to_owned(),
            });
        }
        for layer in LAYERS {
            for result in ["passed", "failed"] {
                let _ = probes.get_or_create(&ProbeLabels {
                    layer: layer.to_owned(),
                    result: result.to_owned(),
                });
            }
        }
        registry.register(
            "organizations",
            "Organizations seen by the operator",
            fleet.organizations.clone(),
        );
        registry.register(
            "organizations_verified",
            "Organizations whose IsolationVerified condition is True",
            fleet.verified.clone(),
        );
        registry.register(
            "organizations_probe_failed",
            "Organizations whose last cross-tenant probes of a layer failed at least once",
            fleet.probe_failed.clone(),
        );
        registry.register(
            "organization_not_ready_max_seconds",
            "Longest time any Organization has been not Ready",
            fleet.not_ready_max_seconds.clone(),
        );
        registry.register(
            "verification_age_max_seconds",
            "Longest time since any Organization's oldest layer was last probed",
            fleet.verification_age_max_seconds.clone(),
        );
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by error reason",
            failures.clone(),
        );
        registry.register(
            "layer_failures",
            "Parts of organization passes that failed, by layer (or workspace) and reason",
            layer_failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciles",
            duration.clone(),
        );
        registry.register(
            "probes",
            "Isolation probes by layer and result (passed/failed)",
            probes.clone(),
        );
        registry.register(
            "drift_repairs",
            "Drifts found and repaired, by layer",
            repairs.clone(),
        );
        registry.register("status_patches", "Status writes", status_patches.clone());
        registry.register(
            "organizations_ready",
            "Organizations whose Ready condition is True",
            organizations_ready.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            layer_failures,
            duration,
            probes,
            repairs,
            status_patches,
            organizations_ready,
            leader,
            fleet,
            fleet_source: OnceLock::new(),
        }
    }
}

impl Metrics {
    /// Counts a reconcile and measures its duration when the returned guard drops.
    pub fn reconcile_timer(&self, kind: &str) -> ReconcileTimer<'_> {
        let label = KindLabel {
            kind: kind.to_owned(),
        };
        self.reconciles.get_or_create(&label).inc();
        ReconcileTimer {
            metrics: self,
            label,
            start: Instant::now(),
        }
    }

    pub fn failure(&self, kind: &str, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                kind: kind.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Where the fleet gauges read the Organizations from (set once, by the controller).
    pub fn set_fleet_source(
        &self,
        source: impl Fn(&mut dyn FnMut(&Organization)) + Send + Sync + 'static,
    ) {
        let _ = self.fleet_source.set(Box::new(source));
    }

    /// Sets the fleet gauges from `fleet`.
    pub fn record_fleet(&self, fleet: &Fleet) {
        let g = &self.fleet;
        g.organizations.set(fleet.total);
        self.organizations_ready.set(fleet.ready);
        g.verified.set(fleet.verified);
        for (layer, n) in &fleet.probe_failed {
            g.probe_failed
                .get_or_create(&LayerLabels {
                    layer: layer.clone(),
                })
                .set(*n);
        }
        g.not_ready_max_seconds.set(fleet.not_ready_max_seconds);
        g.verification_age_max_seconds
            .set(fleet.verification_age_max_seconds);
    }

    pub fn encode(&self) -> String {
        if let Some(source) = self.fleet_source.get() {
            let now = Timestamp::now();
            let mut fleet = Fleet::empty();
            source(&mut |org| fleet.add(org, now));
            self.record_fleet(&fleet);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Measures one reconcile on drop.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    label: KindLabel,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&self.label)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// Readiness flag flipped once the controllers run.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(HttpState { metrics, health });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app).await
}

async fn metrics_handler(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn ready_handler(State(s): State<HttpState>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_reconciles_and_failures() {
        let m = Metrics::default();
        {
            let _t = m.reconcile_timer("organization");
        }
        m.failure("organization", "BackendUnreachable");
        let text = m.encode();
        assert!(
            text.contains("bulkhead_reconciles_total{kind=\"organization\"} 1"),
            "{text}"
        );
        assert!(text.contains("reason=\"BackendUnreachable\""), "{text}");
        assert!(
            text.contains("bulkhead_reconcile_duration_seconds_count{kind=\"organization\"} 1"),
            "{text}"
        );
    }

    /// An Organization from JSON status, created at second 1000.
    fn org(name: &str, status: serde_json::Value) -> Arc<Organization> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization",
                "metadata": { "name": name, "creationTimestamp": "1970-01-01T00:16:40Z" },
                "spec": { "orgId": name },
                "status": status,
            }))
            .unwrap(),
        )
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn time(second: i64) -> String {
        at(second).to_string()
    }

    #[test]
    fn fleet_counts_ready_verified_and_the_oldest_ages() {
        let cond = |t: &str, s: &str, since: i64| {
            serde_json::json!({ "type": t, "status": s, "reason": "R", "message": "",
                                "lastTransitionTime": time(since) })
        };
        let layer = |name: &str, probed: i64, failed: u32| {
            serde_json::json!({ "layer": name, "isolated": true, "verified": failed == 0,
                                "lastProbeTime": time(probed), "probesPassed": 3,
                                "probesFailed": failed })
        };
        let orgs = [
            // Ready and verified, layers probed at 1900 and 1950.
            org(
                "a",
                serde_json::json!({ "conditions": [cond("Ready", "True", 1100),
                    cond("IsolationVerified", "True", 1100)],
                    "layers": [layer("database", 1900, 0), layer("cache", 1950, 0)] }),
            ),
            // Not Ready since 1500, its cache probe failed, probed at 1800.
            org(
                "b",
                serde_json::json!({ "conditions": [cond("Ready", "False", 1500),
                    cond("IsolationVerified", "False", 1500)],
                    "layers": [layer("cache", 1800, 2)] }),
            ),
            // No status yet: not Ready since its creation (1000), never probed.
            org("c", serde_json::json!({})),
        ];
        let fleet = Fleet::of(orgs.iter().map(|o| &**o), at(2000));
        assert_eq!(fleet.total, 3);
        assert_eq!(fleet.ready, 1);
        assert_eq!(fleet.verified, 1);
        assert_eq!(fleet.not_ready_max_seconds, 1000, "c, since its creation");
        assert_eq!(fleet.verification_age_max_seconds, 200, "b, probed at 1800");
        assert_eq!(fleet.probe_failed["cache"], 1);
        assert_eq!(fleet.probe_failed["database"], 0);
        assert_eq!(
            fleet.probe_failed.len(),
            LAYERS.len(),
            "every layer, even at 0"
        );
    }

    #[test]
    fn fleet_gauges_are_read_from_the_source_at_scrape_time() {
        let m = Metrics::default();
        let text = m.encode();
        assert!(text.contains("bulkhead_organizations 0"), "{text}");
        let x = org("x", serde_json::json!({}));
        m.set_fleet_source(move |visit| visit(&x));
        let text = m.encode();
        assert!(text.contains("bulkhead_organizations 1"), "{text}");
        assert!(text.contains("bulkhead_organizations_ready 0"), "{text}");
        assert!(
            text.contains("bulkhead_organizations_probe_failed{layer=\"network\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("bulkhead_organization_not_ready_max_seconds "),
            "{text}"
        );
    }
}
