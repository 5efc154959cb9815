//! Network layer: NetworkPolicies that shut every other organization out of the organization's
//! pods, optional ResourceQuota and LimitRange, and a reachability check over every
//! NetworkPolicy of the cluster.

pub mod assess;
pub mod plan;
pub mod reach;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{LimitRange, Namespace, ResourceQuota};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use self::plan::{NetworkConfig, NetworkPlan, PLAN_ANNOTATION};
use self::reach::Cluster;
use super::{
    BuildEnv, Credentials, Layer, LayerError, LayerKind, LayerSlot, Repair, Tenant, Verification,
};
use crate::api::platform::{NetworkMode, NetworkPlatform};
use crate::api::{FIELD_MANAGER, ORG_ID_LABEL};

/// How long a cluster-wide read of namespaces and policies is reused across organizations. The
/// namespaces where the organization's own pods run are always read fresh.
const SNAPSHOT_TTL: Duration = Duration::from_secs(15);
/// Page size of cluster-wide lists.
const PAGE: u32 = 500;

/// Builds the network layer for a platform.
pub async fn build(env: &BuildEnv<'_>) -> LayerSlot {
    Ok(Arc::new(NetworkLayer::new(
        env.client.clone(),
        &env.platform.spec.network,
    )?))
}

/// Every namespace's labels and every NetworkPolicy, as read (and parsed) at one time.
struct Snapshot {
    at: Instant,
    cluster: Cluster,
}

/// Keeps other organizations' traffic out of the organization's pods, and proves it on the
/// policy set.
pub struct NetworkLayer {
    client: kube::Client,
    config: NetworkConfig,
    raw: NetworkPlatform,
    snapshot: Mutex<Option<Arc<Snapshot>>>,
    /// Plan hash this process last applied, per Organization UID. A pass that finds none of the
    /// organization's objects left (all deleted at once) still knows they were there, and
    /// reports the re-creation as a repair. Kept in memory only: it costs no write, and after
    /// a restart objects deleted while the operator was down are created again unreported.
    applied: Mutex<std::collections::HashMap<String, String>>,
}

