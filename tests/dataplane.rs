//! Network isolation proved with real packets, on the testbed's real node (kubelet, containerd,
//! runc, the bridge CNI and kube-router as the NetworkPolicy enforcer; `BULKHEAD_TESTBED_NODE=1
//! testbed/up`). The operator runs with `network.trafficProbe`: a canary Pod in every
//! organization's namespace, and a probe Pod that tries TCP to another organization's canary,
//! its own canary, DNS and an egress target. Each packet is set beside the evaluator's verdict.
//!
//! Shown here, each by the packets themselves:
//! - pods of two organizations cannot reach each other, and same-namespace traffic works;
//! - a foreign allow-all policy opens the path, and the probe sees the packet go through;
//! - with the enforcer removed and every policy still in place, the packets go through while
//!   the evaluator says refused: `NetworkPolicyEnforced` turns False with `NotEnforced`.

mod common;

use std::process::Command;
use std::time::Duration;

use bulkhead::api::{IsolationPlatform, LayerDetail, Organization, TrafficPath};
use common::org::{conditions, is_true};
use common::{Operator, Testbed, install_crds, unique, wait_for};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// The node's variables, or a clear refusal: these tests never pass without real packets.
fn node() -> (String, String) {
    let tb = Testbed::get();
    let image = std::env::var("BULKHEAD_NETPROBE_IMAGE").unwrap_or_default();
    if std::env::var("BULKHEAD_NODE").is_err() || image.is_empty() {
        panic!(
            "the testbed has no node: start it with `BULKHEAD_TESTBED_NODE=1 testbed/up` \
             (scripts/test does); env file read from {:?}",
            std::env::var("BULKHEAD_TESTBED_DIR").unwrap_or_default()
        );
    }
    (image, tb.var("BULKHEAD_TESTBED_DIR").to_owned())
}

fn testbed_node(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/node");
    let out = Command::new(script)
        .args(args)
        .output()
        .expect("run testbed/node");
    assert!(
        out.status.success(),
        "testbed/node {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the enforcer again however the test ends.
struct EnforcerBack;
impl Drop for EnforcerBack {
    fn drop(&mut self) {
        testbed_node(&["enforcer", "start"]);
    }
}

/// A stand-in server Pod (the netprobe canary role) in `ns` with `labels`, listening on `port`.
async fn server(client: &Client, ns: &str, name: &str, labels: serde_json::Value, port: i32) {
    let (image, _) = node();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65534, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "server", "image": image, "imagePullPolicy": "Never",
                "args": ["listen", port.to_string()],
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": true},
                "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 2},
            }],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create stand-in server");
    // Ready before any Organization exists: a pass that finds no Ready target skips its path.
    wait_for(
        &format!("the stand-in {ns}/{name} Ready"),
        Duration::from_secs(120),
        || async {
            let p = pods.get_opt(name).await.ok().flatten()?;
            let ready = p
                .status?
                .conditions?
                .into_iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(())
        },
    )
    .await;
}

async fn namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    api.create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
}

fn network(o: &Organization) -> Option<LayerDetail> {
    o.status
        .as_ref()?
        .layers
        .iter()
        .find(|l| l.layer == "network")
        .cloned()
}

fn path<'a>(d: &'a LayerDetail, prefix: &str) -> Option<&'a TrafficPath> {
    d.traffic.iter().find(|p| p.path.starts_with(prefix))
}

fn condition(o: &Organization, t: &str) -> Option<(String, String)> {
    o.status
        .as_ref()?
        .conditions
        .iter()
        .find_map(|c| (c.type_ == t).then(|| (format!("{:?}", c.status), c.reason.clone())))
}

fn show(o: &Organization) -> String {
    format!(
        "{}\ntraffic: {:#?}",
        conditions(o),
        network(o).map(|d| d.traffic).unwrap_or_default()
    )
}

/// Waits until `check` holds for the Organization; the failure message shows its status.
async fn until(
    orgs: &Api<Organization>,
    name: &str,
    what: &str,
    secs: u64,
    check: impl Fn(&Organization) -> bool,
) -> Organization {
    let start = std::time::Instant::now();
    loop {
        let o = orgs.get(name).await.expect("get organization");
        if check(&o) {
            println!(
                "{name}: {what} after {:.1} s",
                start.elapsed().as_secs_f64()
            );
            return o;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            panic!("{name}: not {what} after {secs} s:\n{}", show(&o));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn allow_all(ns: &str) -> NetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "someone-allows-all", "namespace": ns},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{}]},
    }))
    .unwrap()
}

