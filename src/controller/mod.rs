//! The Organization and IsolationPlatform controllers.
//!
//! Pipeline per Organization: load platform and org → validate (pure) → namespace → ensure every
//! layer → credentials Secret (one write) → verify every layer → status (one patch, skipped when
//! unchanged). The whole pass runs inside kube-runtime's finalizer helper.

pub mod platform;
pub mod status;
pub mod workspace;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Mutex;

use crate::api::condition::{merge, transitions};
use crate::api::{
    ConditionStatus, FIELD_MANAGER, FINALIZER, IsolationPlatform, MANAGED_BY, Organization,
    OrganizationIdentities, OrganizationStatus, ROTATE_ANNOTATION,
};
use crate::layers::{Credentials, LayerError, LayerKind, Repair, Tenant};
use crate::telemetry::{Health, LayerLabels, Metrics, ProbeLabels};
use crate::tenant::{OrgId, render_template};
use status::{LayerOutcome, Workspace};

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    /// Namespace of the operator: default home of the platform's Secrets and BYOK source keys.
    pub operator_namespace: String,
    pub metrics: Arc<Metrics>,
    pub platforms: platform::PlatformCache,
    reporter: Reporter,
    /// When set, only Organizations of this IsolationPlatform (and the platform itself) are handled.
    pub platform_filter: Option<String>,
    /// ClusterRole (Secret access) that the operator binds to its own ServiceAccount inside each
    /// organization's namespace, so it never needs cluster-wide Secret access.
    pub namespace_access: Option<NamespaceAccess>,
    failures: Mutex<HashMap<String, u32>>,
    orgs: std::sync::OnceLock<Store<DeserializeGuard<Organization>>>,
}

impl Context {
    /// Handles only `platform`'s Organizations (a shard; also lets tests share one cluster).
    pub fn with_platform_filter(mut self, platform: Option<String>) -> Self {
        self.platform_filter = platform;
        self
    }

    pub fn with_namespace_access(mut self, access: Option<NamespaceAccess>) -> Self {
        self.namespace_access = access;
        self
    }

    /// Whether this process handles objects of platform `name`.
    pub fn handles_platform(&self, name: &str) -> bool {
        self.platform_filter.as_deref().is_none_or(|p| p == name)
    }

    pub fn new(
        client: Client,
        operator_namespace: String,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Self {
        Self {
            client,
            operator_namespace,
            metrics,
            platforms: platform::PlatformCache::default(),
            reporter: Reporter {
                controller: "bulkhead".into(),
                instance,
            },
            platform_filter: None,
            namespace_access: None,
            failures: Mutex::new(HashMap::new()),
            orgs: std::sync::OnceLock::new(),
        }
    }

    /// Every Organization the controller has seen that deserialized cleanly.
    pub fn organizations(&self) -> Vec<Arc<Organization>> {
        self.orgs
            .get()
            .map(|s| {
                s.state()
                    .iter()
                    .filter_map(|g| g.0.as_ref().ok().cloned().map(Arc::new))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The operator's own identity and the ClusterRole it binds to it in organization namespaces.
#[derive(Clone, Debug)]
pub struct NamespaceAccess {
    pub cluster_role: String,
    pub service_account: String,
}

/// Errors of one reconcile. The variant's label is the metric label and Event reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    Layer(#[from] LayerError),
    #[error("cleanup of the {layer} layer failed: {source}")]
    Cleanup {
        layer: LayerKind,
        source: LayerError,
    },
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "KubernetesError",
            Self::Finalizer(_) => "FinalizerError",
            Self::Layer(e) => e.reason(),
            Self::Cleanup { .. } => "CleanupFailed",
        }
    }
}

pub(crate) fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Publishes an Event about `regarding`; failures to publish are logged, never fatal.
pub(crate) async fn publish_event(
    ctx: &Context,
    regarding: &ObjectReference,
    warning: bool,
    reason: &str,
    note: &str,
) {
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        note: Some(status::clip(note)),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, regarding).await {
        tracing::warn!(error = %e, reason, "could not publish event");
    }
}

/// Options of `bulkhead run` that shape the controllers.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub concurrency: u16,
    /// Watch credentials Secrets cluster-wide so edits are repaired at once. Needs cluster-wide
    /// Secret read access; without it an edit is noticed at the next verification pass.
    pub watch_secrets: bool,
}

