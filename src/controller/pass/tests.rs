//! Unit tests of the pure stages: no server, no I/O.

use std::collections::BTreeMap;

use super::*;
use crate::api::DeletionPolicy;
use crate::layers::{ErrorClass, Probe, Verification};

fn org(name: &str, annotations: &[(&str, &str)]) -> Arc<Organization> {
    let mut o: Organization = serde_json::from_value(serde_json::json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization",
        "metadata": { "name": name, "uid": format!("uid-{name}"), "generation": 3 },
        "spec": { "orgId": name, "deletionPolicy": "Delete" }
    }))
    .unwrap();
    o.metadata.annotations = Some(
        annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    Arc::new(o)
}

fn platform() -> IsolationPlatform {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform",
        "metadata": { "name": "default" },
        "spec": { "network": { "namespaceTemplate": "org-{orgId}" } }
    }))
    .unwrap()
}

fn resolved(o: Arc<Organization>) -> Resolved {
    resolve_with(o, platform(), vec![OrgId::sentinel()]).unwrap()
}

#[test]
fn resolve_builds_one_tenant_from_spec_platform_and_owner() {
    let r = resolved(org("acme", &[]));
    assert_eq!(r.tenant.name, "acme");
    assert_eq!(r.tenant.namespace, "org-acme");
    assert_eq!(
        r.tenant.display_name, "acme",
        "display name defaults to the org id"
    );
    assert_eq!(r.tenant.owner.uid, "uid-acme");
    assert_eq!(r.tenant.deletion_policy, DeletionPolicy::Delete);
    assert_eq!(r.tenant.adopt_from, None);
    assert!(!r.rotation.due && !r.tenant.rotate);
    assert_eq!(r.recorded_namespace(), "org-acme");
}

#[test]
fn resolve_refuses_an_invalid_org_id() {
    let mut o = (*org("acme", &[])).clone();
    o.spec.org_id = "Not Valid*".into();
    let err = resolve_with(Arc::new(o), platform(), vec![]).unwrap_err();
    assert_eq!(err.reason(), "InvalidSpec");
    assert!(
        Blocked::PlatformNotFound("p".into())
            .message()
            .contains("\"p\"")
    );
}

#[test]
fn rotation_is_due_only_for_a_new_annotation_value() {
    let r = resolved(org("acme", &[(ROTATE_ANNOTATION, "1")]));
    assert!(r.rotation.due && r.tenant.rotate);
    let mut o = (*org("acme", &[(ROTATE_ANNOTATION, "1")])).clone();
    o.status = Some(OrganizationStatus {
        rotation: Some("1".into()),
        ..Default::default()
    });
    let r = resolved(Arc::new(o));
    assert!(!r.rotation.due, "the same value was already carried out");
}

#[test]
fn adoption_comes_only_from_the_annotation() {
    let r = resolved(org("acme", &[(ADOPT_ANNOTATION, " old-uid ")]));
    assert_eq!(r.tenant.adopt_from.as_deref(), Some("old-uid"));
    let r = resolved(org("acme", &[(ADOPT_ANNOTATION, "  ")]));
    assert_eq!(
        r.tenant.adopt_from, None,
        "an empty annotation adopts nothing"
    );
}

#[test]
fn recorded_namespace_wins_for_cleanup() {
    let mut o = (*org("acme", &[])).clone();
    o.status = Some(OrganizationStatus {
        namespace: Some("old-acme".into()),
        ..Default::default()
    });
    assert_eq!(resolved(Arc::new(o)).recorded_namespace(), "old-acme");
}

#[test]
fn peers_are_the_sentinel_and_the_next_org() {
    let id = |s: &str| OrgId::parse(s).unwrap();
    let all = vec![id("b"), id("a"), id("c"), id("b")];
    assert_eq!(
        peers_among(&id("b"), all.clone()),
        vec![OrgId::sentinel(), id("c")]
    );
    assert_eq!(
        peers_among(&id("c"), all.clone()),
        vec![OrgId::sentinel(), id("a")],
        "wraps around"
    );
    assert_eq!(
        peers_among(&id("a"), vec![id("a")]),
        vec![OrgId::sentinel()]
    );
}

fn loaded(missing: bool, tampered: bool) -> LoadedCredentials {
    let mut c = Credentials::default();
    c.set("K", "v");
    LoadedCredentials {
        credentials: c,
        missing,
        tampered,
    }
}

#[test]
fn an_edited_or_deleted_secret_forces_rotation() {
    assert!(secret_forces_rotation(&loaded(false, true), true).is_some());
    assert!(secret_forces_rotation(&loaded(true, false), true).is_some());
    assert_eq!(
        secret_forces_rotation(&loaded(true, false), false),
        None,
        "first write"
    );
    assert_eq!(secret_forces_rotation(&loaded(false, false), true), None);
    assert!(
        starting_credentials(&loaded(false, true))
            .entries()
            .is_empty(),
        "edited data is not trusted"
    );
    assert_eq!(
        starting_credentials(&loaded(false, false)).get("K"),
        Some("v")
    );
}

