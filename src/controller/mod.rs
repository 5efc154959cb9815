//! The Organization and IsolationPlatform controllers.
//!
//! - [`context`]: what every reconcile shares; [`error`]: the reconcile error.
//! - [`organization`]: the finalizer, `apply` and `cleanup` of one Organization.
//! - [`pass`]: the stages of one pass (resolve, record intent, open workspace, schedule,
//!   ensure, publish credentials, verify, compose status, report, next action).
//! - [`status`]: conditions and layer detail (pure); [`workspace`]: namespace and Secret.
//! - [`platform`]: the per-platform runtime and the IsolationPlatform controller.

pub mod context;
pub mod error;
pub mod organization;
pub mod pass;
pub mod platform;
pub mod status;
pub mod workspace;

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

pub use context::{Context, NamespaceAccess, RunOptions};
pub use error::Error;
pub use pass::{retry_delay, verification_delay};

use crate::api::{
    ADOPT_ANNOTATION, FIELD_MANAGER, FINALIZER, IsolationPlatform, MANAGED_BY, Organization,
    OrganizationStatus, ROTATE_ANNOTATION,
};
use crate::telemetry::Health;

/// Runs both controllers until a shutdown signal.
pub async fn run(ctx: Arc<Context>, health: Arc<Health>, opts: RunOptions) {
    let client = ctx.client.clone();
    let orgs: Api<DeserializeGuard<Organization>> = Api::all(client.clone());
    let (reader, writer) = reflector::store();
    let _ = ctx.orgs.set(reader.clone());
    // The fleet gauges read the same cache at scrape time (this shard's Organizations only); a weak reference, as the metrics
    // live inside the context.
    let weak = Arc::downgrade(&ctx);
    ctx.metrics.set_fleet_source(move |visit| {
        if let Some(ctx) = weak.upgrade() {
            ctx.for_each_organization(|o| {
                if ctx.handles_platform(&o.spec.platform_ref) {
                    visit(o);
                }
            });
        }
    });
    // Only spec, deletion and rotation requests start a pass; status writes never do.
    let trigger = watcher(orgs, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(slim)
        .reflect(writer)
        .applied_objects()
        .predicate_filter(pass_trigger, Default::default());
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let platform_reader = reader.clone();
    // A platform's status (organization counts, audits) changes with every pass; only a change
    // of its spec, after it was first seen, concerns its Organizations (each gets a pass of its
    // own at start).
    let platform_specs = watcher(
        Api::<IsolationPlatform>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .applied_objects();
    let generations = Generations::default();
    // Owned objects start a pass when someone else changed or deleted them; the operator's own
    // writes (creating them in a pass) do not.
    let mut org_controller = Controller::for_stream(trigger, reader)
        .watches_stream(
            foreign_changes(Api::<Namespace>::all(client.clone()), owned.clone()),
            |ns: Namespace| owning_organizations(&ns),
        )
        .watches_stream(
            foreign_changes(Api::<NetworkPolicy>::all(client.clone()), owned.clone()),
            |np: NetworkPolicy| owning_organizations(&np),
        );
    if opts.watch_secrets {
        org_controller = org_controller.watches_stream(
            foreign_changes(Api::<Secret>::all(client.clone()), owned),
            |s: Secret| owning_organizations(&s),
        );
    }
    let org_controller = org_controller
        .watches_stream(platform_specs, move |p: IsolationPlatform| {
            organizations_of_changed_platform(&platform_reader, &generations, &p)
        })
        .trigger_backoff(TriggerBackoff)
        .with_config(kube::runtime::controller::Config::default().concurrency(opts.concurrency))
        .shutdown_on_signal()
        .run(
            organization::reconcile,
            organization::error_policy,
            ctx.clone(),
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "organization reconcile not run");
            }
        });
    let drift = ctx
        .drift_rx
        .lock()
        .ok()
        .and_then(|mut rx| rx.take())
        .map(|rx| debounced(rx, DRIFT_DEBOUNCE).boxed())
        .unwrap_or_else(|| futures::stream::pending().boxed());
    let platform_controller = Controller::new(
        Api::<IsolationPlatform>::all(client),
        watcher::Config::default(),
    )
    .reconcile_on(drift)
    .trigger_backoff(TriggerBackoff)
    .with_config(kube::runtime::controller::Config::default().concurrency(2))
    .shutdown_on_signal()
    .run(platform::reconcile, platform_error_policy, ctx.clone())
    .for_each(|res| async move {
        if let Err(e) = res {
            tracing::debug!(error = %e, "platform reconcile not run");
        }
    });
    health.set_ready(true);
    tracing::info!(concurrency = opts.concurrency, "controllers running");
    futures::join!(org_controller, platform_controller);
    health.set_ready(false);
}

