//! What every reconcile shares: the client, metrics, the platform runtimes, the event reporter.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::core::DeserializeGuard;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use tokio::sync::Mutex;

use super::platform::PlatformCache;
use super::status::clip;
use crate::api::Organization;
use crate::telemetry::Metrics;

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    /// Namespace of the operator: default home of the platform's Secrets and BYOK source keys.
    pub operator_namespace: String,
    pub metrics: Arc<Metrics>,
    pub platforms: PlatformCache,
    reporter: Reporter,
    /// When set, only Organizations of this IsolationPlatform (and the platform itself) are handled.
    pub platform_filter: Option<String>,
    /// ClusterRole (Secret access) that the operator binds to its own ServiceAccount inside each
    /// organization's namespace, so it never needs cluster-wide Secret access.
    pub namespace_access: Option<NamespaceAccess>,
    pub(crate) failures: Mutex<HashMap<String, u32>>,
    /// Consecutive transient failures per (organization, part of the pass), for backoff.
    pub(crate) streaks: Mutex<HashMap<(String, &'static str), u32>>,
    pub(crate) orgs: OnceLock<Store<DeserializeGuard<Organization>>>,
    /// Organizations this process has already seen a pass for.
    seen: Mutex<std::collections::HashSet<String>>,
    /// Names of platforms whose database reported drift (the layers' drift listeners send here).
    pub(crate) drift_tx: tokio::sync::mpsc::UnboundedSender<String>,
    /// The receiving end, taken once by the controllers.
    pub(crate) drift_rx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
}

impl Context {
    pub fn new(
        client: Client,
        operator_namespace: String,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Self {
        let (drift_tx, drift_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            client,
            operator_namespace,
            metrics,
            platforms: PlatformCache::default(),
            reporter: Reporter {
                controller: "bulkhead".into(),
                instance,
            },
            platform_filter: None,
            namespace_access: None,
            failures: Mutex::new(HashMap::new()),
            streaks: Mutex::new(HashMap::new()),
            orgs: OnceLock::new(),
            seen: Mutex::new(std::collections::HashSet::new()),
            drift_tx,
            drift_rx: std::sync::Mutex::new(Some(drift_rx)),
        }
    }

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

    /// Shows `visit` every Organization the controller has seen that deserialized cleanly, in
    /// place in the watch cache: nothing is copied.
    pub fn for_each_organization(&self, mut visit: impl FnMut(&Organization)) {
        if let Some(store) = self.orgs.get() {
            for g in store.state() {
                if let Ok(o) = g.0.as_ref() {
                    visit(o);
                }
            }
        }
    }

    /// The org ids of `platform`'s Organizations that are not being deleted, read in place in
    /// the watch cache: no Organization is copied (a pass needs only the ids, and copying every
    /// cached Organization on every pass made a sweep quadratic in memory traffic).
    pub fn live_org_ids(&self, platform: &str) -> Vec<crate::tenant::OrgId> {
        self.orgs
            .get()
            .map(|s| {
                s.state()
                    .iter()
                    .filter_map(|g| g.0.as_ref().ok())
                    .filter(|o| {
                        o.spec.platform_ref == platform && o.metadata.deletion_timestamp.is_none()
                    })
                    .filter_map(|o| crate::tenant::OrgId::parse(&o.spec.org_id).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether this is the first pass of `name` in this process (and records that it happened).
    pub(crate) async fn first_pass(&self, name: &str) -> bool {
        self.seen.lock().await.insert(name.to_owned())
    }

    /// Publishes an Event about `regarding`; failures to publish are logged, never fatal.
    pub(crate) async fn publish_event(
        &self,
        regarding: &ObjectReference,
        warning: bool,
        reason: &str,
        note: &str,
    ) {
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(clip(note)),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, regarding).await {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
    }
}

/// The operator's own identity and the ClusterRole it binds to it in organization namespaces.
#[derive(Clone, Debug)]
pub struct NamespaceAccess {
    pub cluster_role: String,
    pub service_account: String,
}

/// Options of `bulkhead run` that shape the controllers.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub concurrency: u16,
    /// Watch credentials Secrets cluster-wide so edits are repaired at once. Needs cluster-wide
    /// Secret read access; without it an edit is noticed at the next verification pass.
    pub watch_secrets: bool,
}

pub(crate) fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}