fn ids(db: Option<&str>) -> OrganizationIdentities {
    OrganizationIdentities {
        database_role: db.map(str::to_owned),
        ..Default::default()
    }
}

fn all_available() -> Availability {
    LayerKind::ALL.iter().map(|k| (*k, Ok(()))).collect()
}

#[test]
fn schedule_runs_enabled_layers_when_the_workspace_is_ready() {
    let s = schedule(&all_available(), |_| true, &ids(None), true);
    assert_eq!(s.run, LayerKind::ALL.to_vec());
    assert!(s.retire.is_empty() && s.settled.is_empty());
}

#[test]
fn schedule_settles_missing_broken_and_waiting_layers() {
    let mut a = all_available();
    a.remove(&LayerKind::Storage);
    a.insert(
        LayerKind::Cache,
        Err(BuildFailure {
            reason: "BackendUnreachable".into(),
            message: "redis down".into(),
            class: ErrorClass::Transient,
        }),
    );
    let s = schedule(&a, |_| true, &ids(None), false);
    assert!(s.run.is_empty());
    assert_eq!(s.settled[&LayerKind::Storage], LayerOutcome::NotConfigured);
    assert!(
        matches!(&s.settled[&LayerKind::Cache], LayerOutcome::Failed { reason, .. } if reason == "BackendUnreachable")
    );
    assert!(
        matches!(&s.settled[&LayerKind::Database], LayerOutcome::Failed { reason, .. } if reason == "WorkspaceNotReady")
    );
}

#[test]
fn a_switched_off_layer_with_a_recorded_identity_is_retired_once() {
    let off = |k: LayerKind| k != LayerKind::Database;
    let s = schedule(&all_available(), off, &ids(Some("bulkhead_org_acme")), true);
    assert_eq!(s.retire, vec![LayerKind::Database]);
    assert_eq!(s.settled[&LayerKind::Database], LayerOutcome::Disabled);
    assert!(!s.run.contains(&LayerKind::Database));
    // Once the identity is gone from status, nothing is left to retire.
    let s = schedule(&all_available(), off, &ids(None), true);
    assert!(s.retire.is_empty());
}

#[test]
fn merged_credentials_keep_each_layers_changes() {
    let base = Credentials::new(BTreeMap::from([
        ("A".into(), "1".into()),
        ("B".into(), "2".into()),
        ("D".into(), "4".into()),
    ]));
    let mut layer_a = base.clone();
    layer_a.set("A", "1b");
    let mut layer_c = base.clone();
    layer_c.set("C", "3");
    layer_c.remove("D");
    let mut merged = base.clone();
    merge_credentials(&base, &layer_a, &mut merged);
    merge_credentials(&base, &layer_c, &mut merged);
    assert_eq!(merged.get("A"), Some("1b"));
    assert_eq!(merged.get("B"), Some("2"));
    assert_eq!(merged.get("C"), Some("3"));
    assert_eq!(
        merged.get("D"),
        None,
        "a key a layer removed (retire) is removed"
    );
}

fn checked(passed: bool) -> LayerOutcome {
    LayerOutcome::Checked {
        verification: Verification {
            findings: vec![],
            probes: vec![Probe::new("GET other", passed, "NOPERM")],
            traffic: None,
        },
        probed_at: now(),
    }
}

fn report_with(outcomes: &[(LayerKind, LayerOutcome)]) -> PassReport {
    PassReport {
        outcomes: outcomes.iter().cloned().collect(),
        ..Default::default()
    }
}

