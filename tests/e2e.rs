//! End-to-end against the testbed's real API server: CEL validation of the CRDs, and an
//! Organization's whole life under a running operator.

mod common;

use std::time::Duration;

use bulkhead::api::{IsolationPlatform, Organization};
use common::{Operator, Testbed, install_crds, unique, wait_for};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn org(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({ "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization", "metadata": { "name": name }, "spec": spec })
}

async fn create_raw(
    client: &kube::Client,
    body: serde_json::Value,
) -> Result<Organization, kube::Error> {
    let api: Api<Organization> = Api::all(client.clone());
    let obj: Organization = match serde_json::from_value(body.clone()) {
        Ok(o) => o,
        // Bodies the Rust type cannot even hold (missing orgId) go through the dynamic API.
        Err(_) => {
            let ar = kube::discovery::ApiResource::erase::<Organization>(&());
            let dynapi: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &ar);
            let dynobj: kube::api::DynamicObject = serde_json::from_value(body).unwrap();
            return dynapi
                .create(&PostParams::default(), &dynobj)
                .await
                .map(|d| serde_json::from_value(serde_json::to_value(d).unwrap()).unwrap());
        }
    };
    api.create(&PostParams::default(), &obj).await
}

fn refusal(res: Result<Organization, kube::Error>) -> String {
    match res {
        Ok(o) => panic!(
            "the API server accepted an invalid Organization: {:?}",
            o.spec
        ),
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "expected 422 Invalid, got {s:?}");
            s.message
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[tokio::test]
async fn the_api_server_refuses_bad_organizations_with_clear_messages() {
    let client = Testbed::get().kube().await;
    install_crds(&client).await;
    let long = "a".repeat(64);
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (json!({}), "orgId"),
        (json!({ "orgId": "" }), "orgId"),
        (
            json!({ "orgId": "Acme" }),
            "lowercase letters, digits or '-'",
        ),
        (json!({ "orgId": "acme*" }), "no glob characters"),
        (json!({ "orgId": "ac?me" }), "no glob characters"),
        (json!({ "orgId": "a[b]" }), "no glob characters"),
        (json!({ "orgId": "a{b}" }), "no glob characters"),
        (json!({ "orgId": "a\\b" }), "no glob characters"),
        (json!({ "orgId": "a b" }), "no glob characters"),
        (json!({ "orgId": "o'brien" }), "no glob characters"),
        (
            json!({ "orgId": "-acme" }),
            "starting and ending with a letter or digit",
        ),
        (json!({ "orgId": long }), "63"),
        (json!({ "orgId": "bulkhead-sentinel" }), "reserved"),
        (
            json!({ "orgId": "acme", "deletionPolicy": "Shred" }),
            "Unsupported value",
        ),
    ];
    for (spec, want) in cases {
        let name = unique("bad");
        let msg = refusal(create_raw(&client, org(&name, spec.clone())).await);
        assert!(
            msg.contains(want),
            "spec {spec}: message {msg:?} does not mention {want:?}"
        );
    }

    // An orgId belongs to exactly one Organization: the one of the same name.
    let victim = unique("victim");
    let msg = refusal(
        create_raw(
            &client,
            org(&unique("squatter"), json!({ "orgId": victim })),
        )
        .await,
    );
    assert!(msg.contains("metadata.name must equal spec.orgId"), "{msg}");

    // orgId is immutable once set.
    let name = unique("immutable");
    create_raw(&client, org(&name, json!({ "orgId": name })))
        .await
        .expect("valid org");
    let api: Api<Organization> = Api::all(client.clone());
    let err = api
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "orgId": "other" } })),
        )
        .await
        .expect_err("orgId change must be refused");
    match err {
        kube::Error::Api(s) => assert!(s.message.contains("orgId is immutable"), "{}", s.message),
        e => panic!("unexpected error: {e}"),
    }
    api.delete(&name, &DeleteParams::default())
        .await
        .expect("delete");
}

fn condition(o: &Organization, t: &str) -> Option<(String, String)> {
    o.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (format!("{:?}", c.status), c.reason.clone()))
}