impl NetworkLayer {
    /// A layer for `config`; refuses an unusable configuration.
    pub fn new(client: kube::Client, config: &NetworkPlatform) -> Result<Self, LayerError> {
        let validated = plan::validate(config).map_err(LayerError::Config)?;
        Ok(Self {
            client,
            config: validated,
            raw: config.clone(),
            snapshot: Mutex::new(None),
            applied: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// The objects this layer wants for the organization.
    pub fn plan(&self, tenant: &Tenant) -> NetworkPlan {
        plan::plan(&self.config, tenant)
    }

    fn policies(&self, ns: &str) -> Api<NetworkPolicy> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Applies one planned object when the live one is missing or differs; says what was repaired.
    async fn converge_policy(
        &self,
        planned: &NetworkPolicy,
        live: Option<&NetworkPolicy>,
        hash: &str,
        plan_was_applied: bool,
    ) -> Result<Option<Repair>, LayerError> {
        let ns = planned.namespace().unwrap_or_default();
        let name = planned.name_any();
        let api = self.policies(&ns);
        let fetched;
        let live = match live {
            Some(l) => Some(l),
            None => {
                // Not found by label: deleted, or its labels were removed.
                fetched = api
                    .get_opt(&name)
                    .await
                    .map_err(|e| not_found_as_config(e, &ns))?;
                fetched.as_ref()
            }
        };
        let repair = match live {
            Some(l)
                if plan::same_spec(l, planned)
                    && plan::same_meta(&l.metadata, &planned.metadata) =>
            {
                return Ok(None);
            }
            Some(l) => (annotation(&l.metadata) == Some(hash)).then(|| {
                Repair(format!(
                    "NetworkPolicy {ns}/{name} was changed outside bulkhead; restored"
                ))
            }),
            None => plan_was_applied.then(|| {
                Repair(format!(
                    "NetworkPolicy {ns}/{name} was deleted; created again"
                ))
            }),
        };
        let applied = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(planned),
            )
            .await
            .map_err(|e| not_found_as_config(e, &ns))?;
        if !plan::same_spec(&applied, planned) {
            // Fields another manager added survive an apply; write the whole spec instead.
            let mut whole = applied;
            whole.spec = planned.spec.clone();
            whole.metadata.managed_fields = None;
            let pp = PostParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..Default::default()
            };
            api.replace(&name, &pp, &whole).await?;
        }
        Ok(repair)
    }

    /// Converges a ResourceQuota or LimitRange. The server's dry-run of the apply is compared with
    /// the live object, so quantities written differently but equal do not count as drift.
    async fn converge_object<K>(
        &self,
        planned: &K,
        hash: &str,
        plan_was_applied: bool,
    ) -> Result<Option<Repair>, LayerError>
    where
        K: Resource<Scope = NamespaceResourceScope> + Clone + Debug + Serialize + DeserializeOwned,
        K::DynamicType: Default,
    {
        let ns = planned.meta().namespace.clone().unwrap_or_default();
        let name = planned.meta().name.clone().unwrap_or_default();
        let kind = K::kind(&K::DynamicType::default()).to_string();
        let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let repair = match api.get_opt(&name).await? {
            None => plan_was_applied
                .then(|| Repair(format!("{kind} {ns}/{name} was deleted; created again"))),
            Some(live) => {
                let dry = api
                    .patch(&name, &pp.clone().dry_run(), &Patch::Apply(planned))
                    .await?;
                if spec_of(&dry) == spec_of(&live) && plan::same_meta(live.meta(), planned.meta()) {
                    return Ok(None);
                }
                (annotation(live.meta()) == Some(hash)).then(|| {
                    Repair(format!(
                        "{kind} {ns}/{name} was changed outside bulkhead; restored"
                    ))
                })
            }
        };
        api.patch(&name, &pp, &Patch::Apply(planned)).await?;
        Ok(repair)
    }

    /// Every namespace and policy of the cluster, reused for [`SNAPSHOT_TTL`].
    async fn snapshot(&self) -> Result<Arc<Snapshot>, LayerError> {
        if let Some(s) = self.snapshot.lock().map_err(|_| poisoned())?.as_ref()
            && s.at.elapsed() < SNAPSHOT_TTL
        {
            return Ok(s.clone());
        }
        let namespaces = list_namespaces(&self.client).await?;
        let policies = list_all(&Api::<NetworkPolicy>::all(self.client.clone()), "").await?;
        let snap = Arc::new(Snapshot {
            at: Instant::now(),
            cluster: Cluster::new(namespaces, &policies),
        });
        *self.snapshot.lock().map_err(|_| poisoned())? = Some(snap.clone());
        Ok(snap)
    }

    /// Reads what the evaluator needs: the cached cluster view, with fresh reads of the
    /// namespaces where the organization's pods run and of its peers' namespaces.
    async fn cluster(
        &self,
        tenant: &Tenant,
        pod_namespaces: &[String],
    ) -> Result<(Cluster, Vec<String>), LayerError> {
        let snap = self.snapshot().await?;
        let mut cluster = snap.cluster.clone();
        let ns_api: Api<Namespace> = Api::all(self.client.clone());
        let mut missing = Vec::new();
        let mut fresh: Vec<String> = pod_namespaces.to_vec();
        if self.config.mode == NetworkMode::Namespace {
            for peer in tenant
                .peers
                .iter()
                .filter(|p| !p.is_sentinel() && *p != &tenant.org_id)
            {
                fresh.push(crate::tenant::render_template(
                    &self.raw.namespace_template,
                    peer,
                ));
            }
        }
        for (i, ns) in fresh.iter().enumerate() {
            match ns_api.get_opt(ns).await? {
                Some(n) => {
                    // A peer's namespace counts only if it really is that organization's.
                    let labels = n.labels().clone();
                    if i >= pod_namespaces.len() && !labels.contains_key(ORG_ID_LABEL) {
                        continue;
                    }
                    cluster.set_namespace(ns, labels);
                    cluster.replace_policies(ns, &list_all(&self.policies(ns), "").await?);
                }
                None if i < pod_namespaces.len() => missing.push(ns.clone()),
                None => {}
            }
        }
        Ok((cluster, missing))
    }
}

fn poisoned() -> LayerError {
    LayerError::Backend("network snapshot lock poisoned".to_owned())
}

fn annotation(meta: &kube::api::ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(PLAN_ANNOTATION))
        .map(String::as_str)
}

