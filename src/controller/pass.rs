//! One Organization pass as named stages, each a function with typed input and output:
//!
//! 1. [`resolve`] → [`Resolved`] or [`Blocked`]
//! 2. [`record_intent`]: identities into status before they are created
//! 3. [`open_workspace`]: namespace and credentials Secret ([`secret_forces_rotation`] is pure)
//! 4. [`schedule`] (pure): which layers run, retire, or are settled
//! 5. [`ensure`] (and [`retire`] for layers switched off)
//! 6. [`publish_credentials`]: BYOK keys and the credentials Secret, in one write
//! 7. [`verify`]
//! 8. [`compose_status`] (pure)
//! 9. [`report`]: every Event and metric of the pass
//! 10. [`next_action`] (pure)
//!
//! A [`PassReport`] carries the results from stage to stage.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::context::{Context, now};
use super::platform::PlatformRuntime;
use super::status::{self, LayerOutcome, Workspace};
use super::workspace::{self, LoadedCredentials};
use super::{Error, write_status};
use crate::api::condition::{merge, transitions};
use crate::api::{
    ADOPT_ANNOTATION, ConditionStatus, IsolationPlatform, Organization, OrganizationIdentities,
    OrganizationStatus, ROTATE_ANNOTATION,
};
use crate::layers::{Credentials, ErrorClass, LayerError, LayerKind, LayerSlot, Repair, Tenant};
use crate::telemetry::{LayerLabels, ProbeLabels};
use crate::tenant::{OrgId, render_template};

/// Shortest and longest wait after a transient failure (doubling per consecutive failure).
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_LONGEST: Duration = Duration::from_secs(300);
/// Requeue while the IsolationPlatform is missing.
const RETRY_WITHOUT_PLATFORM: Duration = Duration::from_secs(30);

/// The rotate annotation as found, and whether it asks for a rotation not yet carried out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rotation {
    pub requested: Option<String>,
    pub due: bool,
}

/// Everything a pass knows before it touches a backend.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub org: Arc<Organization>,
    pub org_id: OrgId,
    pub platform: IsolationPlatform,
    /// The organization as the layers see it; `rotate` is the annotation's request only.
    pub tenant: Tenant,
    pub previous: OrganizationStatus,
    pub rotation: Rotation,
}

impl Resolved {
    /// The namespace recorded in status (where the organization's objects are), else the
    /// platform's template. Cleanup and the CLI look there.
    pub fn recorded_namespace(&self) -> String {
        self.previous
            .namespace
            .clone()
            .unwrap_or_else(|| self.tenant.namespace.clone())
    }
}

/// Why an Organization cannot be worked on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// The spec is invalid (the CRD refuses these; objects from before validation get this).
    InvalidSpec(String),
    /// The IsolationPlatform it names does not exist.
    PlatformNotFound(String),
}

impl Blocked {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::PlatformNotFound(_) => "PlatformNotFound",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::InvalidSpec(m) => m.clone(),
            Self::PlatformNotFound(p) => format!("IsolationPlatform {p:?} not found"),
        }
    }

    /// When to look again: an invalid spec waits for a change, a missing platform is polled.
    pub fn action(&self) -> Action {
        match self {
            Self::InvalidSpec(_) => Action::await_change(),
            Self::PlatformNotFound(_) => Action::requeue(RETRY_WITHOUT_PLATFORM),
        }
    }
}