#[test]
fn compose_status_records_rotation_and_adoption_only_when_everything_ensured() {
    let r = resolved(org(
        "acme",
        &[(ROTATE_ANNOTATION, "2"), (ADOPT_ANNOTATION, "old")],
    ));
    let intent = OrganizationStatus {
        identities: Some(ids(Some("bulkhead_org_acme"))),
        ..Default::default()
    };
    let ok = report_with(&[(LayerKind::Database, checked(true))]);
    let s = compose_status(&r, &intent, &Workspace::Ready, &ok, true, &now());
    assert_eq!(s.rotation.as_deref(), Some("2"));
    assert_eq!(s.adopted_from.as_deref(), Some("old"));
    assert_eq!(
        s.credentials_secret.as_deref(),
        Some(workspace::CREDENTIALS_SECRET)
    );
    assert_eq!(s.observed_generation, Some(3));
    let names: Vec<_> = milestones(&r.previous, &s)
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(names, vec!["CredentialsRotated", "RetainedDataAdopted"]);
    assert_eq!(s.credentials_renew_time, None, "nothing expires");
    assert!(!milestones(&r.previous, &s)[0].1.contains("STS"));
    // Temporary credentials: their renewal time is recorded, and the rotation says the old
    // session was not ended.
    let mut with_session = report_with(&[(LayerKind::Database, checked(true))]);
    with_session.renew_by = Some(at(5_000).0);
    let s = compose_status(&r, &intent, &Workspace::Ready, &with_session, true, &now());
    assert_eq!(s.credentials_renew_time, Some(at(5_000)));
    let rotated = &milestones(&r.previous, &s)[0];
    assert_eq!(rotated.0, "CredentialsRotated");
    assert!(rotated.1.contains("STS session") && rotated.1.contains("until it expires"));

    let failed = report_with(&[(
        LayerKind::Database,
        LayerOutcome::Failed {
            reason: "Refused".into(),
            message: "owned by another Organization".into(),
        },
    )]);
    let s = compose_status(&r, &intent, &Workspace::Ready, &failed, true, &now());
    assert_eq!(
        s.rotation, None,
        "a rotation is recorded only when every layer did it"
    );
    assert_eq!(s.adopted_from, None);
    assert!(milestones(&r.previous, &s).is_empty());
}

#[test]
fn compose_status_forgets_retired_identities() {
    let r = resolved(org("acme", &[]));
    let intent = OrganizationStatus {
        identities: Some(ids(Some("bulkhead_org_acme"))),
        ..Default::default()
    };
    let mut report = report_with(&[(LayerKind::Database, LayerOutcome::Disabled)]);
    report.retired.push(LayerKind::Database);
    let s = compose_status(&r, &intent, &Workspace::Ready, &report, true, &now());
    assert_eq!(s.identities.unwrap().database_role, None);
}

fn failure(class: ErrorClass) -> Failure {
    Failure {
        part: "cache",
        class,
        reason: "Whatever".into(),
    }
}

#[test]
fn without_failures_the_next_pass_is_the_verification_schedule() {
    assert_eq!(
        next_action(&[], 0, 0.5, 300, "acme", None),
        Action::requeue(verification_delay(300, "acme"))
    );
}

#[test]
fn credentials_due_for_renewal_bring_the_next_pass_forward() {
    let scheduled = verification_delay(300, "acme");
    assert_eq!(
        next_action(&[], 0, 0.5, 300, "acme", Some(Duration::from_secs(120))),
        Action::requeue(Duration::from_secs(120)),
        "renewal before the verification schedule"
    );
    assert_eq!(
        next_action(&[], 0, 0.5, 300, "acme", Some(Duration::from_secs(3000))),
        Action::requeue(scheduled),
        "the schedule comes first"
    );
    for class in [ErrorClass::Configuration, ErrorClass::Refused] {
        assert_eq!(
            next_action(
                &[failure(class)],
                7,
                0.5,
                86_400,
                "acme",
                Some(Duration::from_secs(90))
            ),
            Action::requeue(Duration::from_secs(90)),
            "a long interval never outlasts the credentials"
        );
    }
    let now = at(10_000);
    assert_eq!(
        renew_delay(Some(at(10_600).0), &now),
        Some(Duration::from_secs(600))
    );
    assert_eq!(
        renew_delay(Some(at(9_000).0), &now),
        Some(Duration::from_secs(1)),
        "overdue: at once, without spinning"
    );
    assert_eq!(renew_delay(None, &now), None);
}

#[test]
fn a_restart_renews_credentials_due_before_the_next_verification() {
    let mut s = verified_at(1_000);
    s.credentials_renew_time = Some(at(1_150));
    let r = with_status(org("acme", &[]), s.clone());
    assert_eq!(
        resume_delay(&r, 300, &at(1_100)),
        Some(Duration::from_secs(50)),
        "the renewal comes before the verification"
    );
    assert_eq!(
        resume_delay(&r, 300, &at(1_150)),
        None,
        "due now: run the pass"
    );
    assert_eq!(resume_delay(&r, 300, &at(1_200)), None, "overdue");
    s.credentials_renew_time = Some(at(5_000));
    assert_eq!(
        resume_delay(&with_status(org("acme", &[]), s), 300, &at(1_100)),
        Some(Duration::from_secs(200)),
        "a later renewal leaves the schedule alone"
    );
}

