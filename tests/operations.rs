//! How bulkhead behaves under GitOps tools and with two replicas, on the testbed's API server.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead::api::{IsolationPlatform, Organization};
use common::{Operator, Testbed, install_crds, unique, wait_for};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

fn kubectl(args: &[&str]) -> std::process::Output {
    let tb = Testbed::get();
    Command::new(format!("{}/kubectl", tb.k8s_bin()))
        .args(args)
        .env("KUBECONFIG", tb.kubeconfig())
        .output()
        .expect("run kubectl")
}

async fn network_platform(client: &kube::Client, name: &str, prefix: &str) {
    let api: Api<IsolationPlatform> = Api::all(client.clone());
    let p: IsolationPlatform = serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform", "metadata": { "name": name },
        "spec": { "network": { "namespaceTemplate": format!("{prefix}-{{orgId}}") }, "verification": { "intervalSeconds": 30 } }
    }))
    .unwrap();
    api.create(&PostParams::default(), &p)
        .await
        .expect("platform");
}

fn is_ready(o: &Organization) -> bool {
    o.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && format!("{:?}", c.status) == "True")
    })
}

async fn wait_ready(api: &Api<Organization>, name: &str, timeout: Duration) -> Organization {
    wait_for(&format!("Organization {name} Ready"), timeout, || {
        let api = api.clone();
        let name = name.to_owned();
        async move { api.get(&name).await.ok().filter(is_ready) }
    })
    .await
}

#[tokio::test]
async fn gitops_apply_sees_no_diff_and_no_conflict() {
    let client = Testbed::get().kube().await;
    install_crds(&client).await;
    let platform = unique("gitops");
    let ns = unique("gitops-op");
    common::ensure_namespace(&client, &ns).await;
    network_platform(&client, &platform, &platform).await;
    let _operator = Operator::start(&platform, &ns);

    let name = unique("gitops-org");
    let manifest = std::env::temp_dir().join(format!("{name}.yaml"));
    std::fs::write(
        &manifest,
        serde_json::to_string(&json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization",
            "metadata": { "name": name, "labels": { "team": "sales" }, "annotations": { "owner": "gitops" } },
            "spec": { "orgId": name, "displayName": "GitOps Org", "platformRef": platform }
        }))
        .unwrap(),
    )
    .unwrap();
    let file = manifest.to_str().unwrap();
    let out = kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=gitops",
        "-f",
        file,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let api: Api<Organization> = Api::all(client.clone());
    let ready = wait_ready(&api, &name, Duration::from_secs(90)).await;
    let generation = ready.metadata.generation;

    let diff = kubectl(&[
        "diff",
        "--server-side",
        "--field-manager=gitops",
        "-f",
        file,
    ]);
    assert_eq!(
        diff.status.code(),
        Some(0),
        "kubectl diff shows changes:\n{}",
        String::from_utf8_lossy(&diff.stdout)
    );
    assert!(diff.stdout.is_empty());

    let again = kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=gitops",
        "-f",
        file,
    ]);
    assert!(
        again.status.success(),
        "second apply conflicted: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    let after = api.get(&name).await.unwrap();
    assert_eq!(
        after.metadata.generation, generation,
        "the re-apply changed the generation"
    );

    // The operator owns status (and its finalizer), never the user's spec, labels or annotations.
    for mf in after.metadata.managed_fields.unwrap_or_default() {
        if mf.manager.as_deref() == Some("gitops") {
            continue;
        }
        let fields = serde_json::to_string(&mf.fields_v1).unwrap();
        for user_owned in ["f:spec", "f:labels", "f:annotations"] {
            assert!(
                !fields.contains(user_owned),
                "manager {:?} owns {user_owned}: {fields}",
                mf.manager
            );
        }
    }

    api.delete(&name, &DeleteParams::default()).await.unwrap();
    common::wait_gone(&api, &name, Duration::from_secs(60)).await;
    let _ = std::fs::remove_file(&manifest);
    Api::<IsolationPlatform>::all(client.clone())
        .delete(&platform, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_standby_takes_over_when_the_leader_is_killed() {
    let client = Testbed::get().kube().await;
    install_crds(&client).await;
    let platform = unique("ha");
    let ns = unique("ha-op");
    common::ensure_namespace(&client, &ns).await;
    network_platform(&client, &platform, &platform).await;
    let lease_seconds = 6u64;
    let args = [
        "--leader-elect",
        "--lease-name",
        "bulkhead-ha",
        "--lease-seconds",
        "6",
    ];
    let mut first = Operator::start_with(&platform, &ns, &args);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = |leases: Api<Lease>| async move {
        leases
            .get_opt("bulkhead-ha")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    };
    let leader1 = wait_for("first leader", Duration::from_secs(30), || {
        holder(leases.clone())
    })
    .await;
    let mut second = Operator::start_with(&platform, &ns, &args);

    let api: Api<Organization> = Api::all(client.clone());
    let make = |name: &str| -> Organization {
        serde_json::from_value(json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization", "metadata": { "name": name },
            "spec": { "orgId": name, "platformRef": platform }
        }))
        .unwrap()
    };
    let a = unique("ha-a");
    api.create(&PostParams::default(), &make(&a)).await.unwrap();
    wait_ready(&api, &a, Duration::from_secs(90)).await;
    // Only the lease holder writes: the standby has reconciled nothing.
    assert!(second.alive());
    assert!(
        !second.log().contains("reconciled"),
        "the standby reconciled:\n{}",
        second.log()
    );
    // The leader logs its pass right after the status write the test saw.
    wait_for("the leader's log line", Duration::from_secs(10), || {
        let seen = first.log().contains("reconciled");
        async move { seen.then_some(()) }
    })
    .await;

    // SIGKILL the leader, then change things while nobody leads.
    first.kill();
    let killed_at = Instant::now();
    let burst: Vec<String> = (0..3).map(|_| unique("ha-burst")).collect();
    for name in &burst {
        api.create(&PostParams::default(), &make(name))
            .await
            .unwrap();
    }
    let leader2 = wait_for(
        "a new leader",
        Duration::from_secs(lease_seconds * 3),
        || {
            let leases = leases.clone();
            let leader1 = leader1.clone();
            async move { holder(leases).await.filter(|h| *h != leader1) }
        },
    )
    .await;
    let takeover = killed_at.elapsed();
    assert!(
        takeover <= Duration::from_secs(lease_seconds + 4),
        "takeover took {takeover:?}, lease duration is {lease_seconds}s"
    );
    for name in &burst {
        wait_ready(&api, name, Duration::from_secs(90)).await;
    }
    assert!(
        second.log().contains("leader lease taken"),
        "{}",
        second.log()
    );
    eprintln!("takeover by {leader2} after {takeover:?}");

    for name in burst.iter().chain([&a]) {
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in burst.iter().chain([&a]) {
        common::wait_gone(&api, name, Duration::from_secs(60)).await;
    }
    second.kill();
    Api::<IsolationPlatform>::all(client.clone())
        .delete(&platform, &DeleteParams::default())
        .await
        .unwrap();
}
