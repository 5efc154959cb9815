//! Network layer: NetworkPolicies that shut every other organization out of the organization's
//! pods, optional ResourceQuota and LimitRange, and a reachability check over every
//! NetworkPolicy of the cluster.

pub mod assess;
pub mod plan;
pub mod reach;
pub mod traffic;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{LimitRange, Namespace, Pod, ResourceQuota};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use self::plan::{NetworkConfig, NetworkPlan, PLAN_ANNOTATION};
use self::reach::{Cluster, Endpoint, PodSet};
use super::{
    BuildEnv, Credentials, Layer, LayerError, LayerKind, LayerSlot, Repair, Tenant, Verification,
};
use crate::api::platform::{NetworkMode, NetworkPlatform};
use crate::api::{FIELD_MANAGER, ORG_ID_LABEL};
use crate::tenant::OrgId;

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

/// Every namespace's labels and every NetworkPolicy, as read (and parsed) at one time. Passes
/// share it: each reads its own namespaces again into a view over it.
struct Snapshot {
    at: Instant,
    cluster: Arc<Cluster>,
}

/// Keeps other organizations' traffic out of the organization's pods, and proves it on the
/// policy set.
pub struct NetworkLayer {
    client: kube::Client,
    config: NetworkConfig,
    raw: NetworkPlatform,
    /// Held across a refresh, so that passes arriving while the snapshot is being read wait for
    /// that one read instead of each listing the whole cluster again.
    snapshot: tokio::sync::Mutex<Option<Arc<Snapshot>>>,
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
            snapshot: tokio::sync::Mutex::new(None),
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

    /// Every namespace and policy of the cluster, reused for [`SNAPSHOT_TTL`]. One refresh at a
    /// time: the lock is held while the cluster is read.
    async fn snapshot(&self) -> Result<Arc<Snapshot>, LayerError> {
        let mut cached = self.snapshot.lock().await;
        if let Some(s) = cached.as_ref()
            && s.at.elapsed() < SNAPSHOT_TTL
        {
            return Ok(s.clone());
        }
        let namespaces = list_namespaces(&self.client).await?;
        let policies = list_policies_everywhere(&self.client).await?;
        let snap = Arc::new(Snapshot {
            at: Instant::now(),
            cluster: Arc::new(Cluster::new(namespaces, &policies)),
        });
        *cached = Some(snap.clone());
        Ok(snap)
    }