/// The owner reference that every object created for `org` carries; its UID is the owner that
/// every external identity records.
pub fn owner_reference(org: &Organization) -> OwnerReference {
    OwnerReference {
        api_version: "bulkhead.dev/v1alpha1".into(),
        kind: "Organization".into(),
        name: org.name_any(),
        uid: org.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Stage 1, pure part: the Organization and its platform as one typed value. The CLI, `apply`
/// and `cleanup` all build their `Tenant` here.
pub fn resolve_with(
    org: Arc<Organization>,
    platform: IsolationPlatform,
    peers: Vec<OrgId>,
) -> Result<Resolved, Blocked> {
    let org_id = OrgId::parse(&org.spec.org_id).map_err(|e| Blocked::InvalidSpec(e.to_string()))?;
    let previous = org.status.clone().unwrap_or_default();
    let requested = org.annotations().get(ROTATE_ANNOTATION).cloned();
    let rotation = Rotation {
        due: requested.is_some() && requested != previous.rotation,
        requested,
    };
    let adopt_from = org
        .annotations()
        .get(ADOPT_ANNOTATION)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty());
    let tenant = Tenant {
        name: org.name_any(),
        org_id: org_id.clone(),
        display_name: org
            .spec
            .display_name
            .clone()
            .unwrap_or_else(|| org_id.to_string()),
        namespace: render_template(&platform.spec.network.namespace_template, &org_id),
        deletion_policy: org.spec.deletion_policy,
        rotate: rotation.due,
        peers,
        owner: owner_reference(&org),
        adopt_from,
        resource_quota: org.spec.network.resource_quota.clone(),
        limit_range: org.spec.network.limit_range.clone(),
    };
    Ok(Resolved {
        org,
        org_id,
        platform,
        tenant,
        previous,
        rotation,
    })
}

/// Stage 1: loads the platform and resolves the Organization against it.
pub async fn resolve(
    ctx: &Context,
    org: Arc<Organization>,
) -> Result<Result<Resolved, Blocked>, Error> {
    if let Err(e) = OrgId::parse(&org.spec.org_id) {
        return Ok(Err(Blocked::InvalidSpec(e.to_string())));
    }
    let api: kube::Api<IsolationPlatform> = kube::Api::all(ctx.client.clone());
    let Some(platform) = api.get_opt(&org.spec.platform_ref).await? else {
        return Ok(Err(Blocked::PlatformNotFound(
            org.spec.platform_ref.clone(),
        )));
    };
    let peers = OrgId::parse(&org.spec.org_id)
        .map(|me| peers(ctx, &org, &me))
        .unwrap_or_default();
    Ok(resolve_with(org, platform, peers))
}

/// Other organizations whose canaries this one's probes attack: the sentinel, then the next
/// organization of the same platform by org id (so every pair is eventually exercised).
fn peers(ctx: &Context, org: &Organization, me: &OrgId) -> Vec<OrgId> {
    peers_among(me, ctx.live_org_ids(&org.spec.platform_ref))
}

/// The sentinel, then the next org id after `me` among `ids` (wrapping around).
pub fn peers_among(me: &OrgId, mut ids: Vec<OrgId>) -> Vec<OrgId> {
    ids.retain(|id| id != me);
    ids.sort();
    ids.dedup();
    let mut out = vec![OrgId::sentinel()];
    if let Some(next) = ids.iter().find(|id| *id > me).or_else(|| ids.first()) {
        out.push(next.clone());
    }
    out
}

/// Whether the Organization switched `kind` on.
pub fn layer_enabled(org: &Organization, kind: LayerKind) -> bool {
    match kind {
        LayerKind::Database => org.spec.database.enabled,
        LayerKind::Storage => org.spec.storage.enabled,
        LayerKind::Cache => org.spec.cache.enabled,
        LayerKind::Network => org.spec.network.enabled,
    }
}

fn identity_slot(ids: &mut OrganizationIdentities, kind: LayerKind) -> Option<&mut Option<String>> {
    match kind {
        LayerKind::Database => Some(&mut ids.database_role),
        LayerKind::Storage => Some(&mut ids.storage_principal),
        LayerKind::Cache => Some(&mut ids.cache_user),
        LayerKind::Network => None,
    }
}

fn recorded_identity(ids: &OrganizationIdentities, kind: LayerKind) -> Option<&String> {
    match kind {
        LayerKind::Database => ids.database_role.as_ref(),
        LayerKind::Storage => ids.storage_principal.as_ref(),
        LayerKind::Cache => ids.cache_user.as_ref(),
        LayerKind::Network => None,
    }
}

/// Identities to record before any is created (pure). An enabled layer's identity is derived
/// from the org id; a switched-off or unbuildable layer keeps what was recorded, so a pending
/// retirement or cleanup still finds it after a crash.
pub fn intended_identities(
    layers: &BTreeMap<LayerKind, LayerSlot>,
    enabled: impl Fn(LayerKind) -> bool,
    org_id: &OrgId,
    previous: &OrganizationIdentities,
) -> OrganizationIdentities {
    let mut out = OrganizationIdentities::default();
    for kind in LayerKind::ALL {
        let derived = match layers.get(&kind) {
            Some(Ok(layer)) if enabled(kind) => layer.identity(org_id),
            Some(_) => recorded_identity(previous, kind).cloned(),
            None => None,
        };
        if let Some(slot) = identity_slot(&mut out, kind) {
            *slot = derived;
        }
    }
    out
}

/// Stage 2: writes the namespace and the identities into status before anything is created.
pub async fn record_intent(
    ctx: &Context,
    r: &Resolved,
    rt: &PlatformRuntime,
) -> Result<OrganizationStatus, Error> {
    let previous_ids = r.previous.identities.clone().unwrap_or_default();
    let identities = intended_identities(
        &rt.layers,
        |k| layer_enabled(&r.org, k),
        &r.org_id,
        &previous_ids,
    );
    let status = OrganizationStatus {
        namespace: Some(r.tenant.namespace.clone()),
        identities: Some(identities),
        ..r.previous.clone()
    };
    if status != r.previous {
        write_status(ctx, &r.org, &status).await?;
    }
    Ok(status)
}

/// What stage 3 found: the workspace's state and the credentials the layers start from.
#[derive(Clone, Debug)]
pub struct Opened {
    pub workspace: Workspace,
    pub credentials: Credentials,
    pub secret: Option<LoadedCredentials>,
    /// Set when the Secret was edited or deleted behind bulkhead's back.
    pub forced_rotation: Option<Repair>,
    pub repairs: Vec<Repair>,
    /// The class of the error that failed the workspace, if one did.
    pub failure: Option<ErrorClass>,
}

/// The rule "an edited or deleted Secret means rotate" (pure): the repair to report, if any.
pub fn secret_forces_rotation(loaded: &LoadedCredentials, had_secret: bool) -> Option<Repair> {
    if loaded.tampered {
        Some(Repair(
            "credentials Secret was edited outside bulkhead; every credential is rotated".into(),
        ))
    } else if loaded.missing && had_secret {
        Some(Repair(
            "credentials Secret was deleted; it is written again with new credentials".into(),
        ))
    } else {
        None
    }
}

/// The credentials the layers start from (pure): an edited Secret is not trusted.
pub fn starting_credentials(loaded: &LoadedCredentials) -> Credentials {
    if loaded.tampered {
        Credentials::default()
    } else {
        loaded.credentials.clone()
    }
}

fn failed_workspace(e: &LayerError) -> Workspace {
    Workspace::Failed {
        reason: e.reason().to_owned(),
        message: e.to_string(),
    }
}

/// Stage 3: the namespace (created or repaired) and the credentials Secret as found.
pub async fn open_workspace(ctx: &Context, r: &Resolved) -> Opened {
    let failed = |e: &LayerError| Opened {
        workspace: failed_workspace(e),
        credentials: Credentials::default(),
        secret: None,
        forced_rotation: None,
        repairs: Vec::new(),
        failure: Some(e.class()),
    };
    let existed = r.previous.namespace.is_some();
    let repairs = match workspace::ensure_namespace(ctx, &r.org, &r.tenant, existed).await {
        Ok(repairs) => repairs,
        Err(e) => return failed(&e),
    };
    match workspace::load_credentials_when_bound(ctx, &r.tenant).await {
        Ok(loaded) => Opened {
            workspace: Workspace::Ready,
            credentials: starting_credentials(&loaded),
            forced_rotation: secret_forces_rotation(
                &loaded,
                r.previous.credentials_secret.is_some(),
            ),
            secret: Some(loaded),
            repairs,
            failure: None,
        },
        Err(e) => Opened {
            repairs,
            ..failed(&e)
        },
    }
}

/// Why a layer could not be built.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildFailure {
    pub reason: String,
    pub message: String,
    pub class: ErrorClass,
}