/// How long drift notifications are gathered before the platforms they name get a pass.
pub const DRIFT_DEBOUNCE: Duration = Duration::from_millis(200);

/// The Controllers' backoff over all their trigger streams together. Each watch already backs
/// off on its own (`default_backoff`), so one stream's error must not hold back the others:
/// with kube's default here, the 410 Expired that every watch meets once after a kube-apiserver
/// restart (and answers by listing again) grew one shared delay to 17, 43, then 50 s, during
/// which no event of any watch was read. A new Organization waited up to two minutes for its
/// first pass (found by tests/faults.rs). A constant second keeps a failing stream from
/// spinning and costs the others at most that.
#[derive(Clone, Copy, Debug, Default)]
pub struct TriggerBackoff;

/// Delay after an error of any trigger stream.
pub const TRIGGER_BACKOFF: Duration = Duration::from_secs(1);

impl Iterator for TriggerBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(TRIGGER_BACKOFF)
    }
}

impl kube::runtime::utils::Backoff for TriggerBackoff {
    fn reset(&mut self) {}
}

/// The platforms named on `rx`, each once per burst: after the first name, every name that
/// arrives within `window` joins it.
pub fn debounced(
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    window: Duration,
) -> impl futures::Stream<Item = ObjectRef<IsolationPlatform>> + Send {
    futures::stream::unfold(rx, move |mut rx| async move {
        let first = rx.recv().await?;
        let mut names = std::collections::BTreeSet::from([first]);
        let deadline = tokio::time::sleep(window);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => break,
                next = rx.recv() => match next {
                    Some(n) => { names.insert(n); }
                    None => break,
                },
            }
        }
        tracing::info!(platforms = ?names, "database drift: platform pass requested");
        let refs: Vec<_> = names.iter().map(|n| ObjectRef::new(n)).collect();
        Some((futures::stream::iter(refs), rx))
    })
    .flatten()
}

type Generations = std::sync::Mutex<std::collections::HashMap<String, Option<i64>>>;

/// The Organizations of platform `p` when its spec changed since it was last seen; none
/// otherwise.
fn organizations_of_changed_platform(
    orgs: &reflector::Store<DeserializeGuard<Organization>>,
    generations: &Generations,
    p: &IsolationPlatform,
) -> Vec<ObjectRef<DeserializeGuard<Organization>>> {
    let name = p.name_any();
    let changed = generations
        .lock()
        .map(|mut seen| spec_changed(&mut seen, &name, p.metadata.generation))
        .unwrap_or(true);
    if !changed {
        return Vec::new();
    }
    orgs.state()
        .into_iter()
        .filter(|g| g.0.as_ref().is_ok_and(|o| o.spec.platform_ref == name))
        .map(|g| ObjectRef::from_obj(&*g))
        .collect()
}

/// Events of `api` that need a pass: a deletion (begun or done), or a change whose last writer
/// was not the operator. Initial listings start nothing (every Organization gets its own pass at start).
fn foreign_changes<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    watcher(api, config)
        .default_backoff()
        .filter_map(|event| async move {
            match event {
                Ok(watcher::Event::Delete(o)) => Some(Ok(o)),
                Ok(watcher::Event::Apply(o))
                    if o.meta().deletion_timestamp.is_some()
                        || !last_written_by_operator(o.meta()) =>
                {
                    Some(Ok(o))
                }
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            }
        })
}

/// Whether the newest entry of the object's managed fields is the operator's alone (pure). A
/// tie with another manager in the same second counts as foreign: a pass too many is harmless,
/// a missed repair is not.
pub fn last_written_by_operator(meta: &kube::api::ObjectMeta) -> bool {
    let entries = meta.managed_fields.as_deref().unwrap_or_default();
    let Some(newest) = entries.iter().filter_map(|m| m.time.as_ref()).max() else {
        return false;
    };
    let mut latest = entries.iter().filter(|m| m.time.as_ref() == Some(newest));
    latest.all(|m| m.manager.as_deref() == Some(FIELD_MANAGER))
}