    /// Reads what the evaluator needs: a view over the cached cluster, with fresh reads of the
    /// namespaces where the organization's pods run and of its peers' namespaces. The cached
    /// cluster is shared, not copied: the view holds only the fresh reads.
    async fn cluster(
        &self,
        tenant: &Tenant,
        pod_namespaces: &[String],
    ) -> Result<(Cluster, Vec<String>), LayerError> {
        let snap = self.snapshot().await?;
        let mut cluster = Cluster::over(snap.cluster.clone());
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

/// How often Pod state is polled while waiting for a canary or a probe.
const POD_POLL: Duration = Duration::from_millis(500);
/// How long a pass waits for the organization's own canary to be Ready.
const CANARY_READY: Duration = Duration::from_secs(30);
/// Peers whose canaries are looked up per pass at most.
const PEERS_TRIED: usize = 8;

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().is_some_and(|s| {
            s.pod_ip.is_some()
                && s.conditions
                    .as_ref()
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
}

fn pod_phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Unknown")
}

/// Why a Pod's container is not running, in the kubelet's words (`ErrImagePull`, ...).
fn waiting_reason(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find_map(|c| {
            let w = c.state.as_ref()?.waiting.as_ref()?;
            Some(match &w.message {
                Some(m) => format!("{}: {m}", w.reason.clone().unwrap_or_default()),
                None => w.reason.clone().unwrap_or_default(),
            })
        })
}

/// A Ready pod's address and named ports, as the evaluator sees it.
fn pod_endpoint(p: &Pod) -> Option<(String, PodSet)> {
    let ip = p.status.as_ref()?.pod_ip.clone()?;
    let bits = if ip.contains(':') { 128 } else { 32 };
    let addresses = reach::AddrSet::parse([format!("{ip}/{bits}").as_str()]).ok()?;
    let mut named = reach::NamedPorts::new();
    for c in p
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
    {
        for port in c.ports.iter().flatten() {
            if let Some(n) = &port.name {
                named.insert(
                    n.clone(),
                    (
                        port.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
                        port.container_port,
                    ),
                );
            }
        }
    }
    Some((
        ip,
        PodSet {
            namespace: reach::NamespaceRef::Known(p.namespace().unwrap_or_default()),
            labels: reach::LabelSpace::exactly(p.labels()),
            addresses,
            named_ports: Some(named),
        },
    ))
}

impl NetworkLayer {
    fn pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Creates the organization's canary, or replaces one whose spec is no longer current.
    /// A Pod of that name that bulkhead did not create for this organization is never touched.
    async fn ensure_canary(
        &self,
        tc: &traffic::TrafficConfig,
        tenant: &Tenant,
    ) -> Result<(), LayerError> {
        let ns = &tenant.namespace;
        let api = self.pods(ns);
        let want = traffic::canary_pod(tc, tenant);
        let live = api
            .get_opt(traffic::CANARY_NAME)
            .await
            .map_err(|e| not_found_as_config(e, ns))?;
        if let Some(live) = live {
            if !traffic::owned_by(&live, tenant) {
                return Err(LayerError::Config(format!(
                    "Pod {ns}/{} exists and is not bulkhead's canary for this organization; \
                     it is left alone: delete or rename it",
                    traffic::CANARY_NAME
                )));
            }
            let finished = matches!(pod_phase(&live), "Succeeded" | "Failed");
            if traffic::current(&live, &want)
                && live.metadata.deletion_timestamp.is_none()
                && !finished
            {
                return Ok(());
            }
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: live.uid().map(|uid| kube::api::Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(traffic::CANARY_NAME, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..Default::default()
        };
        match api.create(&pp, &want).await {
            Ok(_) => Ok(()),
            // The old canary is still going: the next pass creates the new one.
            Err(kube::Error::Api(s)) if s.code == 409 => Err(LayerError::Backend(format!(
                "the canary Pod {ns}/{} is being replaced",
                traffic::CANARY_NAME
            ))),
            Err(e) => Err(not_found_as_config(e, ns)),
        }
    }

    /// Deletes the organization's canary and probe Pods (`role`: only those of one role).
    async fn remove_probe_pods(
        &self,
        tenant: &Tenant,
        role: Option<&str>,
    ) -> Result<(), LayerError> {
        let selector = match role {
            Some(r) => traffic::role_selector(tenant, r),
            None => format!("{},{}", plan::managed_selector(tenant), traffic::ROLE_LABEL),
        };
        let api = self.pods(&tenant.namespace);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        for p in list_all(&api, &selector).await? {
            match api.delete(&p.name_any(), &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Waits (bounded) for the organization's own canary to be Ready; `Err` says why not.
    async fn own_canary(&self, tenant: &Tenant) -> Result<Result<Pod, String>, LayerError> {
        let api = self.pods(&tenant.namespace);
        let deadline = Instant::now() + CANARY_READY;
        loop {
            let live = api.get_opt(traffic::CANARY_NAME).await?;
            match live {
                Some(p) if traffic::owned_by(&p, tenant) && pod_ready(&p) => return Ok(Ok(p)),
                _ if Instant::now() < deadline => tokio::time::sleep(POD_POLL).await,
                None => {
                    return Ok(Err(format!(
                        "the canary Pod {}/{} does not exist",
                        tenant.namespace,
                        traffic::CANARY_NAME
                    )));
                }
                Some(p) => {
                    let mut why = format!(
                        "the canary Pod {}/{} is not Ready after {} s (phase {}",
                        tenant.namespace,
                        traffic::CANARY_NAME,
                        CANARY_READY.as_secs(),
                        pod_phase(&p)
                    );
                    if let Some(w) = waiting_reason(&p) {
                        why.push_str(&format!(", {w}"));
                    }
                    why.push(')');
                    return Ok(Err(why));
                }
            }
        }
    }

    /// The first peer whose canary bulkhead created and which is Ready.
    async fn peer_canary(&self, tenant: &Tenant) -> Result<Option<(OrgId, Pod)>, LayerError> {
        let peers = tenant
            .peers
            .iter()
            .filter(|p| !p.is_sentinel() && *p != &tenant.org_id)
            .take(PEERS_TRIED);
        for peer in peers {
            let ns = crate::tenant::render_template(&self.raw.namespace_template, peer);
            let Some(p) = self.pods(&ns).get_opt(traffic::CANARY_NAME).await? else {
                continue;
            };
            let l = p.labels();
            let theirs = l.get(ORG_ID_LABEL).map(String::as_str) == Some(peer.as_str())
                && l.get(plan::MANAGED_BY_LABEL).map(String::as_str)
                    == Some(crate::api::MANAGED_BY)
                && l.get(traffic::ROLE_LABEL).map(String::as_str) == Some(traffic::CANARY);
            if theirs && pod_ready(&p) {
                return Ok(Some((peer.clone(), p)));
            }
        }
        Ok(None)
    }

    /// The first Ready Pod in `ns` with all of `labels`.
    async fn ready_pod(
        &self,
        ns: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<Pod>, LayerError> {
        let selector = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let lp = ListParams::default().labels(&selector).limit(50);
        Ok(self
            .pods(ns)
            .list(&lp)
            .await?
            .items
            .into_iter()
            .find(pod_ready))
    }

    /// Sends the packets: finds the targets, asks the evaluator about each path, runs one probe
    /// Pod, and sets its report beside the verdicts.
    async fn traffic(
        &self,
        tc: &traffic::TrafficConfig,
        tenant: &Tenant,
        cluster: &Cluster,
    ) -> Result<(traffic::Traffic, Vec<super::Probe>), LayerError> {
        let own = match self.own_canary(tenant).await? {
            Ok(p) => p,
            Err(why) => return Ok((traffic::Traffic::not_run(why, Vec::new()), Vec::new())),
        };
        let src = PodSet {
            namespace: reach::NamespaceRef::Known(tenant.namespace.clone()),
            labels: reach::LabelSpace::exactly(&traffic::probe_labels(tenant)),
            addresses: reach::AddrSet::new(self.config.pod_cidrs.clone()),
            named_ports: Some(reach::NamedPorts::new()),
        };
        let mut targets = Vec::new();
        // The evaluator's side of each target: its Pods (namespace, labels, address) and port.
        let mut sets: Vec<(PodSet, i32)> = Vec::new();
        let mut skipped = Vec::new();
        let mut add = |name: String, what: String, pod: &Pod, port: i32, cross_tenant: bool| {
            if let Some((ip, dst)) = pod_endpoint(pod) {
                sets.push((dst, port));
                targets.push(traffic::Target {
                    name,
                    what,
                    pod: format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
                    ip,
                    port,
                    cross_tenant,
                    policy_allows: false,
                    policy_stable: true,
                });
            }
        };
        match self.peer_canary(tenant).await? {
            Some((peer, pod)) => add(
                "peer".to_owned(),
                format!("to {peer}'s canary"),
                &pod,
                tc.port,
                true,
            ),
            None => skipped.push("no other organization's canary is Ready".to_owned()),
        }
        add(
            "own".to_owned(),
            "to the organization's own canary".to_owned(),
            &own,
            tc.port,
            false,
        );
        match self
            .ready_pod(&self.config.dns_namespace, &tc.dns_labels)
            .await?
        {
            Some(pod) => add(
                "dns".to_owned(),
                format!("to DNS in {} (TCP 53)", self.config.dns_namespace),
                &pod,
                53,
                false,
            ),
            None => skipped.push(format!("no Ready DNS Pod in {}", self.config.dns_namespace)),
        }
        for t in &self.raw.egress {
            let (Some(ns), Some(port)) = (&t.namespace, t.ports.first()) else {
                continue;
            };
            if t.pod_labels.is_empty() {
                continue;
            }
            match self.ready_pod(ns, &t.pod_labels).await? {
                Some(pod) => add(
                    format!("egress-{}", t.name),
                    format!("to egress target {} (TCP {port})", t.name),
                    &pod,
                    *port,
                    false,
                ),
                None => skipped.push(format!("no Ready Pod of egress target {} in {ns}", t.name)),
            }
        }

        if targets.len() > traffic::MAX_TARGETS {
            sets.truncate(traffic::MAX_TARGETS);
            skipped.extend(targets.drain(traffic::MAX_TARGETS..).map(|t| {
                format!(
                    "{} (one probe tries at most {} paths)",
                    t.what,
                    traffic::MAX_TARGETS
                )
            }));
        }
        // The policies of every namespace a packet touches, read fresh just before the probe
        // and again after it: a verdict that changed meanwhile says nothing about enforcement.
        let mut involved = std::collections::BTreeSet::from([tenant.namespace.clone()]);
        involved.extend(
            targets
                .iter()
                .filter_map(|t| t.pod.split_once('/'))
                .map(|(ns, _)| ns.to_owned()),
        );
        let verdicts = |view: &Cluster| -> Vec<bool> {
            sets.iter()
                .map(|(dst, port)| {
                    view.path(
                        &Endpoint::Pods(src.clone()),
                        &Endpoint::Pods(dst.clone()),
                        &reach::Port::tcp(*port),
                    )
                    .reachable()
                })
                .collect()
        };
        let before = verdicts(&self.fresh_policies(cluster, &involved).await?);
        for (t, allows) in targets.iter_mut().zip(&before) {
            t.policy_allows = *allows;
        }
        self.remove_probe_pods(tenant, Some(traffic::PROBE)).await?;
        let api = self.pods(&tenant.namespace);
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..Default::default()
        };
        let created = api
            .create(&pp, &traffic::probe_pod(tc, tenant, &targets))
            .await
            .map_err(|e| not_found_as_config(e, &tenant.namespace))?;
        let name = created.name_any();
        let outcome = self.probe_report(&api, &name, tc.probe_deadline()).await;
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        match api.delete(&name, &dp).await {
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let report = match outcome? {
            Ok(r) => r,
            Err(why) => return Ok((traffic::Traffic::not_run(why, skipped), Vec::new())),
        };
        let after = verdicts(&self.fresh_policies(cluster, &involved).await?);
        for (t, (b, a)) in targets.iter_mut().zip(before.iter().zip(&after)) {
            t.policy_stable = b == a;
        }
        match traffic::parse_report(&report, &targets) {
            Ok(answers) => {
                let (paths, probes) = traffic::judge(&targets, &answers);
                Ok((
                    traffic::Traffic {
                        paths,
                        not_run: None,
                        skipped,
                    },
                    probes,
                ))
            }
            Err(e) => Ok((
                traffic::Traffic::not_run(format!("the probe's report is unusable: {e}"), skipped),
                Vec::new(),
            )),
        }
    }

    /// `base` (the pass's view) with the policies of `namespaces` read again. Cloning a view
    /// copies only its own reads; the cached cluster under it stays shared.
    async fn fresh_policies(
        &self,
        base: &Cluster,
        namespaces: &std::collections::BTreeSet<String>,
    ) -> Result<Cluster, LayerError> {
        let mut view = base.clone();
        for ns in namespaces {
            view.replace_policies(ns, &list_all(&self.policies(ns), "").await?);
        }
        Ok(view)
    }

    /// Waits for the probe Pod to finish and returns its termination message; `Err` says why
    /// there is none.
    async fn probe_report(
        &self,
        api: &Api<Pod>,
        name: &str,
        limit: Duration,
    ) -> Result<Result<String, String>, LayerError> {
        let deadline = Instant::now() + limit;
        loop {
            let Some(p) = api.get_opt(name).await? else {
                return Ok(Err(format!(
                    "the probe Pod {name} was deleted before it finished"
                )));
            };
            let terminated = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.terminated.clone());
            if let Some(t) = terminated {
                return Ok(match (t.exit_code, t.message) {
                    (0, Some(m)) if !m.trim().is_empty() => Ok(m),
                    (code, m) => Err(format!(
                        "the probe Pod {name} ended with exit code {code}{}",
                        m.map(|m| format!(": {}", m.chars().take(200).collect::<String>()))
                            .unwrap_or_default()
                    )),
                });
            }
            if matches!(pod_phase(&p), "Failed" | "Succeeded") || Instant::now() >= deadline {
                let mut why = format!(
                    "the probe Pod {name} gave no report in {} s (phase {}",
                    limit.as_secs(),
                    pod_phase(&p)
                );
                if let Some(w) = waiting_reason(&p) {
                    why.push_str(&format!(", {w}"));
                }
                why.push(')');
                return Ok(Err(why));
            }
            tokio::time::sleep(POD_POLL).await;
        }
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

/// A NetworkPolicy as the cluster-wide read keeps it: its name, namespace and spec. Everything
/// else, managed fields above all, is skipped while parsing instead of being built and dropped.
#[derive(serde::Deserialize)]
struct ListedPolicy {
    metadata: ListedMeta,
    #[serde(default)]
    spec: Option<k8s_openapi::api::networking::v1::NetworkPolicySpec>,
}

#[derive(serde::Deserialize)]
struct ListedMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(serde::Deserialize)]
struct ListedPolicies {
    #[serde(default)]
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta,
    #[serde(default)]
    items: Vec<ListedPolicy>,
}

impl From<ListedPolicy> for NetworkPolicy {
    fn from(p: ListedPolicy) -> Self {
        NetworkPolicy {
            metadata: kube::api::ObjectMeta {
                name: p.metadata.name,
                namespace: p.metadata.namespace,
                ..Default::default()
            },
            spec: p.spec,
        }
    }
}

/// Every NetworkPolicy of the cluster, page by page, keeping only what the evaluator reads.
async fn list_policies_everywhere(client: &kube::Client) -> Result<Vec<NetworkPolicy>, LayerError> {
    let request = kube::core::Request::new(NetworkPolicy::url_path(&(), None));
    let mut out = Vec::new();
    let mut lp = ListParams::default().limit(PAGE);
    loop {
        let req = request
            .list(&lp)
            .map_err(|e| LayerError::Backend(format!("list NetworkPolicies: {e}")))?;
        let page: ListedPolicies = client.request(req).await?;
        out.extend(page.items.into_iter().map(NetworkPolicy::from));
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
        match &self.config.traffic {
            Some(tc) => self.ensure_canary(tc, tenant).await?,
            // Switched off (or never on): no canary of the organization stays behind.
            None => self.remove_probe_pods(tenant, None).await?,
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
        if let Some(tc) = &self.config.traffic {
            let (traffic, mut probes) = self.traffic(tc, tenant, &cluster).await?;
            v.probes.append(&mut probes);
            v.traffic = Some(traffic);
        }
        Ok(v)
    }

    async fn cleanup(&self, tenant: &Tenant) -> Result<(), LayerError> {
        self.applied
            .lock()
            .map_err(|_| poisoned())?
            .remove(&tenant.owner.uid);
        // Pods before policies: no canary runs unprotected, even for a moment.
        self.remove_probe_pods(tenant, None).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_policy_keeps_name_namespace_and_spec_and_parses_like_the_full_object() {
        let full = serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {
                "name": "allow-web", "namespace": "team-a", "uid": "u1", "resourceVersion": "7",
                "labels": {"a": "b"}, "annotations": {"note": "x"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                   "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:spec": {"f:podSelector": {}}}}]
            },
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["front"]}]}}],
                    "ports": [{"port": 8080, "protocol": "TCP"}]}]
            }
        });
        let list = serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicyList",
            "metadata": {"resourceVersion": "9", "continue": "next-page"},
            "items": [full.clone(), {"metadata": {"name": "no-spec", "namespace": "team-b"}}]
        });
        let page: ListedPolicies = serde_json::from_value(list).unwrap();
        assert_eq!(page.metadata.continue_.as_deref(), Some("next-page"));
        let listed: Vec<NetworkPolicy> = page.items.into_iter().map(NetworkPolicy::from).collect();
        let whole: NetworkPolicy = serde_json::from_value(full).unwrap();
        assert_eq!(listed[0].spec, whole.spec);
        assert_eq!(listed[0].metadata.name.as_deref(), Some("allow-web"));
        assert_eq!(listed[0].metadata.namespace.as_deref(), Some("team-a"));
        assert!(listed[0].metadata.managed_fields.is_none());
        assert!(listed[1].spec.is_none());
        // The evaluator reads both alike.
        let from_listed = Cluster::new(Vec::new(), &listed[..1]);
        let from_whole = Cluster::new(Vec::new(), std::slice::from_ref(&whole));
        assert_eq!(format!("{from_listed:?}"), format!("{from_whole:?}"));
    }
}