/// Whether each configured layer could be built (pure data for [`schedule`]).
pub type Availability = BTreeMap<LayerKind, Result<(), BuildFailure>>;

pub fn availability(layers: &BTreeMap<LayerKind, LayerSlot>) -> Availability {
    layers
        .iter()
        .map(|(k, slot)| {
            let state = match slot {
                Ok(_) => Ok(()),
                Err(e) => Err(BuildFailure {
                    reason: e.reason().to_owned(),
                    message: e.to_string(),
                    class: e.class(),
                }),
            };
            (*k, state)
        })
        .collect()
}

/// Stage 4's answer: which layers are ensured, which retired, and the outcome of the rest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Schedule {
    pub run: Vec<LayerKind>,
    /// Switched off, with an identity still recorded: its identity is removed this pass.
    pub retire: Vec<LayerKind>,
    pub settled: BTreeMap<LayerKind, LayerOutcome>,
    /// Layers that could not be built.
    pub failures: Vec<Failure>,
}

/// One part of the pass (a layer, or `workspace`) that failed, and how to retry it.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub part: &'static str,
    pub class: ErrorClass,
    pub reason: String,
}

/// Stage 4 (pure): decides each layer's fate from what the platform built, the switches, the
/// recorded identities and the workspace.
pub fn schedule(
    available: &Availability,
    enabled: impl Fn(LayerKind) -> bool,
    identities: &OrganizationIdentities,
    workspace_ready: bool,
) -> Schedule {
    let mut s = Schedule::default();
    for kind in LayerKind::ALL {
        let outcome = match available.get(&kind) {
            None => LayerOutcome::NotConfigured,
            Some(Ok(())) if !enabled(kind) => {
                if recorded_identity(identities, kind).is_some() {
                    s.retire.push(kind);
                }
                LayerOutcome::Disabled
            }
            Some(_) if !enabled(kind) => LayerOutcome::Disabled,
            Some(Err(f)) => {
                s.failures.push(Failure {
                    part: kind.name(),
                    class: f.class,
                    reason: f.reason.clone(),
                });
                LayerOutcome::Failed {
                    reason: f.reason.clone(),
                    message: f.message.clone(),
                }
            }
            Some(Ok(())) if !workspace_ready => LayerOutcome::Failed {
                reason: "WorkspaceNotReady".into(),
                message: "waiting for the organization's namespace and credentials Secret".into(),
            },
            Some(Ok(())) => {
                s.run.push(kind);
                continue;
            }
        };
        s.settled.insert(kind, outcome);
    }
    s
}