/// Runs both controllers until a shutdown signal.
pub async fn run(ctx: Arc<Context>, health: Arc<Health>, opts: RunOptions) {
    let client = ctx.client.clone();
    let orgs: Api<DeserializeGuard<Organization>> = Api::all(client.clone());
    let (reader, writer) = reflector::store();
    let _ = ctx.orgs.set(reader.clone());
    // Only spec, deletion and rotation requests start a pass; status writes never do.
    let trigger = watcher(orgs, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(pass_trigger, Default::default());
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let platform_reader = reader.clone();
    let mut org_controller = Controller::for_stream(trigger, reader)
        .owns(Api::<Namespace>::all(client.clone()), owned.clone())
        .owns(Api::<NetworkPolicy>::all(client.clone()), owned.clone());
    if opts.watch_secrets {
        org_controller = org_controller.owns(Api::<Secret>::all(client.clone()), owned);
    }
    let org_controller = org_controller
        .watches(
            Api::<IsolationPlatform>::all(client.clone()),
            watcher::Config::default(),
            move |p: IsolationPlatform| {
                let name = p.name_any();
                platform_reader
                    .state()
                    .into_iter()
                    .filter(|g| g.0.as_ref().is_ok_and(|o| o.spec.platform_ref == name))
                    .map(|g| ObjectRef::from_obj(&*g))
                    .collect::<Vec<_>>()
            },
        )
        .with_config(kube::runtime::controller::Config::default().concurrency(opts.concurrency))
        .shutdown_on_signal()
        .run(
            reconcile_organization,
            organization_error_policy,
            ctx.clone(),
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "organization reconcile not run");
            }
        });
    let platform_controller = Controller::new(
        Api::<IsolationPlatform>::all(client),
        watcher::Config::default(),
    )
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

/// What makes a new pass necessary: a new generation (spec), deletion, the rotate annotation,
/// the finalizer going missing.
fn pass_trigger(o: &DeserializeGuard<Organization>) -> Option<u64> {
    let meta = o.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .hash(&mut h);
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(ROTATE_ANNOTATION))
        .hash(&mut h);
    meta.finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
        .hash(&mut h);
    o.0.is_err().hash(&mut h);
    Some(h.finish())
}