#[tokio::test]
async fn an_organization_gets_its_namespace_and_is_cleaned_up() {
    let client = Testbed::get().kube().await;
    install_crds(&client).await;
    let platform_name = unique("e2e-platform");
    let operator_ns = unique("e2e-operator");
    common::ensure_namespace(&client, &operator_ns).await;
    let platforms: Api<IsolationPlatform> = Api::all(client.clone());
    let platform: IsolationPlatform = serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform",
        "metadata": { "name": platform_name },
        "spec": { "network": { "namespaceTemplate": "e2e-{orgId}" }, "verification": { "intervalSeconds": 20 } }
    }))
    .unwrap();
    platforms
        .create(&PostParams::default(), &platform)
        .await
        .expect("platform");
    let mut operator = Operator::start(&platform_name, &operator_ns);

    let org_id = unique("acme");
    let api: Api<Organization> = Api::all(client.clone());
    let obj: Organization = serde_json::from_value(org(
        &org_id,
        json!({ "orgId": org_id, "displayName": "Acme \"Rockets\"; DROP TABLE x", "platformRef": platform_name }),
    ))
    .unwrap();
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create org");

    let ready = wait_for("Organization Ready", Duration::from_secs(90), || {
        let api = api.clone();
        let name = org_id.clone();
        async move {
            let o = api.get(&name).await.ok()?;
            (condition(&o, "Ready").map(|c| c.0) == Some("True".into())).then_some(o)
        }
    })
    .await;
    assert!(
        ready
            .metadata
            .finalizers
            .as_ref()
            .unwrap()
            .contains(&"bulkhead.dev/cleanup".to_owned())
    );
    let status = ready.status.clone().unwrap();
    assert_eq!(status.observed_generation, ready.metadata.generation);
    assert_eq!(condition(&ready, "NetworkIsolated").unwrap().0, "True");
    assert_eq!(
        condition(&ready, "DatabaseIsolated").unwrap().1,
        "NotConfigured",
        "unbuilt layers never look isolated"
    );
    assert_eq!(condition(&ready, "IsolationVerified").unwrap().0, "True");

    let ns_name = format!("e2e-{org_id}");
    assert_eq!(status.namespace.as_deref(), Some(ns_name.as_str()));
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = namespaces.get(&ns_name).await.expect("namespace");
    let labels = ns.metadata.labels.clone().unwrap();
    assert_eq!(labels["bulkhead.dev/org-id"], org_id);
    assert_eq!(labels["pod-security.kubernetes.io/enforce"], "restricted");
    let owner = &ns.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Organization", org_id.as_str())
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns_name);
    secrets
        .get("bulkhead-credentials")
        .await
        .expect("credentials Secret");

    // A status write must not trigger another pass: the status stays put between passes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rv = api.get(&org_id).await.unwrap().metadata.resource_version;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        api.get(&org_id).await.unwrap().metadata.resource_version,
        rv,
        "no reconcile storm"
    );

    // A removed label is repaired at once (the namespace is watched).
    namespaces
        .patch(
            &ns_name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "bulkhead.dev/org-id": null } } })),
        )
        .await
        .unwrap();
    wait_for("namespace label repaired", Duration::from_secs(30), || {
        let namespaces = namespaces.clone();
        let (ns_name, org_id) = (ns_name.clone(), org_id.clone());
        async move {
            let ns = namespaces.get(&ns_name).await.ok()?;
            (ns.metadata.labels?.get("bulkhead.dev/org-id") == Some(&org_id)).then_some(())
        }
    })
    .await;

    // Deleting the Organization removes its namespace, then the finalizer.
    api.delete(&org_id, &DeleteParams::default()).await.unwrap();
    common::wait_gone(&api, &org_id, Duration::from_secs(60)).await;
    let ns = namespaces.get_opt(&ns_name).await.unwrap();
    assert!(
        ns.is_none_or(|n| n.metadata.deletion_timestamp.is_some()),
        "namespace deleted or terminating"
    );
    assert!(
        operator.alive(),
        "operator kept running:\n{}",
        operator.log()
    );
    operator.kill();
    platforms
        .delete(&platform_name, &DeleteParams::default())
        .await
        .unwrap();
    namespaces
        .delete(&operator_ns, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn credentials_secret_edits_are_repaired_at_once_and_byok_sources_are_checked() {
    let client = Testbed::get().kube().await;
    install_crds(&client).await;
    let platform_name = unique("secrets-platform");
    let operator_ns = unique("secrets-operator");
    common::ensure_namespace(&client, &operator_ns).await;
    common::put_secret(
        &client,
        &operator_ns,
        "openai-source",
        &[("apiKey", "sk-source-value")],
    )
    .await;
    let platforms: Api<IsolationPlatform> = Api::all(client.clone());
    let platform: IsolationPlatform = serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform",
        "metadata": { "name": platform_name },
        // A long interval: only the watch on the Secret can bring the repair within the test's wait.
        "spec": { "network": { "namespaceTemplate": "sec-{orgId}" }, "verification": { "intervalSeconds": 3600 } }
    }))
    .unwrap();
    platforms
        .create(&PostParams::default(), &platform)
        .await
        .expect("platform");
    let operator = Operator::start_with(&platform_name, &operator_ns, &["--watch-secrets"]);

    // The operator serves its metrics and health endpoints.
    let base = operator.http_base().await;
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move { http.get(url).send().await.ok() }
    };
    let healthz = get("/healthz").await.expect("/healthz");
    assert!(healthz.status().is_success());

    let api: Api<Organization> = Api::all(client.clone());
    let good = unique("byok");
    let missing = unique("byok-missing");
    // A BYOK source serves only the organization it is marked for.
    common::label_secret(
        &client,
        &operator_ns,
        "openai-source",
        bulkhead::api::BYOK_LABEL,
        &good,
    )
    .await;
    for (name, secret) in [(&good, "openai-source"), (&missing, "no-such-secret")] {
        let o: Organization = serde_json::from_value(org(
            name,
            json!({ "orgId": name, "platformRef": platform_name,
                    "aiProviders": [{ "name": "openai", "secretRef": { "name": secret, "key": "apiKey" } }] }),
        ))
        .unwrap();
        api.create(&PostParams::default(), &o)
            .await
            .expect("create org");
    }
    wait_for("Organization Ready", Duration::from_secs(90), || {
        let api = api.clone();
        let name = good.clone();
        async move {
            let o = api.get(&name).await.ok()?;
            (condition(&o, "Ready").map(|c| c.0) == Some("True".into())).then_some(())
        }
    })
    .await;
    // A missing source Secret is a clear condition, not a silent gap.
    let (status, reason) = wait_for("CredentialsReady False", Duration::from_secs(60), || {
        let api = api.clone();
        let name = missing.clone();
        async move {
            condition(&api.get(&name).await.ok()?, "CredentialsReady").filter(|c| c.0 == "False")
        }
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "ConfigurationError")
    );
    let m = api.get(&missing).await.unwrap();
    let msg = m
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "CredentialsReady")
        .unwrap()
        .message;
    assert!(msg.contains("no-such-secret"), "{msg}");

    let readyz = get("/readyz").await.expect("/readyz");
    assert!(readyz.status().is_success());
    let metrics = get("/metrics")
        .await
        .expect("/metrics")
        .text()
        .await
        .unwrap();
    for want in [
        "bulkhead_reconciles_total{kind=\"organization\"}",
        "bulkhead_reconcile_duration_seconds",
        "bulkhead_probes_total",
    ] {
        assert!(metrics.contains(want), "/metrics lacks {want}:\n{metrics}");
    }

    // Someone edits the credentials Secret: it is repaired at once and an Event says so.
    let ns = format!("sec-{good}");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let read_key = |secrets: Api<Secret>| async move {
        let s = secrets.get("bulkhead-credentials").await.ok()?;
        s.data?
            .get("AI_OPENAI_API_KEY")
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
    };
    assert_eq!(
        read_key(secrets.clone()).await.as_deref(),
        Some("sk-source-value")
    );
    secrets
        .patch(
            "bulkhead-credentials",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "stringData": { "AI_OPENAI_API_KEY": "sk-tampered", "EXTRA": "x" } }),
            ),
        )
        .await
        .unwrap();
    wait_for(
        "credentials Secret repaired",
        Duration::from_secs(20),
        || {
            let secrets = secrets.clone();
            async move {
                let s = secrets.get("bulkhead-credentials").await.ok()?;
                let data = s.data?;
                let restored = data.get("AI_OPENAI_API_KEY").map(|v| v.0.as_slice())
                    == Some(b"sk-source-value".as_slice());
                (restored && !data.contains_key("EXTRA")).then_some(())
            }
        },
    )
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
    let repaired = wait_for("DriftRepaired event", Duration::from_secs(20), || {
        let events = events.clone();
        let good = good.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some("DriftRepaired")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(good.as_str())
            })
        }
    })
    .await;
    let note = repaired.note.unwrap_or_default();
    assert!(note.contains("edited"), "{note}");
    assert!(
        !note.contains("sk-"),
        "an Event carries key material: {note}"
    );
    assert!(
        !operator.log().contains("sk-source-value"),
        "the BYOK key reached the log"
    );

    for name in [&good, &missing] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in [&good, &missing] {
        common::wait_gone(&api, name, Duration::from_secs(60)).await;
    }
    drop(operator);
    platforms
        .delete(&platform_name, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_namespace_that_belongs_to_someone_else_is_refused_not_adopted() {
    let client = Testbed::get().kube().await;
    install_crds(&client).await;
    let platform_name = unique("conflict-platform");
    let operator_ns = unique("conflict-operator");
    common::ensure_namespace(&client, &operator_ns).await;
    let platforms: Api<IsolationPlatform> = Api::all(client.clone());
    let platform: IsolationPlatform = serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform",
        "metadata": { "name": platform_name },
        "spec": { "network": { "namespaceTemplate": "taken-{orgId}" } }
    }))
    .unwrap();
    platforms
        .create(&PostParams::default(), &platform)
        .await
        .expect("platform");

    let org_id = unique("squatted");
    let ns_name = format!("taken-{org_id}");
    common::ensure_namespace(&client, &ns_name).await;
    let _operator = Operator::start(&platform_name, &operator_ns);
    let api: Api<Organization> = Api::all(client.clone());
    let o: Organization = serde_json::from_value(org(
        &org_id,
        json!({ "orgId": org_id, "platformRef": platform_name }),
    ))
    .unwrap();
    api.create(&PostParams::default(), &o).await.unwrap();

    let (status, reason) = wait_for("CredentialsReady False", Duration::from_secs(60), || {
        let api = api.clone();
        let name = org_id.clone();
        async move {
            condition(&api.get(&name).await.ok()?, "CredentialsReady").filter(|c| c.0 == "False")
        }
    })
    .await;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Refused"));
    let o = api.get(&org_id).await.unwrap();
    let msg = o
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "CredentialsReady")
        .unwrap()
        .message;
    assert!(msg.contains("not adopted"), "{msg}");
    assert_eq!(
        condition(&api.get(&org_id).await.unwrap(), "Ready")
            .unwrap()
            .0,
        "False"
    );
    let ns = Api::<Namespace>::all(client.clone())
        .get(&ns_name)
        .await
        .unwrap();
    assert!(
        ns.metadata.owner_references.is_none(),
        "the namespace was adopted"
    );
    assert!(
        !ns.metadata
            .labels
            .unwrap_or_default()
            .contains_key("bulkhead.dev/org-id"),
        "the namespace was labelled"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns_name);
    assert!(
        secrets
            .get_opt("bulkhead-credentials")
            .await
            .unwrap()
            .is_none(),
        "credentials written into a foreign namespace"
    );

    // Deleting the Organization leaves the foreign namespace alone.
    api.delete(&org_id, &DeleteParams::default()).await.unwrap();
    common::wait_gone(&api, &org_id, Duration::from_secs(60)).await;
    let ns = Api::<Namespace>::all(client.clone())
        .get(&ns_name)
        .await
        .unwrap();
    assert!(
        ns.metadata.deletion_timestamp.is_none(),
        "the foreign namespace was deleted"
    );
    Api::<Namespace>::all(client.clone())
        .delete(&ns_name, &DeleteParams::default())
        .await
        .unwrap();
    platforms
        .delete(&platform_name, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_burst_of_organizations_converges_with_one_pass_each_and_drift_still_starts_one() {
    let client = Testbed::get().kube().await;
    install_crds(&client).await;
    let platform_name = unique("burst");
    // BULKHEAD_BURST_LAYERS=db-cache adds the database and cache layers (storage off), as in the
    // 200-organization storm once reported; the default is the network layer only.
    let with_backends = std::env::var("BULKHEAD_BURST_LAYERS").is_ok_and(|v| v == "db-cache");
    let operator_ns = if with_backends {
        common::FullPlatform::create(&client, &platform_name, 3600)
            .await
            .operator_ns
    } else {
        let operator_ns = unique("burst-operator");
        common::ensure_namespace(&client, &operator_ns).await;
        let platform: IsolationPlatform = serde_json::from_value(json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform",
            "metadata": { "name": platform_name },
            "spec": { "network": { "namespaceTemplate": format!("{platform_name}-{{orgId}}") }, "verification": { "intervalSeconds": 3600 } }
        }))
        .unwrap();
        Api::<IsolationPlatform>::all(client.clone())
            .create(&PostParams::default(), &platform)
            .await
            .expect("platform");
        operator_ns
    };
    let operator = Operator::start(&platform_name, &operator_ns);
    let api: Api<Organization> = Api::all(client.clone());
    // BULKHEAD_BURST_ORGS sets the burst's size (12 by default, kept small for the suite).
    let count: usize = std::env::var("BULKHEAD_BURST_ORGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let names: Vec<String> = (0..count)
        .map(|i| format!("{platform_name}-o{i}"))
        .collect();
    let started = std::time::Instant::now();
    for name in &names {
        let o: Organization = serde_json::from_value(org(
            name,
            json!({ "orgId": name, "platformRef": platform_name,
                    "storage": { "enabled": false }, "deletionPolicy": "Delete" }),
        ))
        .unwrap();
        api.create(&PostParams::default(), &o)
            .await
            .expect("create");
    }
    for name in &names {
        wait_for(
            "Organization Ready",
            Duration::from_secs(120 + count as u64),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let o = api.get(&name).await.ok()?;
                    (condition(&o, "Ready").map(|c| c.0) == Some("True".into())).then_some(())
                }
            },
        )
        .await;
    }
    println!("{count} Organizations Ready in {:?}", started.elapsed());
    // Whatever the passes wrote (namespaces, NetworkPolicies, status) must not start more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let passes = |log: &str, name: &str| {
        let needle = format!("reconciled organization={name} ");
        log.lines().filter(|l| l.contains(&needle)).count()
    };
    let log = operator.log();
    let counts: Vec<usize> = names.iter().map(|n| passes(&log, n)).collect();
    println!("passes per Organization from creation to Ready: {counts:?}");
    assert!(
        counts.iter().all(|&c| c == 1),
        "passes per Organization: {counts:?}"
    );

    // A change made by someone else still starts a pass, and it repairs.
    let victim = &names[0];
    let ns = format!("{platform_name}-{victim}");
    let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        Api::namespaced(client.clone(), &ns);
    policies
        .delete("bulkhead-default-deny", &DeleteParams::default())
        .await
        .expect("delete policy");
    wait_for("NetworkPolicy repaired", Duration::from_secs(30), || {
        let policies = policies.clone();
        async move {
            policies
                .get_opt("bulkhead-default-deny")
                .await
                .ok()?
                .map(|_| ())
        }
    })
    .await;
    // The pass logs when it ends, after the repair: wait for its line, then count.
    wait_for("the repairing pass", Duration::from_secs(30), || {
        let n = passes(&operator.log(), victim);
        async move { (n >= 2).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        passes(&operator.log(), victim),
        2,
        "one pass for the deletion"
    );

    // A restart with nothing changed resumes the schedule: no pass, no status write.
    drop(operator);
    let operator = Operator::start(&platform_name, &operator_ns);
    let base = operator.http_base().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = operator.log();
    let after_restart: usize = names.iter().map(|n| passes(&log, n)).sum();
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("/metrics")
        .text()
        .await
        .expect("metrics text");
    let patches = metrics
        .lines()
        .find(|l| l.starts_with("bulkhead_status_patches_total{kind=\"organization\"}"))
        .unwrap_or("none");
    // The restarted operator did look at the Organizations (and wrote nothing for them).
    assert!(
        metrics.contains("bulkhead_reconciles_total{kind=\"organization\"}"),
        "{metrics}"
    );
    println!("after a restart: {after_restart} passes, status patches: {patches}");
    assert_eq!(after_restart, 0, "a restart re-ran passes");
    assert_eq!(patches, "none", "a restart wrote status");

    for name in &names {
        api.delete(name, &DeleteParams::default()).await.ok();
    }
    for name in &names {
        common::wait_gone(&api, name, Duration::from_secs(60 + count as u64)).await;
    }
}
