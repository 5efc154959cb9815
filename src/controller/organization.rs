//! The Organization reconciler: the finalizer around the pass, `apply` as the sequence of
//! stages in [`super::pass`], `cleanup`, and the error policy.

use std::sync::Arc;

use json_patch::{AddOperation, PatchOperation, RemoveOperation, TestOperation};
use kube::api::{Api, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::context::{Context, now};
use super::pass::{self, Blocked, PassReport, Resolved};
use super::workspace;
use super::{Error, write_status};
use crate::api::condition::merge;
use crate::api::{
    ADOPT_ANNOTATION, ConditionStatus, DeletionPolicy, FIELD_MANAGER, FINALIZER, Organization,
    OrganizationStatus,
};
use crate::layers::{ErrorClass, LayerError};

/// One pass for one Organization: the finalizer decides between `apply` and `cleanup`.
pub(crate) async fn reconcile(
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
    let index = org.finalizers().iter().position(|f| f == FINALIZER);
    let action = match (org.metadata.deletion_timestamp.is_some(), index) {
        (false, Some(_)) => apply(org, &ctx).await?,
        (false, None) => {
            // The finalizer goes on before anything external exists; its write starts the pass.
            add_finalizer(&api, &org).await?;
            Action::await_change()
        }
        (true, Some(i)) => {
            // A deletion may already be finished by an earlier pass queued behind this one.
            if api.get_opt(&org.name_any()).await?.is_none() {
                return Ok(Action::await_change());
            }
            cleanup(org.clone(), &ctx).await?;
            remove_finalizer(&api, &org, i).await?;
            Action::await_change()
        }
        (true, None) => Action::await_change(),
    };
    ctx.failures.lock().await.remove(&guard.name_any());
    Ok(action)
}

fn finalizer_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

/// A JSON pointer into the object's finalizer list: `/metadata/finalizers[/last]`.
fn pointer(last: Option<&str>) -> json_patch::jsonptr::PointerBuf {
    let mut tokens = vec!["metadata", "finalizers"];
    tokens.extend(last);
    json_patch::jsonptr::PointerBuf::from_tokens(tokens)
}

/// Adds the finalizer, failing (and retrying) if anyone changed the list meanwhile.
async fn add_finalizer(api: &Api<Organization>, org: &Organization) -> Result<(), Error> {
    let ops = if org.finalizers().is_empty() {
        vec![
            PatchOperation::Test(TestOperation {
                path: pointer(None),
                value: serde_json::Value::Null,
            }),
            PatchOperation::Add(AddOperation {
                path: pointer(None),
                value: vec![FINALIZER].into(),
            }),
        ]
    } else {
        vec![
            PatchOperation::Test(TestOperation {
                path: pointer(None),
                value: org.finalizers().into(),
            }),
            PatchOperation::Add(AddOperation {
                path: pointer(Some("-")),
                value: FINALIZER.into(),
            }),
        ]
    };
    let patch: Patch<Organization> = Patch::Json(json_patch::Patch(ops));
    api.patch(&org.name_any(), &finalizer_params(), &patch)
        .await?;
    Ok(())
}

/// Removes the finalizer at `index`, failing if it is no longer there.
async fn remove_finalizer(
    api: &Api<Organization>,
    org: &Organization,
    index: usize,
) -> Result<(), Error> {
    let index = index.to_string();
    let patch: Patch<Organization> = Patch::Json(json_patch::Patch(vec![
        PatchOperation::Test(TestOperation {
            path: pointer(Some(&index)),
            value: FINALIZER.into(),
        }),
        PatchOperation::Remove(RemoveOperation {
            path: pointer(Some(&index)),
        }),
    ]));
    api.patch(&org.name_any(), &finalizer_params(), &patch)
        .await?;
    Ok(())
}

/// Retry policy: transient errors back off exponentially; configuration and refusals wait
/// longer, since only a change can fix them.
pub(crate) fn error_policy(
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
    let delay = match err.class() {
        ErrorClass::Transient => pass::retry_delay(attempts.unwrap_or(1)),
        ErrorClass::Configuration | ErrorClass::Refused => pass::retry_delay(u32::MAX),
    };
    tracing::warn!(organization = %name, error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// A status that says only why the organization cannot be worked on.
fn blocked_status(org: &Organization, blocked: &Blocked) -> OrganizationStatus {
    let previous = org.status.clone().unwrap_or_default();
    let fresh = vec![crate::api::Condition::new(
        "Ready",
        ConditionStatus::False,
        blocked.reason(),
        blocked.message(),
    )];
    OrganizationStatus {
        observed_generation: org.metadata.generation,
        conditions: merge(&previous.conditions, fresh, &now(), org.metadata.generation),
        ..previous
    }
}

/// The pass: each stage in order (see [`super::pass`]).
async fn apply(org: Arc<Organization>, ctx: &Context) -> Result<Action, Error> {
    let r = match pass::resolve(ctx, org.clone()).await? {
        Ok(r) => r,
        Err(blocked) => {
            write_status(ctx, &org, &blocked_status(&org, &blocked)).await?;
            return Ok(blocked.action());
        }
    };
    // An org id the namespace template cannot name is refused before anything is created.
    if let Err(m) =
        crate::tenant::render_namespace(&r.platform.spec.network.namespace_template, &r.org_id)
    {
        let blocked = Blocked::InvalidSpec(m);
        write_status(ctx, &org, &blocked_status(&org, &blocked)).await?;
        return Ok(blocked.action());
    }
    let interval = r.platform.spec.verification.interval_seconds;
    if ctx.first_pass(&r.tenant.name).await
        && let Some(wait) = pass::resume_delay(&r, interval, &now())
    {
        tracing::debug!(organization = %r.tenant.name, ?wait, "verified recently; schedule resumed");
        return Ok(Action::requeue(wait));
    }
    let rt = ctx.platforms.runtime(ctx, &r.platform).await;
    let intent = pass::record_intent(ctx, &r, &rt).await?;
    let opened = pass::open_workspace(ctx, &r).await;
    let tenant = crate::layers::Tenant {
        rotate: r.tenant.rotate || opened.forced_rotation.is_some(),
        ..r.tenant.clone()
    };
    let plan = pass::schedule(
        &pass::availability(&rt.layers),
        |k| pass::layer_enabled(&r.org, k),
        intent.identities.as_ref().unwrap_or(&Default::default()),
        matches!(opened.workspace, super::status::Workspace::Ready),
    );
    let mut report = PassReport {
        repairs: opened.repairs.iter().cloned().map(|x| (None, x)).collect(),
        outcomes: plan.settled.clone(),
        credentials: opened.credentials.clone(),
        ..PassReport::default()
    };
    report
        .repairs
        .extend(opened.forced_rotation.clone().map(|x| (None, x)));
    pass::ensure(&rt, &tenant, &plan, &mut report).await;
    pass::retire(&rt, &tenant, &plan, &mut report).await;
    let workspace = pass::publish_credentials(ctx, &r, &opened, &mut report).await;
    pass::verify(&rt, &tenant, &mut report).await;
    let status = pass::compose_status(
        &r,
        &intent,
        &workspace,
        &report,
        opened.secret.is_some(),
        &now(),
    );
    pass::report(ctx, &r, &report, &status).await;
    write_status(ctx, &org, &status).await?;
    log_pass(&r, &status);
    let mut failures = plan.failures.clone();
    failures.extend(opened.failure.map(|class| pass::Failure {
        part: "workspace",
        class,
        reason: "WorkspaceNotReady".into(),
    }));
    failures.extend(report.failures.iter().cloned());
    let attempts = count_failures(ctx, &r.tenant.name, &failures).await;
    Ok(pass::next_action(
        &failures,
        attempts,
        rand::random::<f64>(),
        r.platform.spec.verification.interval_seconds,
        &r.tenant.name,
        pass::renew_delay(report.renew_by, &now()),
    ))
}

/// Counts each failure in the metrics and as a consecutive failure of its part (per
/// organization and backend); a part that did not fail starts over. Returns the most
/// consecutive transient failures of any failing part.
async fn count_failures(ctx: &Context, name: &str, failures: &[pass::Failure]) -> u32 {
    for f in failures {
        ctx.metrics
            .layer_failures
            .get_or_create(&crate::telemetry::LayerFailureLabels {
                layer: f.part.to_owned(),
                reason: f.reason.clone(),
            })
            .inc();
    }
    let mut streaks = ctx.streaks.lock().await;
    streaks.retain(|(org, part), _| org != name || failures.iter().any(|f| f.part == *part));
    let mut most = 0;
    for f in failures.iter().filter(|f| f.class == ErrorClass::Transient) {
        let n = streaks.entry((name.to_owned(), f.part)).or_insert(0);
        *n = n.saturating_add(1);
        most = most.max(*n);
    }
    most
}

fn log_pass(r: &Resolved, status: &OrganizationStatus) {
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True);
    tracing::info!(organization = %r.tenant.name, org_id = %r.org_id, ready, "reconciled");
}

/// Removes the organization's isolation in every layer the platform configures (switched off
/// or not: the deletion policy governs data either way), then its namespace. Each layer touches
/// only what this Organization's UID owns.
async fn cleanup(org: Arc<Organization>, ctx: &Context) -> Result<(), Error> {
    let oref = org.object_ref(&());
    let r = match pass::resolve(ctx, org.clone()).await? {
        Ok(r) => r,
        Err(Blocked::InvalidSpec(_)) => return Ok(()),
        Err(Blocked::PlatformNotFound(p)) => {
            let note = format!(
                "IsolationPlatform {p:?} is gone; external identities of {} could not be removed",
                org.spec.org_id
            );
            ctx.publish_event(&oref, true, "CleanupSkipped", &note)
                .await;
            return Ok(());
        }
    };
    let rt = ctx.platforms.runtime(ctx, &r.platform).await;
    let tenant = crate::layers::Tenant {
        namespace: r.recorded_namespace(),
        peers: Vec::new(),
        ..r.tenant.clone()
    };
    for (kind, slot) in &rt.layers {
        let layer = slot.as_ref().map_err(|e| Error::Cleanup {
            layer: *kind,
            source: LayerError::Unreachable(e.to_string()),
        })?;
        layer
            .cleanup(&tenant)
            .await
            .map_err(|source| Error::Cleanup {
                layer: *kind,
                source,
            })?;
    }
    workspace::delete_namespace(ctx, &org, &tenant).await?;
    ctx.publish_event(&oref, false, "CleanedUp", &cleaned_up_note(&r))
        .await;
    tracing::info!(organization = %r.tenant.name, org_id = %r.org_id, "cleaned up");
    Ok(())
}

/// What cleanup says happened, and how retained data can be re-attached (pure).
pub fn cleaned_up_note(r: &Resolved) -> String {
    match r.org.spec.deletion_policy {
        DeletionPolicy::Delete => format!("isolation and data of {} removed (Delete)", r.org_id),
        DeletionPolicy::Retain => format!(
            "isolation of {} removed (Retain); its data stays owned by Organization UID {}: a new \
             Organization takes it over only with the annotation {ADOPT_ANNOTATION}={}",
            r.org_id, r.tenant.owner.uid, r.tenant.owner.uid
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retained_data_names_its_owner_and_the_way_to_adopt_it() {
        let org: Organization = serde_json::from_value(serde_json::json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization",
            "metadata": { "name": "acme", "uid": "1234-uid" },
            "spec": { "orgId": "acme", "deletionPolicy": "Retain" }
        }))
        .unwrap();
        let platform = serde_json::from_value(serde_json::json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform",
            "metadata": { "name": "default" }, "spec": {}
        }))
        .unwrap();
        let r = pass::resolve_with(Arc::new(org), platform, vec![]).unwrap();
        let note = cleaned_up_note(&r);
        assert!(note.contains("bulkhead.dev/adopt-from=1234-uid"), "{note}");
    }
}