/// The Organizations that own a namespaced object, as references without a namespace. (`owns`
/// would key them by the child's namespace, so a pass triggered through a NetworkPolicy could
/// run beside one triggered through the Organization itself: two passes of one Organization at
/// once, racing each other's credentials.)
fn owning_organizations<K: Resource>(child: &K) -> Vec<ObjectRef<DeserializeGuard<Organization>>> {
    child
        .meta()
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.kind == "Organization" && o.api_version.starts_with("bulkhead.dev/"))
        .map(|o| ObjectRef::new(&o.name))
        .collect()
}

/// Records `generation` for platform `name`; whether it is a change of a generation seen
/// before (pure but for `seen`). The first sighting is not a change.
pub fn spec_changed(
    seen: &mut std::collections::HashMap<String, Option<i64>>,
    name: &str,
    generation: Option<i64>,
) -> bool {
    match seen.insert(name.to_owned(), generation) {
        None => false,
        Some(before) => before != generation,
    }
}

/// What makes a new pass necessary: a new generation (spec), deletion, the rotate and adopt
/// annotations, the finalizer going missing.
fn pass_trigger(o: &DeserializeGuard<Organization>) -> Option<u64> {
    let meta = o.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .hash(&mut h);
    for key in [ROTATE_ANNOTATION, ADOPT_ANNOTATION] {
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .hash(&mut h);
    }
    meta.finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
        .hash(&mut h);
    o.0.is_err().hash(&mut h);
    Some(h.finish())
}