fn spec_of<K: Serialize>(obj: &K) -> serde_json::Value {
    serde_json::to_value(obj)
        .ok()
        .and_then(|v| v.get("spec").cloned())
        .unwrap_or_default()
}

/// A namespace that does not exist is a configuration problem, said in words.
fn not_found_as_config(e: kube::Error, ns: &str) -> LayerError {
    match &e {
        kube::Error::Api(s) if s.code == 404 => {
            LayerError::Config(format!("namespace {ns} does not exist"))
        }
        _ => LayerError::Kube(e),
    }
}

async fn list_all<K>(api: &Api<K>, selector: &str) -> Result<Vec<K>, LayerError>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    let mut out = Vec::new();
    let mut lp = ListParams::default().limit(PAGE);
    if !selector.is_empty() {
        lp = lp.labels(selector);
    }
    loop {
        let page = api.list(&lp).await?;
        out.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => lp = lp.continue_token(&token),
            _ => return Ok(out),
        }
    }
}

async fn list_namespaces(
    client: &kube::Client,
) -> Result<Vec<(String, BTreeMap<String, String>)>, LayerError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut out = Vec::new();
    let mut lp = ListParams::default().limit(PAGE);
    loop {
        let page = api.list_metadata(&lp).await?;
        out.extend(
            page.items
                .into_iter()
                .map(|n| (n.name_any(), n.labels().clone())),
        );
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => lp = lp.continue_token(&token),
            _ => return Ok(out),
        }
    }
}

/// Deletes an object; one already gone is fine.
async fn delete_quietly<K>(api: &Api<K>, name: &str) -> Result<(), LayerError>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[async_trait]
impl Layer for NetworkLayer {
    fn kind(&self) -> LayerKind {
        LayerKind::Network
    }

    async fn ensure(
        &self,
        tenant: &Tenant,
        _creds: &mut Credentials,
    ) -> Result<Vec<Repair>, LayerError> {
        let plan = self.plan(tenant);
        let selector = plan::managed_selector(tenant);
        let live = list_all(&Api::<NetworkPolicy>::all(self.client.clone()), &selector).await?;
        let quotas: Api<ResourceQuota> = Api::namespaced(self.client.clone(), &tenant.namespace);
        let limits: Api<LimitRange> = Api::namespaced(self.client.clone(), &tenant.namespace);
        let live_quotas = list_all(&quotas, &selector)
            .await
            .map_err(|e| missing_namespace(e, &tenant.namespace))?;
        let live_limits = list_all(&limits, &selector).await?;
        // Some object already carries this plan: what is missing or different now was changed.
        let plan_was_applied = live
            .iter()
            .map(|p| &p.metadata)
            .chain(live_quotas.iter().map(|q| &q.metadata))
            .chain(live_limits.iter().map(|l| &l.metadata))
            .any(|m| annotation(m) == Some(plan.hash.as_str()))
            || self
                .applied
                .lock()
                .map_err(|_| poisoned())?
                .get(&tenant.owner.uid)
                == Some(&plan.hash);

        let mut repairs = Vec::new();
        for planned in &plan.policies {
            let found = live.iter().find(|l| {
                l.namespace() == planned.namespace() && l.name_any() == planned.name_any()
            });
            repairs.extend(
                self.converge_policy(planned, found, &plan.hash, plan_was_applied)
                    .await?,
            );
        }
        if let Some(q) = &plan.resource_quota {
            repairs.extend(
                self.converge_object(q, &plan.hash, plan_was_applied)
                    .await?,
            );
        }
        if let Some(l) = &plan.limit_range {
            repairs.extend(
                self.converge_object(l, &plan.hash, plan_was_applied)
                    .await?,
            );
        }

        // Whatever bulkhead manages for the organization and the plan no longer holds goes.
        for orphan in live.iter().filter(|l| {
            !plan
                .policies
                .iter()
                .any(|p| p.namespace() == l.namespace() && p.name_any() == l.name_any())
        }) {
            let ns = orphan.namespace().unwrap_or_default();
            delete_quietly(&self.policies(&ns), &orphan.name_any()).await?;
        }
        let keep_quota = plan.resource_quota.as_ref().map(|q| q.name_any());
        for q in live_quotas
            .iter()
            .filter(|q| Some(q.name_any()) != keep_quota)
        {
            delete_quietly(&quotas, &q.name_any()).await?;
        }
        let keep_limits = plan.limit_range.as_ref().map(|l| l.name_any());
        for l in live_limits
            .iter()
            .filter(|l| Some(l.name_any()) != keep_limits)
        {
            delete_quietly(&limits, &l.name_any()).await?;
        }
        self.applied
            .lock()
            .map_err(|_| poisoned())?
            .insert(tenant.owner.uid.clone(), plan.hash.clone());
        Ok(repairs)
    }