/// Results carried from stage to stage.
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    pub repairs: Vec<(Option<LayerKind>, Repair)>,
    pub outcomes: BTreeMap<LayerKind, LayerOutcome>,
    /// Layers whose `ensure` succeeded: they are verified.
    pub ensured: Vec<LayerKind>,
    /// Layers switched off whose identity was removed this pass.
    pub retired: Vec<LayerKind>,
    pub credentials: Credentials,
    pub ai_providers: Vec<String>,
    /// Every part that failed this pass, with its error class: the retry policy's input.
    pub failures: Vec<Failure>,
    /// The earliest time a layer's temporary credentials written this pass must be replaced.
    pub renew_by: Option<Timestamp>,
}

impl PassReport {
    fn fail(&mut self, kind: LayerKind, e: &LayerError) {
        self.failures.push(Failure {
            part: kind.name(),
            class: e.class(),
            reason: e.reason().to_owned(),
        });
        self.outcomes.insert(
            kind,
            LayerOutcome::Failed {
                reason: e.reason().into(),
                message: e.to_string(),
            },
        );
    }

    /// Every layer and the workspace did their work.
    pub fn all_ensured(&self, workspace: &Workspace) -> bool {
        matches!(workspace, Workspace::Ready)
            && !self
                .outcomes
                .values()
                .any(|o| matches!(o, LayerOutcome::Failed { .. }))
    }
}

