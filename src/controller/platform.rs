//! The per-platform runtime (built layers, prepared once) and the IsolationPlatform controller.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tokio::sync::Mutex;

use super::{Context, Error};
use crate::api::condition::merge;
use crate::api::platform::OrganizationCounts;
use crate::api::{Condition, ConditionStatus, IsolationPlatform, IsolationPlatformStatus};
use crate::layers::{self, BuildEnv, LayerError, LayerKind, LayerSlot};

/// How long a runtime with a failed layer is kept before it is built again.
const RETRY_FAILED_BUILD: Duration = Duration::from_secs(20);

/// The layers of one platform, built from one generation of its spec.
pub struct PlatformRuntime {
    uid: Option<String>,
    generation: Option<i64>,
    built_at: Instant,
    pub layers: BTreeMap<LayerKind, LayerSlot>,
    prepared: Mutex<HashSet<LayerKind>>,
}

impl PlatformRuntime {
    /// Runs the layer's platform-level `prepare` unless it already succeeded for this runtime.
    pub async fn ensure_prepared(&self, kind: LayerKind) -> Result<(), LayerError> {
        let Some(Ok(layer)) = self.layers.get(&kind) else {
            return Ok(());
        };
        let mut prepared = self.prepared.lock().await;
        if prepared.contains(&kind) {
            return Ok(());
        }
        layer.prepare().await?;
        prepared.insert(kind);
        Ok(())
    }

    fn stale_for(&self, p: &IsolationPlatform) -> bool {
        self.uid != p.metadata.uid
            || self.generation != p.metadata.generation
            || (self.layers.values().any(Result::is_err)
                && self.built_at.elapsed() > RETRY_FAILED_BUILD)
    }
}

/// Built runtimes by platform name, rebuilt when the platform's spec changes.
#[derive(Default)]
pub struct PlatformCache {
    inner: Mutex<HashMap<String, Arc<PlatformRuntime>>>,
}

impl PlatformCache {
    pub async fn runtime(
        &self,
        ctx: &Context,
        platform: &IsolationPlatform,
    ) -> Arc<PlatformRuntime> {
        let name = platform.name_any();
        let mut map = self.inner.lock().await;
        if let Some(rt) = map.get(&name).filter(|rt| !rt.stale_for(platform)) {
            return rt.clone();
        }
        let env = BuildEnv {
            client: ctx.client.clone(),
            operator_namespace: &ctx.operator_namespace,
            platform,
            drift: Some(ctx.drift_tx.clone()),
        };
        let built = layers::build_all(&env).await;
        for (kind, slot) in &built {
            if let Err(e) = slot {
                tracing::warn!(platform = %name, layer = %kind, error = %e, "layer could not be set up");
            }
        }
        let rt = Arc::new(PlatformRuntime {
            uid: platform.metadata.uid.clone(),
            generation: platform.metadata.generation,
            built_at: Instant::now(),
            layers: built,
            prepared: Mutex::new(HashSet::new()),
        });
        map.insert(name, rt.clone());
        rt
    }

    pub async fn forget(&self, name: &str) {
        self.inner.lock().await.remove(name);
    }
}

/// Reconciles one IsolationPlatform: platform-level setup of every layer, the audits, and status.
pub async fn reconcile(
    platform: Arc<IsolationPlatform>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("isolationplatform");
    let name = platform.name_any();
    if !ctx.handles_platform(&name) {
        return Ok(Action::await_change());
    }
    if platform.meta().deletion_timestamp.is_some() {
        ctx.platforms.forget(&name).await;
        return Ok(Action::await_change());
    }
    let rt = ctx.platforms.runtime(&ctx, &platform).await;
    let mut status = IsolationPlatformStatus {
        observed_generation: platform.metadata.generation,
        ..Default::default()
    };
    let mut fresh = Vec::new();
    for (kind, slot) in &rt.layers {
        let result = prepare_layer(&ctx, &platform, &rt, *kind, slot, &mut status).await;
        fresh.push(layer_condition(*kind, result));
    }
    // Breaches make the platform unready; warnings (a missing index, an unlisted shared table) do not.
    let breached = status.database.as_ref().is_some_and(|db| db.breaches > 0);
    fresh.insert(0, ready_condition(&fresh, breached));
    status.organizations = Some(organization_counts(&ctx, &name));
    let previous = platform.status.clone().unwrap_or_default();
    status.conditions = merge(
        &previous.conditions,
        fresh,
        &super::context::now(),
        platform.metadata.generation,
    );
    if previous != status {
        super::apply_status::<IsolationPlatform>(&ctx, &name, &status).await?;
    }
    Ok(Action::requeue(Duration::from_secs(u64::from(
        platform.spec.verification.interval_seconds,
    ))))
}

/// Prepares one layer, reports its repairs, and fills its part of the platform's status.
async fn prepare_layer(
    ctx: &Context,
    platform: &IsolationPlatform,
    rt: &PlatformRuntime,
    kind: LayerKind,
    slot: &LayerSlot,
    status: &mut IsolationPlatformStatus,
) -> Result<(), (&'static str, String)> {
    let layer = slot.as_ref().map_err(|e| (e.reason(), e.to_string()))?;
    let repairs = layer
        .prepare()
        .await
        .map_err(|e| (e.reason(), e.to_string()))?;
    rt.prepared.lock().await.insert(kind);
    for r in &repairs {
        ctx.metrics
            .repairs
            .get_or_create(&crate::telemetry::LayerLabels {
                layer: kind.name().into(),
            })
            .inc();
        let note = format!("{kind}: {}", r.0);
        ctx.publish_event(&platform.object_ref(&()), true, "DriftRepaired", &note)
            .await;
    }
    layer
        .platform_status(status)
        .await
        .map_err(|e| (e.reason(), e.to_string()))
}

/// The `<Layer>Ready` condition from a layer's preparation (pure).
fn layer_condition(kind: LayerKind, result: Result<(), (&'static str, String)>) -> Condition {
    let cond_type = format!("{}Ready", capitalized(kind.name()));
    match result {
        Ok(()) => Condition::new(
            cond_type,
            ConditionStatus::True,
            "Prepared",
            format!("{kind} backend set up"),
        ),
        Err((reason, message)) => Condition::new(
            cond_type,
            ConditionStatus::False,
            reason,
            super::status::clip(&message),
        ),
    }
}

/// The platform's `Ready` from its layers' conditions and the audit's breaches (pure).
fn ready_condition(layers: &[Condition], breached: bool) -> Condition {
    if !breached && layers.iter().all(|c| c.status == ConditionStatus::True) {
        Condition::new(
            "Ready",
            ConditionStatus::True,
            "Prepared",
            "every configured backend is set up and audited clean",
        )
    } else {
        Condition::new(
            "Ready",
            ConditionStatus::False,
            "LayerNotReady",
            "a backend failed or has audit findings; see the other conditions",
        )
    }
}

/// Organizations of platform `name` and how many are Ready (the metrics' gauges are set at
/// scrape time, from the same cache).
fn organization_counts(ctx: &Context, name: &str) -> OrganizationCounts {
    let (mut total, mut ready) = (0usize, 0usize);
    ctx.for_each_organization(|o| {
        if o.spec.platform_ref == name {
            total += 1;
            ready += usize::from(is_ready(o));
        }
    });
    OrganizationCounts {
        total: u32::try_from(total).unwrap_or(u32::MAX),
        ready: u32::try_from(ready).unwrap_or(u32::MAX),
    }
}

fn is_ready(o: &crate::api::Organization) -> bool {
    o.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True)
    })
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}