    async fn verify(
        &self,
        tenant: &Tenant,
        _creds: &Credentials,
    ) -> Result<Verification, LayerError> {
        // Only policies are compared here; quotas and limits do not change isolation.
        let planned = self.plan(tenant).policies;
        let pod_namespaces = plan::pod_namespaces(&self.config, tenant);
        let (cluster, missing) = self.cluster(tenant, &pod_namespaces).await?;
        let mut findings: Vec<String> = missing
            .iter()
            .map(|ns| format!("namespace {ns} does not exist; no policy protects it"))
            .collect();
        let live = list_all(
            &Api::<NetworkPolicy>::all(self.client.clone()),
            &plan::managed_selector(tenant),
        )
        .await?;
        for p in &planned {
            let (ns, name) = (p.namespace().unwrap_or_default(), p.name_any());
            if missing.contains(&ns) {
                continue;
            }
            let found = match live
                .iter()
                .find(|l| l.namespace().as_deref() == Some(&ns) && l.name_any() == name)
            {
                Some(l) => Some(l.clone()),
                None => self.policies(&ns).get_opt(&name).await?,
            };
            let mut want_meta = p.metadata.clone();
            want_meta.annotations = None;
            match found {
                None => findings.push(format!("NetworkPolicy {ns}/{name} is missing")),
                Some(l) if !plan::same_spec(&l, p) => findings.push(format!(
                    "NetworkPolicy {ns}/{name} differs from what bulkhead applied"
                )),
                Some(l) if !plan::same_meta(&l.metadata, &want_meta) => findings.push(format!(
                    "NetworkPolicy {ns}/{name} lost its bulkhead labels or owner reference"
                )),
                Some(_) => {}
            }
        }
        let mut v = assess::assess(&cluster, &self.config, tenant);
        findings.append(&mut v.findings);
        v.findings = findings;
        Ok(v)
    }

    async fn cleanup(&self, tenant: &Tenant) -> Result<(), LayerError> {
        self.applied
            .lock()
            .map_err(|_| poisoned())?
            .remove(&tenant.owner.uid);
        let selector = plan::managed_selector(tenant);
        for p in list_all(&Api::<NetworkPolicy>::all(self.client.clone()), &selector).await? {
            delete_quietly(
                &self.policies(&p.namespace().unwrap_or_default()),
                &p.name_any(),
            )
            .await?;
        }
        let quotas: Api<ResourceQuota> = Api::namespaced(self.client.clone(), &tenant.namespace);
        let limits: Api<LimitRange> = Api::namespaced(self.client.clone(), &tenant.namespace);
        for q in list_all(&quotas, &selector).await? {
            delete_quietly(&quotas, &q.name_any()).await?;
        }
        for l in list_all(&limits, &selector).await? {
            delete_quietly(&limits, &l.name_any()).await?;
        }
        Ok(())
    }
}

fn missing_namespace(e: LayerError, ns: &str) -> LayerError {
    match e {
        LayerError::Kube(k) => not_found_as_config(k, ns),
        other => other,
    }
}