/// The annotation `kubectl apply` keeps: a copy of the whole applied manifest.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what no pass reads from a cached Organization (pure): its managed fields and the
/// copy of the manifest that client-side apply keeps. They are most of a small Organization's
/// size, and the watch cache holds every Organization for the process's life.
pub fn slim(o: &mut DeserializeGuard<Organization>) {
    let meta = match &mut o.0 {
        Ok(org) => &mut org.metadata,
        Err(invalid) => &mut invalid.metadata,
    };
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

/// Writes the status when it differs from the current one.
async fn write_status(
    ctx: &Context,
    org: &Organization,
    status: &OrganizationStatus,
) -> Result<(), Error> {
    if org.status.as_ref() == Some(status) {
        return Ok(());
    }
    apply_status::<Organization>(ctx, &org.name_any(), status).await
}

/// Writes a status with server-side apply under the operator's field manager, and counts it.
pub(crate) async fn apply_status<K>(
    ctx: &Context,
    name: &str,
    status: &impl serde::Serialize,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = Api::all(ctx.client.clone());
    let patch =
        json!({ "apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    let kind = K::kind(&()).to_lowercase();
    ctx.metrics
        .status_patches
        .get_or_create(&crate::telemetry::KindLabel { kind })
        .inc();
    Ok(())
}

fn platform_error_policy(p: Arc<IsolationPlatform>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failure("isolationplatform", err.metric_label());
    tracing::warn!(platform = %p.name_any(), error = %err, "platform reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drift_bursts_are_coalesced_per_platform() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stream = debounced(rx, Duration::from_millis(200));
        tokio::pin!(stream);
        for name in ["a", "b", "a", "a"] {
            tx.send(name.to_owned()).unwrap();
        }
        let first: Vec<String> = vec![
            stream.next().await.unwrap().name,
            stream.next().await.unwrap().name,
        ];
        assert_eq!(first, ["a", "b"]);
        // A later notification is a burst of its own.
        tokio::time::sleep(Duration::from_secs(1)).await;
        tx.send("a".to_owned()).unwrap();
        drop(tx);
        assert_eq!(stream.next().await.unwrap().name, "a");
        assert!(stream.next().await.is_none());
    }

    fn entry(
        manager: &str,
        second: i64,
    ) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry {
            manager: Some(manager.into()),
            time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(second).unwrap(),
            )),
            ..Default::default()
        }
    }

    #[test]
    fn the_cached_organization_keeps_what_a_pass_reads_and_drops_the_rest() {
        let manifest = json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization",
            "metadata": {
                "name": "acme", "generation": 3, "finalizers": [FINALIZER],
                "annotations": {
                    LAST_APPLIED: "{\"spec\":{\"orgId\":\"acme\"}}",
                    ROTATE_ANNOTATION: "r1",
                    "team": "blue"
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                   "time": "2026-01-01T00:00:00Z"}]
            },
            "spec": {"orgId": "acme", "displayName": "Acme", "platformRef": "p"},
            "status": {"observedGeneration": 3, "namespace": "org-acme"}
        });
        let mut g: DeserializeGuard<Organization> = serde_json::from_value(manifest).unwrap();
        let before = pass_trigger(&g);
        let org_before = g.0.as_ref().unwrap().clone();
        slim(&mut g);
        let org = g.0.as_ref().unwrap();
        assert!(org.metadata.managed_fields.is_none());
        let annotations = org.metadata.annotations.as_ref().unwrap();
        assert!(!annotations.contains_key(LAST_APPLIED));
        assert_eq!(
            annotations.get(ROTATE_ANNOTATION).map(String::as_str),
            Some("r1")
        );
        assert_eq!(annotations.get("team").map(String::as_str), Some("blue"));
        assert_eq!(org.spec, org_before.spec);
        assert_eq!(org.status, org_before.status);
        assert_eq!(org.metadata.finalizers, org_before.metadata.finalizers);
        assert_eq!(pass_trigger(&g), before, "what starts a pass is unchanged");

        // An Organization that does not deserialize is slimmed too, and still starts its pass.
        let mut bad: DeserializeGuard<Organization> = serde_json::from_value(json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization",
            "metadata": {"name": "odd", "annotations": {LAST_APPLIED: "{}"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"orgId": 7}
        }))
        .unwrap();
        assert!(bad.0.is_err());
        slim(&mut bad);
        let Err(invalid) = &bad.0 else { unreachable!() };
        assert!(invalid.metadata.managed_fields.is_none());
        assert!(
            !invalid
                .metadata
                .annotations
                .as_ref()
                .unwrap()
                .contains_key(LAST_APPLIED)
        );
    }

    #[test]
    fn a_platform_starts_passes_only_when_its_spec_changes_after_it_was_seen() {
        let mut seen = std::collections::HashMap::new();
        assert!(!spec_changed(&mut seen, "p", Some(1)), "first sighting");
        assert!(!spec_changed(&mut seen, "p", Some(1)), "status change");
        assert!(spec_changed(&mut seen, "p", Some(2)), "spec change");
        assert!(!spec_changed(&mut seen, "q", Some(7)));
    }

    #[test]
    fn only_the_operators_own_latest_write_is_quiet() {
        let meta = |entries: Vec<
            k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry,
        >| kube::api::ObjectMeta {
            managed_fields: Some(entries),
            ..Default::default()
        };
        assert!(last_written_by_operator(&meta(vec![entry("bulkhead", 10)])));
        assert!(last_written_by_operator(&meta(vec![
            entry("kubectl", 5),
            entry("bulkhead", 10)
        ])));
        assert!(!last_written_by_operator(&meta(vec![
            entry("bulkhead", 5),
            entry("kubectl-edit", 10)
        ])));
        assert!(
            !last_written_by_operator(&meta(vec![entry("bulkhead", 10), entry("kubectl", 10)])),
            "a tie is foreign"
        );
        assert!(
            !last_written_by_operator(&meta(vec![])),
            "unknown history is foreign"
        );
    }

    #[test]
    fn a_namespaced_child_maps_to_the_same_key_as_its_organization() {
        let mut np = NetworkPolicy::default();
        np.metadata.namespace = Some("org-acme".into());
        np.metadata.owner_references = Some(vec![
            pass::owner_reference(
                &serde_json::from_value(serde_json::json!({
                    "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization",
                    "metadata": { "name": "acme", "uid": "u1" }, "spec": { "orgId": "acme" }
                }))
                .unwrap(),
            ),
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: "other".into(),
                ..Default::default()
            },
        ]);
        let refs = owning_organizations(&np);
        assert_eq!(
            refs,
            vec![ObjectRef::<DeserializeGuard<Organization>>::new("acme")]
        );
        assert_eq!(
            refs[0].namespace, None,
            "one key per Organization, whatever the child's namespace"
        );
    }
}