#[tokio::test]
async fn real_packets_prove_isolation_and_catch_a_dataplane_that_does_not_enforce() {
    let (image, _) = node();
    let tb = Testbed::get();
    let client = tb.kube().await;
    install_crds(&client).await;
    let tag = unique("dp");
    let (dns_ns, data_ns) = (format!("{tag}-dns"), format!("{tag}-data"));
    namespace(&client, &dns_ns).await;
    namespace(&client, &data_ns).await;
    // Stand-ins for the cluster DNS and a platform database, on the real node.
    server(&client, &dns_ns, "dns", json!({"k8s-app": "kube-dns"}), 53).await;
    server(
        &client,
        &data_ns,
        "postgres",
        json!({"app": "postgres"}),
        5432,
    )
    .await;

    let platform = format!("{tag}-platform");
    let platforms: Api<IsolationPlatform> = Api::all(client.clone());
    let p: IsolationPlatform = serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform",
        "metadata": {"name": platform},
        "spec": {
            "network": {
                "namespaceTemplate": format!("{tag}-{{orgId}}"),
                "dnsNamespace": dns_ns,
                "podCidrs": ["10.244.0.0/16"],
                "egress": [{"name": "postgres", "namespace": data_ns, "podLabels": {"app": "postgres"}, "ports": [5432]}],
                "trafficProbe": {"image": image, "imagePullPolicy": "Never"},
            },
            "verification": {"intervalSeconds": 10},
        },
    }))
    .unwrap();
    platforms
        .create(&PostParams::default(), &p)
        .await
        .expect("create platform");
    let operator_ns = format!("{tag}-operator");
    namespace(&client, &operator_ns).await;
    let mut operator = Operator::start(&platform, &operator_ns);

    let orgs: Api<Organization> = Api::all(client.clone());
    let (alpha, beta) = (format!("{tag}-alpha"), format!("{tag}-beta"));
    for name in [&alpha, &beta] {
        let o: Organization = serde_json::from_value(json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization",
            "metadata": {"name": name},
            "spec": {"orgId": name, "platformRef": platform},
        }))
        .unwrap();
        orgs.create(&PostParams::default(), &o)
            .await
            .expect("create organization");
    }

    // 1. Isolated, with packets: each org's probe is refused by the other's canary, and reaches
    //    its own canary, DNS and the egress target.
    for name in [&alpha, &beta] {
        let o = until(
            &orgs,
            name,
            "Ready, with every path probed and a cross-tenant packet refused",
            180,
            |o| {
                let Some(d) = network(o) else { return false };
                is_true(o, "Ready")
                    && is_true(o, "IsolationVerified")
                    && is_true(o, "NetworkPolicyEnforced")
                    && path(&d, "to the organization's own canary").is_some()
                    && path(&d, "to DNS").is_some()
                    && path(&d, "to egress target postgres").is_some()
                    && d.traffic.iter().any(|p| {
                        p.path.ends_with("'s canary")
                            && p.path != "to the organization's own canary"
                    })
            },
        )
        .await;
        let d = network(&o).unwrap();
        let peer = d
            .traffic
            .iter()
            .find(|p| p.path.ends_with("'s canary") && !p.path.contains("own canary"))
            .unwrap();
        assert_eq!(peer.policy, "refuses", "{}", show(&o));
        assert!(
            matches!(peer.packet.as_str(), "refused" | "timeout"),
            "{}",
            show(&o)
        );
        let own = path(&d, "to the organization's own canary").expect("own path");
        assert_eq!(
            (own.policy.as_str(), own.packet.as_str()),
            ("allows", "open"),
            "{}",
            show(&o)
        );
        let dns = path(&d, "to DNS").expect("DNS path");
        assert_eq!(
            (dns.policy.as_str(), dns.packet.as_str()),
            ("allows", "open"),
            "{}",
            show(&o)
        );
        let pg = path(&d, "to egress target postgres").expect("egress path");
        assert_eq!(
            (pg.policy.as_str(), pg.packet.as_str()),
            ("allows", "open"),
            "{}",
            show(&o)
        );
        assert!(d.traffic.iter().all(|p| p.agrees), "{}", show(&o));
        println!("{name}: {:#?}", d.traffic);
    }

    // The canary passes the real API server's `restricted` Pod Security admission.
    let restricted = format!("{tag}-restricted");
    let ns_api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": restricted, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }}}))
    .unwrap();
    ns_api
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    let canary: Pod = Api::<Pod>::namespaced(client.clone(), &format!("{tag}-{alpha}"))
        .get("bulkhead-canary")
        .await
        .expect("alpha's canary");
    let mut copy = Pod {
        metadata: Default::default(),
        spec: canary.spec.clone(),
        status: None,
    };
    copy.metadata.name = Some("canary-copy".into());
    if let Some(s) = copy.spec.as_mut() {
        s.node_name = None;
    }
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    Api::<Pod>::namespaced(client.clone(), &restricted)
        .create(&dry, &copy)
        .await
        .expect("the canary's spec must pass the restricted Pod Security profile");
    // A privileged pod is refused there: the admission really runs.
    let mut privileged = copy.clone();
    if let Some(c) = privileged
        .spec
        .as_mut()
        .and_then(|s| s.containers.first_mut())
    {
        c.security_context = None;
    }
    assert!(
        Api::<Pod>::namespaced(client.clone(), &restricted)
            .create(&dry, &privileged)
            .await
            .is_err(),
        "the restricted profile admitted a pod without a security context"
    );

    // 2. A foreign allow-all policy in both namespaces opens the path: the packet goes through,
    //    and the evaluator agrees; isolation is broken and said so.
    for name in [&alpha, &beta] {
        let ns = format!("{tag}-{name}");
        Api::<NetworkPolicy>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &allow_all(&ns))
            .await
            .expect("foreign allow-all policy");
    }
    let o = until(
        &orgs,
        &alpha,
        "showing the packet through the foreign policy",
        90,
        |o| {
            network(o).is_some_and(|d| {
                // Until both of a pass's policy reads see the new policy, the path shows as
                // changing.
                d.traffic.iter().any(|p| {
                    p.path.ends_with("'s canary")
                        && !p.path.contains("own")
                        && p.packet == "open"
                        && p.policy == "allows"
                })
            })
        },
    )
    .await;
    let d = network(&o).unwrap();
    let peer = d
        .traffic
        .iter()
        .find(|p| p.packet == "open" && !p.path.contains("own"))
        .unwrap();
    assert_eq!(
        peer.policy,
        "allows",
        "the evaluator sees the foreign policy too:\n{}",
        show(&o)
    );
    assert!(peer.agrees);
    assert!(!is_true(&o, "IsolationVerified"), "{}", show(&o));
    assert!(!is_true(&o, "Ready"), "{}", show(&o));
    assert_eq!(
        condition(&o, "NetworkPolicyEnforced").map(|c| c.0),
        Some("True".to_owned()),
        "packets and policies agree: the dataplane enforces what it was given\n{}",
        show(&o)
    );
    for name in [&alpha, &beta] {
        let ns = format!("{tag}-{name}");
        Api::<NetworkPolicy>::namespaced(client.clone(), &ns)
            .delete("someone-allows-all", &DeleteParams::default())
            .await
            .expect("remove the foreign policy");
    }
    until(&orgs, &alpha, "Ready again", 90, |o| {
        is_true(o, "Ready") && is_true(o, "IsolationVerified")
    })
    .await;

    // 3. The enforcer goes, every policy stays: packets go through where the evaluator says
    //    refused. That is its own condition.
    let back = EnforcerBack;
    testbed_node(&["enforcer", "stop"]);
    let o = until(&orgs, &alpha, "NotEnforced", 90, |o| {
        condition(o, "NetworkPolicyEnforced")
            .is_some_and(|(s, r)| s == "False" && r == "NotEnforced")
    })
    .await;
    let d = network(&o).unwrap();
    let peer = d
        .traffic
        .iter()
        .find(|p| !p.agrees && p.policy != "changed during the probe")
        .expect("a disagreeing path");
    assert_eq!(
        (peer.policy.as_str(), peer.packet.as_str()),
        ("refuses", "open"),
        "{}",
        show(&o)
    );
    assert!(
        is_true(&o, "NetworkIsolated"),
        "the evaluator alone still says isolated:\n{}",
        show(&o)
    );
    assert!(!is_true(&o, "Ready"), "{}", show(&o));
    let message = o
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "NetworkPolicyEnforced")
        .unwrap()
        .message
        .clone();
    assert!(
        message.contains("does not enforce NetworkPolicy"),
        "{message}"
    );
    println!("enforcer stopped: {message}");
    drop(back);
    until(&orgs, &alpha, "enforced again", 120, |o| {
        is_true(o, "NetworkPolicyEnforced") && is_true(o, "Ready")
    })
    .await;

    // Deleting the Organizations removes their canaries and probes with them.
    for name in [&alpha, &beta] {
        orgs.delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    let pods: Api<Pod> = Api::all(client.clone());
    wait_for(
        "canary and probe Pods to go",
        Duration::from_secs(120),
        || {
            let pods = pods.clone();
            let tag = tag.clone();
            async move {
                let left = pods
                    .list(&ListParams::default().labels("bulkhead.dev/probe-role"))
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .filter(|p| p.namespace().is_some_and(|n| n.starts_with(&tag)))
                    .count();
                (left == 0).then_some(())
            }
        },
    )
    .await;
    assert!(operator.alive(), "the operator exited:\n{}", operator.log());
    let log = operator.log();
    assert!(!log.contains("panicked"), "{log}");
    for ns in [&dns_ns, &data_ns, &operator_ns, &restricted] {
        let _ = ns_api.delete(ns, &DeleteParams::default()).await;
    }
    let _ = platforms.delete(&platform, &DeleteParams::default()).await;
}