fn layer_of(
    rt: &PlatformRuntime,
    kind: LayerKind,
) -> Result<Arc<dyn crate::layers::Layer>, LayerError> {
    match rt.layers.get(&kind) {
        Some(Ok(l)) => Ok(l.clone()),
        Some(Err(e)) => Err(LayerError::Unreachable(e.to_string())),
        None => Err(LayerError::Config(format!(
            "the platform has no {kind} layer"
        ))),
    }
}

/// Stage 5: ensures every scheduled layer concurrently; one failing backend never hides the
/// others. Each layer starts from the same credentials and its changes are merged.
pub async fn ensure(
    rt: &PlatformRuntime,
    tenant: &Tenant,
    schedule: &Schedule,
    report: &mut PassReport,
) {
    let base = report.credentials.clone();
    let results = futures::future::join_all(schedule.run.iter().map(|kind| {
        let mut layer_creds = base.clone();
        async move {
            let layer = layer_of(rt, *kind)?;
            rt.ensure_prepared(*kind).await?;
            let repairs = layer.ensure(tenant, &mut layer_creds).await?;
            let renew_by = layer.renew_by(&layer_creds);
            Ok::<_, LayerError>((repairs, layer_creds, renew_by))
        }
    }))
    .await;
    for (kind, result) in schedule.run.iter().zip(results) {
        match result {
            Ok((repairs, layer_creds, renew_by)) => {
                report.renew_by = report.renew_by.into_iter().chain(renew_by).min();
                report
                    .repairs
                    .extend(repairs.into_iter().map(|r| (Some(*kind), r)));
                merge_credentials(&base, &layer_creds, &mut report.credentials);
                report.ensured.push(*kind);
            }
            Err(e) => {
                tracing::warn!(organization = %tenant.name, layer = %kind, error = %e, "ensure failed");
                report.fail(*kind, &e);
            }
        }
    }
}

/// Stage 5, for layers switched off: removes their identity and credentials, keeps the data.
pub async fn retire(
    rt: &PlatformRuntime,
    tenant: &Tenant,
    schedule: &Schedule,
    report: &mut PassReport,
) {
    for kind in &schedule.retire {
        let result = match layer_of(rt, *kind) {
            Ok(layer) => layer.retire(tenant, &mut report.credentials).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(repairs) => {
                report
                    .repairs
                    .extend(repairs.into_iter().map(|r| (Some(*kind), r)));
                report.retired.push(*kind);
            }
            Err(e) => {
                tracing::warn!(organization = %tenant.name, layer = %kind, error = %e, "retire failed");
                report.fail(*kind, &e);
            }
        }
    }
}