async fn reconcile_organization(
    guard: Arc<DeserializeGuard<Organization>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("organization");
    let org = match &guard.0 {
        Ok(org) => Arc::new(org.clone()),
        Err(invalid) => {
            tracing::warn!(name = ?invalid.metadata.name, error = %invalid.error, "Organization does not match the schema; skipped");
            return Ok(Action::await_change());
        }
    };
    if !ctx.handles_platform(&org.spec.platform_ref) {
        return Ok(Action::await_change());
    }
    let api: Api<Organization> = Api::all(ctx.client.clone());
    // A deletion may already be finished by an earlier pass queued behind this one.
    if org.metadata.deletion_timestamp.is_some() && api.get_opt(&org.name_any()).await?.is_none() {
        return Ok(Action::await_change());
    }
    let action = finalizer(&api, FINALIZER, org, |event| async {
        match event {
            Finalizer::Apply(org) => apply(org, ctx.clone()).await,
            Finalizer::Cleanup(org) => cleanup(org, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.failures.lock().await.remove(&guard.name_any());
    Ok(action)
}

fn organization_error_policy(
    guard: Arc<DeserializeGuard<Organization>>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.failure("organization", err.metric_label());
    let name = guard.name_any();
    let attempts = ctx.failures.try_lock().map(|mut f| {
        let n = f.entry(name.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    });
    let delay = backoff(attempts.unwrap_or(1));
    tracing::warn!(organization = %name, error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn platform_error_policy(p: Arc<IsolationPlatform>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failure("isolationplatform", err.metric_label());
    tracing::warn!(platform = %p.name_any(), error = %err, "platform reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

/// Exponential backoff: 2 s doubling per failure, at most 5 minutes.
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(8);
    Duration::from_secs((2u64 << exp).min(300))
}

/// Next verification pass: the interval plus up to 10% spread by name, so thousands of
/// organizations do not probe in lockstep.
pub fn verification_delay(interval_seconds: u32, name: &str) -> Duration {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    let interval = u64::from(interval_seconds);
    let spread = interval / 10;
    Duration::from_secs(interval + if spread == 0 { 0 } else { h.finish() % spread })
}

fn owner_reference(org: &Organization) -> OwnerReference {
    OwnerReference {
        api_version: "bulkhead.dev/v1alpha1".into(),
        kind: "Organization".into(),
        name: org.name_any(),
        uid: org.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Other organizations whose canaries this one's probes attack: the sentinel, then the next
/// organization of the same platform by org id (so every pair is eventually exercised).
fn peers(ctx: &Context, org: &Organization, me: &OrgId) -> Vec<OrgId> {
    let mut ids: Vec<OrgId> = ctx
        .organizations()
        .iter()
        .filter(|o| {
            o.spec.platform_ref == org.spec.platform_ref && o.metadata.deletion_timestamp.is_none()
        })
        .filter_map(|o| OrgId::parse(&o.spec.org_id).ok())
        .filter(|id| id != me)
        .collect();
    ids.sort();
    ids.dedup();
    let mut out = vec![OrgId::sentinel()];
    if let Some(next) = ids.iter().find(|id| *id > me).or_else(|| ids.first()) {
        out.push(next.clone());
    }
    out
}

async fn load_platform(
    ctx: &Context,
    org: &Organization,
) -> Result<Option<IsolationPlatform>, Error> {
    let api: Api<IsolationPlatform> = Api::all(ctx.client.clone());
    Ok(api.get_opt(&org.spec.platform_ref).await?)
}

fn layer_enabled(org: &Organization, kind: LayerKind) -> bool {
    match kind {
        LayerKind::Database => org.spec.database.enabled,
        LayerKind::Storage => org.spec.storage.enabled,
        LayerKind::Cache => org.spec.cache.enabled,
        LayerKind::Network => org.spec.network.enabled,
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

/// A status that says only why the organization cannot be worked on.
fn blocked_status(org: &Organization, reason: &str, message: &str) -> OrganizationStatus {
    let previous = org.status.clone().unwrap_or_default();
    let fresh = vec![crate::api::Condition::new(
        "Ready",
        ConditionStatus::False,
        reason,
        message,
    )];
    OrganizationStatus {
        observed_generation: org.metadata.generation,
        conditions: merge(&previous.conditions, fresh, &now(), org.metadata.generation),
        ..previous
    }
}

async fn apply(org: Arc<Organization>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = org.name_any();
    let org_id = match OrgId::parse(&org.spec.org_id) {
        Ok(id) => id,
        Err(e) => {
            // The CRD refuses these; an object from before validation existed still gets a clear answer.
            write_status(
                &ctx,
                &org,
                &blocked_status(&org, "InvalidSpec", &e.to_string()),
            )
            .await?;
            return Ok(Action::await_change());
        }
    };
    let Some(platform) = load_platform(&ctx, &org).await? else {
        let msg = format!("IsolationPlatform {:?} not found", org.spec.platform_ref);
        write_status(&ctx, &org, &blocked_status(&org, "PlatformNotFound", &msg)).await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let rt = ctx.platforms.runtime(&ctx, &platform).await;
    let previous = org.status.clone().unwrap_or_default();
    let namespace = render_template(&platform.spec.network.namespace_template, &org_id);
    let requested_rotation = org.annotations().get(ROTATE_ANNOTATION).cloned();
    let rotation_due = requested_rotation.is_some() && requested_rotation != previous.rotation;

    // Identities are recorded before they are created, so cleanup finds them after a crash.
    let identity_of = |kind: LayerKind| {
        rt.layers
            .get(&kind)
            .and_then(|slot| slot.as_ref().ok())
            .filter(|_| layer_enabled(&org, kind))
            .and_then(|l| l.identity(&org_id))
    };
    let identities = OrganizationIdentities {
        database_role: identity_of(LayerKind::Database),
        storage_principal: identity_of(LayerKind::Storage),
        cache_user: identity_of(LayerKind::Cache),
    };
    let mut status = OrganizationStatus {
        observed_generation: previous.observed_generation,
        namespace: Some(namespace.clone()),
        identities: Some(identities),
        ..previous.clone()
    };
    if status != previous {
        write_status(&ctx, &org, &status).await?;
    }

    let mut tenant = Tenant {
        name: name.clone(),
        org_id: org_id.clone(),
        display_name: org
            .spec
            .display_name
            .clone()
            .unwrap_or_else(|| org_id.to_string()),
        namespace: namespace.clone(),
        deletion_policy: org.spec.deletion_policy,
        rotate: rotation_due,
        peers: peers(&ctx, &org, &org_id),
        owner: owner_reference(&org),
        adopt_from: None,
        resource_quota: org.spec.network.resource_quota.clone(),
        limit_range: org.spec.network.limit_range.clone(),
    };

    let mut repairs: Vec<(Option<LayerKind>, Repair)> = Vec::new();
    let ws = workspace::ensure_namespace(&ctx, &org, &tenant, previous.namespace.is_some()).await;
    let (workspace, mut creds, secret_state) = match ws {
        Err(e) => (
            Workspace::Failed {
                reason: e.reason().to_owned(),
                message: e.to_string(),
            },
            Credentials::default(),
            None,
        ),
        Ok(ns_repairs) => {
            repairs.extend(ns_repairs.into_iter().map(|r| (None, r)));
            match workspace::load_credentials_when_bound(&ctx, &tenant).await {
                Ok(loaded) => {
                    if loaded.tampered {
                        repairs.push((None, Repair("credentials Secret was edited outside bulkhead; every credential is rotated".into())));
                        tenant.rotate = true;
                    } else if loaded.missing && previous.credentials_secret.is_some() {
                        repairs.push((None, Repair("credentials Secret was deleted; it is written again with new credentials".into())));
                        tenant.rotate = true;
                    }
                    // An edited Secret is not trusted: every layer writes fresh credentials.
                    let start = if loaded.tampered {
                        Credentials::default()
                    } else {
                        loaded.credentials.clone()
                    };
                    (Workspace::Ready, start, Some(loaded))
                }
                Err(e) => (
                    Workspace::Failed {
                        reason: e.reason().to_owned(),
                        message: e.to_string(),
                    },
                    Credentials::default(),
                    None,
                ),
            }
        }
    };

    // Ensure every enabled, configured layer; one failing backend never hides the others.
    let mut outcomes: BTreeMap<LayerKind, LayerOutcome> = BTreeMap::new();
    let workspace_ok = matches!(workspace, Workspace::Ready);
    let mut ensured: Vec<LayerKind> = Vec::new();
    for kind in LayerKind::ALL {
        match rt.layers.get(&kind) {
            None => {
                outcomes.insert(kind, LayerOutcome::NotConfigured);
            }
            Some(_) if !layer_enabled(&org, kind) => {
                outcomes.insert(kind, LayerOutcome::Disabled);
            }
            Some(Err(e)) => {
                outcomes.insert(
                    kind,
                    LayerOutcome::Failed {
                        reason: e.reason().into(),
                        message: e.to_string(),
                    },
                );
            }
            Some(Ok(_)) if !workspace_ok => {
                outcomes.insert(
                    kind,
                    LayerOutcome::Failed {
                        reason: "WorkspaceNotReady".into(),
                        message: "waiting for the organization's namespace and credentials Secret"
                            .into(),
                    },
                );
            }
            Some(Ok(_)) => ensured.push(kind),
        }
    }
    let ensure_results = futures::future::join_all(ensured.iter().map(|kind| {
        let rt = rt.clone();
        let tenant = tenant.clone();
        let mut layer_creds = creds.clone();
        async move {
            let layer = match rt.layers.get(kind) {
                Some(Ok(l)) => l.clone(),
                _ => unreachable_layer(),
            };
            rt.ensure_prepared(*kind).await?;
            let repairs = layer.ensure(&tenant, &mut layer_creds).await?;
            Ok::<_, LayerError>((repairs, layer_creds))
        }
    }))
    .await;
    let mut verified: Vec<LayerKind> = Vec::new();
    let base = creds.clone();
    for (kind, result) in ensured.iter().zip(ensure_results) {
        match result {
            Ok((layer_repairs, layer_creds)) => {
                repairs.extend(layer_repairs.into_iter().map(|r| (Some(*kind), r)));
                merge_credentials(&base, &layer_creds, &mut creds);
                verified.push(*kind);
            }
            Err(e) => {
                tracing::warn!(organization = %name, layer = %kind, error = %e, "ensure failed");
                outcomes.insert(
                    *kind,
                    LayerOutcome::Failed {
                        reason: e.reason().into(),
                        message: e.to_string(),
                    },
                );
            }
        }
    }

    // BYOK keys and the credentials Secret, in one write.
    let mut workspace = workspace;
    let mut ai_providers = Vec::new();
    if let Some(loaded) = &secret_state {
        match workspace::provider_keys(&ctx, &org).await {
            Ok(keys) => {
                for (provider, key_name, value) in keys {
                    ai_providers.push(provider);
                    creds.set(key_name, value);
                }
            }
            Err(e) => {
                workspace = Workspace::Failed {
                    reason: e.reason().into(),
                    message: e.to_string(),
                }
            }
        }
        workspace::drop_stale_provider_keys(&org, &mut creds);
        if let Err(e) = workspace::write_credentials(&ctx, &tenant, loaded, &creds).await {
            workspace = Workspace::Failed {
                reason: e.reason().into(),
                message: e.to_string(),
            };
        }
    }

    // Verify with the credentials just written.
    let verify_results = futures::future::join_all(verified.iter().map(|kind| {
        let layer = match rt.layers.get(kind) {
            Some(Ok(l)) => l.clone(),
            _ => unreachable_layer(),
        };
        let tenant = tenant.clone();
        let creds = creds.clone();
        async move { layer.verify(&tenant, &creds).await }
    }))
    .await;
    let probed_at = now();
    for (kind, result) in verified.iter().zip(verify_results) {
        let outcome = match result {
            Ok(v) => {
                for p in &v.probes {
                    let result = if p.passed { "passed" } else { "failed" };
                    ctx.metrics
                        .probes
                        .get_or_create(&ProbeLabels {
                            layer: kind.name().into(),
                            result: result.into(),
                        })
                        .inc();
                }
                LayerOutcome::Checked {
                    verification: v,
                    probed_at: probed_at.clone(),
                }
            }
            Err(e) => LayerOutcome::Failed {
                reason: e.reason().into(),
                message: e.to_string(),
            },
        };
        outcomes.insert(*kind, outcome);
    }

    // Events for repairs; status; events for transitions.
    let oref = org.object_ref(&());
    for (kind, r) in &repairs {
        let layer = kind.map(LayerKind::name).unwrap_or("workspace");
        ctx.metrics
            .repairs
            .get_or_create(&LayerLabels {
                layer: layer.into(),
            })
            .inc();
        tracing::info!(organization = %name, layer, repair = %r.0, "drift repaired");
        publish_event(
            &ctx,
            &oref,
            true,
            "DriftRepaired",
            &format!("{layer}: {}", r.0),
        )
        .await;
    }
    let all_ensured = outcomes
        .values()
        .all(|o| !matches!(o, LayerOutcome::Failed { .. }))
        && matches!(workspace, Workspace::Ready);
    let fresh = status::conditions(&workspace, &outcomes);
    status.conditions = merge(&previous.conditions, fresh, &now(), org.metadata.generation);
    status.observed_generation = org.metadata.generation;
    status.layers = status::layer_details(&outcomes);
    status.credentials_secret = secret_state
        .as_ref()
        .map(|_| workspace::CREDENTIALS_SECRET.to_owned());
    status.ai_providers = ai_providers;
    if rotation_due && all_ensured {
        status.rotation = requested_rotation;
        publish_event(
            &ctx,
            &oref,
            false,
            "CredentialsRotated",
            "every layer's credentials were replaced",
        )
        .await;
    }
    for (c, old) in transitions(&previous.conditions, &status.conditions) {
        let warning = c.status != ConditionStatus::True;
        let note = format!(
            "{} {:?} -> {:?} ({}): {}",
            c.type_, old, c.status, c.reason, c.message
        );
        publish_event(
            &ctx,
            &oref,
            warning,
            &format!("{}{}", c.type_, if warning { "Lost" } else { "Reached" }),
            &note,
        )
        .await;
    }
    write_status(&ctx, &org, &status).await?;
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True);
    tracing::info!(organization = %name, org_id = %org_id, ready, "reconciled");
    if all_ensured {
        Ok(Action::requeue(verification_delay(
            platform.spec.verification.interval_seconds,
            &name,
        )))
    } else {
        Ok(Action::requeue(Duration::from_secs(15)))
    }
}

fn unreachable_layer() -> Arc<dyn crate::layers::Layer> {
    // Only layers found as Ok in the runtime are scheduled; this cannot be reached.
    panic!("layer scheduled that the runtime does not hold")
}

/// Takes into `merged` every key a layer changed relative to `base`.
fn merge_credentials(base: &Credentials, layer: &Credentials, merged: &mut Credentials) {
    for (k, v) in layer.entries() {
        if base.get(k) != Some(v.as_str()) {
            merged.set(k.clone(), v.clone());
        }
    }
    for k in base.entries().keys() {
        if layer.get(k).is_none() {
            merged.remove(k);
        }
    }
}

async fn cleanup(org: Arc<Organization>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = org.name_any();
    let oref = org.object_ref(&());
    let Ok(org_id) = OrgId::parse(&org.spec.org_id) else {
        return Ok(Action::await_change());
    };
    let Some(platform) = load_platform(&ctx, &org).await? else {
        publish_event(
            &ctx,
            &oref,
            true,
            "CleanupSkipped",
            &format!("IsolationPlatform {:?} is gone; external identities of {org_id} could not be removed", org.spec.platform_ref),
        )
        .await;
        return Ok(Action::await_change());
    };
    let rt = ctx.platforms.runtime(&ctx, &platform).await;
    let namespace = org
        .status
        .as_ref()
        .and_then(|s| s.namespace.clone())
        .unwrap_or_else(|| render_template(&platform.spec.network.namespace_template, &org_id));
    let tenant = Tenant {
        name: name.clone(),
        org_id: org_id.clone(),
        display_name: org.spec.display_name.clone().unwrap_or_default(),
        namespace,
        deletion_policy: org.spec.deletion_policy,
        rotate: false,
        peers: Vec::new(),
        owner: owner_reference(&org),
        adopt_from: None,
        resource_quota: None,
        limit_range: None,
    };
    for (kind, slot) in &rt.layers {
        if !layer_enabled(&org, *kind) {
            continue;
        }
        let layer = match slot {
            Ok(l) => l,
            Err(e) => {
                return Err(Error::Cleanup {
                    layer: *kind,
                    source: LayerError::Unreachable(e.to_string()),
                });
            }
        };
        layer
            .cleanup(&tenant)
            .await
            .map_err(|source| Error::Cleanup {
                layer: *kind,
                source,
            })?;
    }
    workspace::delete_namespace(&ctx, &org, &tenant).await?;
    publish_event(
        &ctx,
        &oref,
        false,
        "CleanedUp",
        &format!(
            "isolation of {org_id} removed ({:?})",
            org.spec.deletion_policy
        ),
    )
    .await;
    tracing::info!(organization = %name, org_id = %org_id, "cleaned up");
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(2), Duration::from_secs(4));
        assert_eq!(backoff(5), Duration::from_secs(32));
        assert_eq!(backoff(50), Duration::from_secs(300));
    }

    #[test]
    fn verification_delay_is_spread_but_bounded() {
        let a = verification_delay(300, "acme");
        let b = verification_delay(300, "globex");
        for d in [a, b] {
            assert!(d >= Duration::from_secs(300) && d < Duration::from_secs(330));
        }
        assert_eq!(a, verification_delay(300, "acme"), "deterministic per name");
    }

    #[test]
    fn merged_credentials_keep_each_layers_changes() {
        let base = Credentials::new(BTreeMap::from([
            ("A".into(), "1".into()),
            ("B".into(), "2".into()),
        ]));
        let mut layer_a = base.clone();
        layer_a.set("A", "1b");
        let mut layer_c = base.clone();
        layer_c.set("C", "3");
        let mut merged = base.clone();
        merge_credentials(&base, &layer_a, &mut merged);
        merge_credentials(&base, &layer_c, &mut merged);
        assert_eq!(merged.get("A"), Some("1b"));
        assert_eq!(merged.get("B"), Some("2"));
        assert_eq!(merged.get("C"), Some("3"));
    }
}