#[test]
fn transient_failures_back_off_exponentially_with_jitter() {
    let at = |attempts, jitter| {
        next_action(
            &[failure(ErrorClass::Transient)],
            attempts,
            jitter,
            300,
            "acme",
            Some(Duration::from_secs(1)),
        )
    };
    assert_eq!(at(1, 0.5), Action::requeue(Duration::from_secs(2)));
    assert_eq!(at(3, 0.5), Action::requeue(Duration::from_secs(8)));
    assert_eq!(
        at(3, 0.0),
        Action::requeue(Duration::from_secs_f64(6.4)),
        "-20%"
    );
    assert_eq!(
        at(3, 1.0),
        Action::requeue(Duration::from_secs_f64(9.6)),
        "+20%"
    );
    assert_eq!(
        at(40, 0.5),
        Action::requeue(Duration::from_secs(300)),
        "capped"
    );
    // One transient failure among configuration errors still retries soon.
    let mixed = [
        failure(ErrorClass::Configuration),
        failure(ErrorClass::Transient),
    ];
    assert_eq!(
        next_action(&mixed, 1, 0.5, 300, "acme", None),
        Action::requeue(Duration::from_secs(2))
    );
}

#[test]
fn configuration_errors_and_refusals_wait_for_the_schedule_not_a_retry_loop() {
    for class in [ErrorClass::Configuration, ErrorClass::Refused] {
        assert_eq!(
            next_action(&[failure(class)], 7, 0.5, 300, "acme", None),
            Action::requeue(verification_delay(300, "acme"))
        );
    }
}

#[test]
fn retry_delay_doubles_and_caps() {
    assert_eq!(retry_delay(0), Duration::from_secs(2));
    assert_eq!(retry_delay(1), Duration::from_secs(2));
    assert_eq!(retry_delay(2), Duration::from_secs(4));
    assert_eq!(retry_delay(5), Duration::from_secs(32));
    assert_eq!(retry_delay(u32::MAX), Duration::from_secs(300));
}

#[test]
fn a_build_failure_is_a_failure_of_its_layer_with_its_class() {
    let mut a = all_available();
    a.insert(
        LayerKind::Database,
        Err(BuildFailure {
            reason: "ConfigurationError".into(),
            message: "no such Secret".into(),
            class: ErrorClass::Configuration,
        }),
    );
    let s = schedule(&a, |_| true, &ids(None), true);
    assert_eq!(
        s.failures,
        vec![Failure {
            part: "database",
            class: ErrorClass::Configuration,
            reason: "ConfigurationError".into()
        }]
    );
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

fn verified_at(second: i64) -> OrganizationStatus {
    let at = Time(k8s_openapi::jiff::Timestamp::from_second(second).unwrap());
    OrganizationStatus {
        observed_generation: Some(3),
        conditions: vec![crate::api::Condition::new(
            "Ready",
            ConditionStatus::True,
            "Isolated",
            "ok",
        )],
        layers: vec![
            crate::api::LayerDetail {
                layer: "database".into(),
                last_probe_time: Some(at.clone()),
                ..Default::default()
            },
            crate::api::LayerDetail {
                layer: "network".into(),
                last_probe_time: Some(Time(
                    k8s_openapi::jiff::Timestamp::from_second(second + 5).unwrap(),
                )),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

fn with_status(o: Arc<Organization>, status: OrganizationStatus) -> Resolved {
    let mut o = (*o).clone();
    o.status = Some(status);
    resolved(Arc::new(o))
}

fn at(second: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(second).unwrap())
}

#[test]
fn a_restart_resumes_the_schedule_of_a_recently_verified_organization() {
    let r = with_status(org("acme", &[]), verified_at(1_000));
    assert_eq!(
        resume_delay(&r, 300, &at(1_100)),
        Some(Duration::from_secs(200)),
        "counted from the oldest probe"
    );
    assert_eq!(
        resume_delay(&r, 300, &at(1_300)),
        None,
        "a full interval old: probe now"
    );
}

#[test]
fn a_restart_works_on_anything_that_is_not_settled() {
    let mut s = verified_at(1_000);
    s.observed_generation = Some(2);
    assert_eq!(
        resume_delay(&with_status(org("acme", &[]), s), 300, &at(1_100)),
        None,
        "spec changed"
    );
    let mut s = verified_at(1_000);
    s.conditions[0].status = ConditionStatus::False;
    assert_eq!(
        resume_delay(&with_status(org("acme", &[]), s), 300, &at(1_100)),
        None,
        "not Ready"
    );
    let r = with_status(org("acme", &[(ROTATE_ANNOTATION, "9")]), verified_at(1_000));
    assert_eq!(resume_delay(&r, 300, &at(1_100)), None, "rotation due");
    let r = with_status(
        org("acme", &[(ADOPT_ANNOTATION, "old")]),
        verified_at(1_000),
    );
    assert_eq!(resume_delay(&r, 300, &at(1_100)), None, "adoption pending");
    let mut s = verified_at(1_000);
    s.layers.clear();
    assert_eq!(
        resume_delay(&with_status(org("acme", &[]), s), 300, &at(1_100)),
        None,
        "never probed"
    );
}