/// Takes into `merged` every key a layer changed relative to `base`.
pub fn merge_credentials(base: &Credentials, layer: &Credentials, merged: &mut Credentials) {
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

/// Stage 6: BYOK keys and the credentials Secret, in one write. Returns the workspace's state
/// after the write.
pub async fn publish_credentials(
    ctx: &Context,
    r: &Resolved,
    opened: &Opened,
    report: &mut PassReport,
) -> Workspace {
    let Some(loaded) = &opened.secret else {
        return opened.workspace.clone();
    };
    let mut workspace = opened.workspace.clone();
    match workspace::provider_keys(ctx, &r.org).await {
        Ok(keys) => {
            for (provider, key_name, value) in keys {
                report.ai_providers.push(provider);
                report.credentials.set(key_name, value);
            }
        }
        Err(e) => {
            report.failures.push(Failure {
                part: "workspace",
                class: e.class(),
                reason: e.reason().to_owned(),
            });
            workspace = Workspace::Failed {
                reason: e.reason().to_owned(),
                message: e.to_string(),
            }
        }
    }
    workspace::drop_stale_provider_keys(&r.org, &mut report.credentials);
    if let Err(e) = workspace::write_credentials(ctx, &r.tenant, loaded, &report.credentials).await
    {
        report.failures.push(Failure {
            part: "workspace",
            class: e.class(),
            reason: e.reason().to_owned(),
        });
        workspace = failed_workspace(&e);
    }
    workspace
}

/// Stage 7: verifies every ensured layer with the credentials just written.
pub async fn verify(rt: &PlatformRuntime, tenant: &Tenant, report: &mut PassReport) {
    let creds = &report.credentials;
    let results = futures::future::join_all(
        report
            .ensured
            .iter()
            .map(|kind| async move { layer_of(rt, *kind)?.verify(tenant, creds).await }),
    )
    .await;
    let probed_at = now();
    for (kind, result) in report.ensured.clone().into_iter().zip(results) {
        let outcome = match result {
            Ok(verification) => LayerOutcome::Checked {
                verification,
                probed_at: probed_at.clone(),
            },
            Err(e) => {
                report.fail(kind, &e);
                continue;
            }
        };
        report.outcomes.insert(kind, outcome);
    }
}

/// Stage 8 (pure): the new status from the working status (after stage 2) and the pass.
pub fn compose_status(
    r: &Resolved,
    intent: &OrganizationStatus,
    workspace: &Workspace,
    report: &PassReport,
    secret_written: bool,
    at: &Time,
) -> OrganizationStatus {
    let generation = r.org.metadata.generation;
    let mut status = intent.clone();
    let fresh = status::conditions(workspace, &report.outcomes);
    status.conditions = merge(&r.previous.conditions, fresh, at, generation);
    status.observed_generation = generation;
    status.layers = status::layer_details(&report.outcomes);
    status.credentials_secret = secret_written.then(|| workspace::CREDENTIALS_SECRET.to_owned());
    status.credentials_renew_time = report.renew_by.map(Time);
    status.ai_providers = report.ai_providers.clone();
    let all_ensured = report.all_ensured(workspace);
    if r.rotation.due && all_ensured {
        status.rotation = r.rotation.requested.clone();
    }
    if let (Some(from), true) = (&r.tenant.adopt_from, all_ensured) {
        status.adopted_from = Some(from.clone());
    }
    let mut ids = status.identities.clone().unwrap_or_default();
    for kind in &report.retired {
        if let Some(slot) = identity_slot(&mut ids, *kind) {
            *slot = None;
        }
    }
    status.identities = Some(ids);
    status
}

/// Stage 9: every Event and metric of the pass, in one place.
pub async fn report(ctx: &Context, r: &Resolved, pass: &PassReport, status: &OrganizationStatus) {
    let oref = r.org.object_ref(&());
    for outcome in pass.outcomes.iter() {
        if let (kind, LayerOutcome::Checked { verification, .. }) = outcome {
            for p in &verification.probes {
                let result = if p.passed { "passed" } else { "failed" };
                ctx.metrics
                    .probes
                    .get_or_create(&ProbeLabels {
                        layer: kind.name().into(),
                        result: result.into(),
                    })
                    .inc();
            }
        }
    }
    for (kind, repair) in &pass.repairs {
        let layer = kind.map(LayerKind::name).unwrap_or("workspace");
        ctx.metrics
            .repairs
            .get_or_create(&LayerLabels {
                layer: layer.into(),
            })
            .inc();
        tracing::info!(organization = %r.tenant.name, layer, repair = %repair.0, "drift repaired");
        ctx.publish_event(
            &oref,
            true,
            "DriftRepaired",
            &format!("{layer}: {}", repair.0),
        )
        .await;
    }
    for (reason, note) in milestones(&r.previous, status) {
        ctx.publish_event(&oref, false, reason, &note).await;
    }
    for (c, old) in transitions(&r.previous.conditions, &status.conditions) {
        let warning = c.status != ConditionStatus::True;
        let note = format!(
            "{} {:?} -> {:?} ({}): {}",
            c.type_, old, c.status, c.reason, c.message
        );
        let reason = format!("{}{}", c.type_, if warning { "Lost" } else { "Reached" });
        ctx.publish_event(&oref, warning, &reason, &note).await;
    }
}

/// Normal Events for what this pass completed (pure): a rotation, an adoption.
pub fn milestones(
    previous: &OrganizationStatus,
    status: &OrganizationStatus,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if status.rotation.is_some() && status.rotation != previous.rotation {
        let note = if status.credentials_renew_time.is_some() {
            // Storage `session` mode: STS sessions cannot be ended before they expire.
            "every layer's credentials were replaced and their old sessions ended, except the storage layer's STS session, which stays valid until it expires"
        } else {
            "every layer's credentials were replaced and their old sessions ended"
        };
        out.push(("CredentialsRotated", note.to_owned()));
    }
    if let Some(from) = status
        .adopted_from
        .as_ref()
        .filter(|_| status.adopted_from != previous.adopted_from)
    {
        out.push((
            "RetainedDataAdopted",
            format!(
                "the retained data of Organization UID {from} was re-attached to this Organization"
            ),
        ));
    }
    out
}

/// Stage 0, at the first pass of this process (pure): an Organization that was Ready, verified
/// less than one interval ago and asks for nothing new is not probed again; its next pass is
/// due when its last verification turns one interval old, or when its temporary credentials
/// are due for replacement (`credentialsRenewTime`), whichever comes first. So a restart
/// resumes the schedule instead of re-probing (and re-writing) everything at once.
pub fn resume_delay(r: &Resolved, interval_seconds: u32, now: &Time) -> Option<Duration> {
    let p = &r.previous;
    let ready = p
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True);
    let settled = p.observed_generation == r.org.metadata.generation
        && !r.rotation.due
        && r.tenant
            .adopt_from
            .as_ref()
            .is_none_or(|a| p.adopted_from.as_ref() == Some(a));
    if !ready || !settled {
        return None;
    }
    let oldest = p
        .layers
        .iter()
        .filter_map(|l| l.last_probe_time.as_ref())
        .min()?;
    let age = now.0.duration_since(oldest.0).as_secs_f64();
    let mut left = f64::from(interval_seconds) - age;
    if let Some(renew) = &p.credentials_renew_time {
        left = left.min(renew.0.duration_since(now.0).as_secs_f64());
    }
    (age >= 0.0 && left > 0.0).then(|| Duration::from_secs_f64(left))
}

/// How long until temporary credentials written this pass are due for replacement (pure); at
/// least one second, so a renewal already due runs at once without spinning.
pub fn renew_delay(renew_by: Option<Timestamp>, now: &Time) -> Option<Duration> {
    let left = renew_by?.duration_since(now.0).as_secs_f64();
    Some(Duration::from_secs_f64(left.max(1.0)))
}

/// Stage 10 (pure): the next pass. Without failures, the verification schedule, or sooner when
/// temporary credentials are due for replacement (`renew_in`). A transient
/// failure backs off exponentially from the part's consecutive failures (`attempts`), spread by
/// `jitter` in [0, 1) to ±20% so an outage does not bring every organization back on the same
/// beat. Configuration errors and refusals cannot heal by retrying: they wait for the schedule
/// (a change to the Organization starts a pass at once).
pub fn next_action(
    failures: &[Failure],
    attempts: u32,
    jitter: f64,
    interval_seconds: u32,
    name: &str,
    renew_in: Option<Duration>,
) -> Action {
    if failures.iter().any(|f| f.class == ErrorClass::Transient) {
        let base = retry_delay(attempts).as_secs_f64();
        let spread = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
        Action::requeue(Duration::from_secs_f64(base * spread))
    } else {
        let scheduled = verification_delay(interval_seconds, name);
        Action::requeue(renew_in.map_or(scheduled, |r| r.min(scheduled)))
    }
}

/// Exponential backoff without jitter: 2 s doubling per consecutive failure, at most 5 minutes.
pub fn retry_delay(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    RETRY_FIRST.saturating_mul(1u32 << exp).min(RETRY_LONGEST)
}

/// Next verification pass: the interval plus up to 10% spread by name, so thousands of
/// organizations do not probe in lockstep.
pub fn verification_delay(interval_seconds: u32, name: &str) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    let interval = u64::from(interval_seconds);
    let spread = interval / 10;
    Duration::from_secs(interval + if spread == 0 { 0 } else { h.finish() % spread })
}

#[cfg(test)]
#[path = "pass/tests.rs"]
mod tests;
