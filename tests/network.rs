//! The network layer against the testbed's API server: policies are created, repaired, pruned and
//! cleaned up, and the reachability check catches a foreign allow policy. The testbed has no
//! nodes, so no packet is sent: the evaluator over the live policy set is the verification.

mod common;

use std::collections::BTreeMap;

use bulkhead::api::platform::NetworkPlatform;
use bulkhead::api::{DeletionPolicy, Organization};
use bulkhead::layers::network::NetworkLayer;
use bulkhead::layers::{Credentials, Layer, Tenant};
use bulkhead::tenant::OrgId;
use common::{Testbed, unique};
use k8s_openapi::api::core::v1::{Namespace, ResourceQuota};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

const MANAGED: &str = "app.kubernetes.io/managed-by=bulkhead";

async fn client() -> Client {
    let tb = Testbed::get();
    let client = tb.kube().await;
    common::install_crds(&client).await;
    client
}

/// An Organization (with a platform no operator serves, so only this test acts on it) and its
/// namespace, labelled as the controller labels it.
async fn organization(client: &Client, prefix: &str, peers: &[&Tenant]) -> Tenant {
    let id = unique(prefix);
    let orgs: Api<Organization> = Api::all(client.clone());
    let org: Organization = serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization",
        "metadata": {"name": id},
        "spec": {"orgId": id, "platformRef": unique("no-such-platform")},
    }))
    .unwrap();
    let org = orgs
        .create(&PostParams::default(), &org)
        .await
        .expect("create Organization");
    let namespace = format!("org-{id}");
    namespace_with(
        client,
        &namespace,
        &[
            ("bulkhead.dev/org-id", &id),
            ("bulkhead.dev/organization", &id),
        ],
    )
    .await;
    Tenant {
        name: id.clone(),
        org_id: OrgId::parse(&id).unwrap(),
        display_name: id.clone(),
        namespace,
        deletion_policy: DeletionPolicy::Retain,
        rotate: false,
        peers: std::iter::once(OrgId::sentinel())
            .chain(peers.iter().map(|t| t.org_id.clone()))
            .collect(),
        owner: org.controller_owner_ref(&()).unwrap(),
        adopt_from: None,
        resource_quota: None,
        limit_range: None,
    }
}

async fn namespace_with(client: &Client, name: &str, labels: &[(&str, &str)]) {
    let api: Api<Namespace> = Api::all(client.clone());
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let ns: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels},
    }))
    .unwrap();
    api.patch(
        name,
        &PatchParams::apply("bulkhead-tests").force(),
        &Patch::Apply(&ns),
    )
    .await
    .expect("namespace");
}

async fn forget(client: &Client, tenants: &[&Tenant], namespaces: &[&str]) {
    let orgs: Api<Organization> = Api::all(client.clone());
    let nss: Api<Namespace> = Api::all(client.clone());
    for t in tenants {
        let _ = orgs.delete(&t.name, &DeleteParams::default()).await;
        let _ = nss.delete(&t.namespace, &DeleteParams::default()).await;
    }
    for ns in namespaces {
        let _ = nss.delete(ns, &DeleteParams::default()).await;
    }
}

fn platform(v: serde_json::Value) -> NetworkPlatform {
    serde_json::from_value(v).unwrap()
}

async fn names(client: &Client, ns: &str, selector: &str) -> Vec<String> {
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let mut n: Vec<String> = api
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    n.sort();
    n
}

fn org_selector(t: &Tenant) -> String {
    format!("{MANAGED},bulkhead.dev/org-id={}", t.org_id)
}

#[tokio::test]
async fn policies_are_created_repaired_pruned_and_cleaned_up() {
    let client = client().await;
    let gateway = unique("gateway");
    let mut t = organization(&client, "net-life", &[]).await;
    let pf = platform(json!({
        "ingressNamespaces": [gateway],
        "egress": [
            {"name": "postgres", "namespace": "kube-system", "podLabels": {"app": "postgres"}, "ports": [5432]},
            {"name": "s3", "cidr": "0.0.0.0/0", "ports": [443]},
        ],
    }));
    let layer = NetworkLayer::new(client.clone(), &pf).unwrap();
    let mut creds = Credentials::default();

    // Created, labelled, owned; a second pass changes nothing and repairs nothing.
    assert_eq!(layer.ensure(&t, &mut creds).await.unwrap(), vec![]);
    let want = [
        "bulkhead-allow-dns",
        "bulkhead-allow-gateways",
        "bulkhead-allow-same-namespace",
        "bulkhead-default-deny",
        "bulkhead-egress-postgres",
        "bulkhead-egress-s3",
    ];
    assert_eq!(names(&client, &t.namespace, &org_selector(&t)).await, want);
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), &t.namespace);
    let deny = api.get("bulkhead-default-deny").await.unwrap();
    assert_eq!(deny.labels()["bulkhead.dev/organization"], t.name);
    assert_eq!(deny.owner_references()[0].uid, t.owner.uid);
    let versions = |items: Vec<NetworkPolicy>| -> Vec<Option<String>> {
        items
            .into_iter()
            .map(|p| p.metadata.resource_version)
            .collect()
    };
    let before = versions(api.list(&ListParams::default()).await.unwrap().items);
    assert_eq!(layer.ensure(&t, &mut creds).await.unwrap(), vec![]);
    assert_eq!(
        versions(api.list(&ListParams::default()).await.unwrap().items),
        before,
        "a no-op pass writes nothing"
    );
    let v = layer.verify(&t, &creds).await.unwrap();
    assert!(v.isolated() && v.verified(), "{:?}", v.failures());

    // Deleted behind bulkhead's back: verify sees it, ensure repairs it.
    api.delete("bulkhead-allow-dns", &DeleteParams::default())
        .await
        .unwrap();
    let v = layer.verify(&t, &creds).await.unwrap();
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains("bulkhead-allow-dns is missing")),
        "{:?}",
        v.findings
    );
    assert!(
        !v.verified(),
        "DNS egress is gone, the own-traffic probe fails"
    );
    let repairs = layer.ensure(&t, &mut creds).await.unwrap();
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    assert!(repairs[0].0.contains("bulkhead-allow-dns was deleted"));
    assert!(layer.verify(&t, &creds).await.unwrap().verified());

    // Every policy deleted at once (none left carries the plan's hash): each re-creation is
    // still a repair, because this layer applied the plan before.
    let planned = layer.plan(&t).policies.len();
    for p in api.list(&ListParams::default()).await.unwrap().items {
        api.delete(&p.name_any(), &DeleteParams::default())
            .await
            .unwrap();
    }
    let repairs = layer.ensure(&t, &mut creds).await.unwrap();
    assert_eq!(repairs.len(), planned, "{repairs:?}");
    assert!(
        repairs
            .iter()
            .all(|r| r.0.contains("was deleted; created again")),
        "{repairs:?}"
    );
    assert!(layer.verify(&t, &creds).await.unwrap().verified());

    // Edited to admit every namespace: caught by name, repaired, and the spec is the plan's again.
    let open = json!({"spec": {"ingress": [{"from": [{"namespaceSelector": {}}]}]}});
    api.patch(
        "bulkhead-default-deny",
        &PatchParams::default(),
        &Patch::Merge(&open),
    )
    .await
    .unwrap();
    let v = layer.verify(&t, &creds).await.unwrap();
    let id = format!("{}/bulkhead-default-deny", t.namespace);
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains(&format!("{id} differs"))),
        "{:?}",
        v.findings
    );
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains(&format!("NetworkPolicy {id} admits ingress"))),
        "{:?}",
        v.findings
    );
    assert!(v.probes.iter().any(|p| !p.passed && p.detail.contains(&id)));
    let repairs = layer.ensure(&t, &mut creds).await.unwrap();
    assert!(
        repairs.len() == 1 && repairs[0].0.contains("bulkhead-default-deny was changed"),
        "{repairs:?}"
    );
    let restored = api.get("bulkhead-default-deny").await.unwrap();
    assert!(
        restored
            .spec
            .unwrap()
            .ingress
            .unwrap_or_default()
            .is_empty()
    );
    assert!(layer.verify(&t, &creds).await.unwrap().verified());

    // A field bulkhead never set (narrowing the selector so most pods escape the default deny).
    let narrowed = json!({"spec": {"podSelector": {"matchLabels": {"nobody": "here"}}}});
    api.patch(
        "bulkhead-allow-same-namespace",
        &PatchParams::default(),
        &Patch::Merge(&narrowed),
    )
    .await
    .unwrap();
    assert_eq!(layer.ensure(&t, &mut creds).await.unwrap().len(), 1);
    let fixed = api.get("bulkhead-allow-same-namespace").await.unwrap();
    assert_eq!(
        fixed
            .spec
            .unwrap()
            .pod_selector
            .unwrap_or_default()
            .match_labels,
        None
    );

    // A removed label is restored (the object is found by name, not only by label).
    let unlabel = json!({"metadata": {"labels": {"bulkhead.dev/org-id": null}}});
    api.patch(
        "bulkhead-egress-s3",
        &PatchParams::default(),
        &Patch::Merge(&unlabel),
    )
    .await
    .unwrap();
    let repairs = layer.ensure(&t, &mut creds).await.unwrap();
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    assert_eq!(
        api.get("bulkhead-egress-s3").await.unwrap().labels()["bulkhead.dev/org-id"],
        t.org_id.as_str()
    );

    // A spec change leaves an orphan, which goes; that is no repair.
    let smaller = platform(
        json!({"egress": [{"name": "postgres", "namespace": "kube-system", "ports": [5432]}]}),
    );
    let layer2 = NetworkLayer::new(client.clone(), &smaller).unwrap();
    assert_eq!(layer2.ensure(&t, &mut creds).await.unwrap(), vec![]);
    assert_eq!(
        names(&client, &t.namespace, &org_selector(&t)).await,
        [
            "bulkhead-allow-dns",
            "bulkhead-allow-same-namespace",
            "bulkhead-default-deny",
            "bulkhead-egress-postgres"
        ]
    );
    let pg = api.get("bulkhead-egress-postgres").await.unwrap();
    assert!(
        pg.spec.unwrap().egress.unwrap()[0].to.as_ref().unwrap()[0]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .is_none()
    );

    // ResourceQuota: created, repaired after an edit, removed when the spec drops it.
    t.resource_quota = Some(
        serde_json::from_value(json!({"hard": {"pods": "10", "requests.memory": "1Gi"}})).unwrap(),
    );
    assert_eq!(layer2.ensure(&t, &mut creds).await.unwrap(), vec![]);
    assert_eq!(
        layer2.ensure(&t, &mut creds).await.unwrap(),
        vec![],
        "equal quantities are no drift"
    );
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &t.namespace);
    let edit = json!({"spec": {"hard": {"pods": "1000"}}});
    quotas
        .patch(
            "bulkhead-quota",
            &PatchParams::default(),
            &Patch::Merge(&edit),
        )
        .await
        .unwrap();
    let repairs = layer2.ensure(&t, &mut creds).await.unwrap();
    assert!(
        repairs.len() == 1 && repairs[0].0.contains("ResourceQuota"),
        "{repairs:?}"
    );
    let hard = quotas
        .get("bulkhead-quota")
        .await
        .unwrap()
        .spec
        .unwrap()
        .hard
        .unwrap();
    assert_eq!(hard["pods"].0, "10");
    t.resource_quota = None;
    layer2.ensure(&t, &mut creds).await.unwrap();
    assert!(quotas.get_opt("bulkhead-quota").await.unwrap().is_none());

    // Cleanup removes everything bulkhead made for the organization.
    layer2.cleanup(&t).await.unwrap();
    assert!(
        names(&client, &t.namespace, &org_selector(&t))
            .await
            .is_empty()
    );
    forget(&client, &[&t], &[]).await;
}

#[tokio::test]
async fn a_foreign_allow_all_policy_is_flagged_by_name_and_clears_when_removed() {
    let client = client().await;
    let b = organization(&client, "net-b", &[]).await;
    let a = organization(&client, "net-a", &[&b]).await;
    let layer = NetworkLayer::new(client.clone(), &NetworkPlatform::default()).unwrap();
    let mut creds = Credentials::default();
    layer.ensure(&a, &mut creds).await.unwrap();
    layer.ensure(&b, &mut creds).await.unwrap();

    let from_b = format!(
        "ingress into {} from {}'s namespace {}",
        a.namespace, b.org_id, b.namespace
    );
    let v = layer.verify(&a, &creds).await.unwrap();
    assert!(v.isolated() && v.verified(), "{:?}", v.failures());
    assert!(
        v.probes.iter().any(|p| p.name == from_b && p.passed),
        "{:#?}",
        v.probes
    );

    // A tenant (or a mistake) adds an allow-all policy in A's namespace.
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), &a.namespace);
    let foreign: NetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-everyone"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]},
    }))
    .unwrap();
    api.create(&PostParams::default(), &foreign).await.unwrap();
    let v = layer.verify(&a, &creds).await.unwrap();
    let offender = format!("{}/allow-everyone", a.namespace);
    assert!(!v.isolated() && !v.verified());
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains(&format!("NetworkPolicy {offender} admits ingress"))),
        "{:?}",
        v.findings
    );
    let probe = v.probes.iter().find(|p| p.name == from_b).unwrap();
    assert!(
        !probe.passed && probe.detail.contains(&offender),
        "{probe:?}"
    );
    // The managed policies themselves are intact: ensure has nothing to repair, it is not ours.
    assert_eq!(layer.ensure(&a, &mut creds).await.unwrap(), vec![]);
    // B is unaffected by A's namespace.
    assert!(layer.verify(&b, &creds).await.unwrap().verified());

    api.delete("allow-everyone", &DeleteParams::default())
        .await
        .unwrap();
    let v = layer.verify(&a, &creds).await.unwrap();
    assert!(v.isolated() && v.verified(), "{:?}", v.failures());

    for t in [&a, &b] {
        layer.cleanup(t).await.unwrap();
    }
    forget(&client, &[&a, &b], &[]).await;
}

#[tokio::test]
async fn shared_namespace_mode_keeps_organizations_apart() {
    let client = client().await;
    let shared = unique("shared-apps");
    namespace_with(&client, &shared, &[]).await;
    let b = organization(&client, "net-sb", &[]).await;
    let a = organization(&client, "net-sa", &[&b]).await;
    let pf = platform(json!({"mode": "sharedNamespace", "sharedNamespaces": [shared]}));
    let layer = NetworkLayer::new(client.clone(), &pf).unwrap();
    let mut creds = Credentials::default();
    assert_eq!(layer.ensure(&a, &mut creds).await.unwrap(), vec![]);
    assert_eq!(layer.ensure(&b, &mut creds).await.unwrap(), vec![]);
    assert_eq!(
        names(&client, &shared, MANAGED).await,
        vec![
            format!("bulkhead-{}-isolation", a.org_id),
            format!("bulkhead-{}-isolation", b.org_id)
        ]
    );

    let b_into_a = format!(
        "ingress into {}'s pods in {shared} from {}'s pods in {shared}",
        a.org_id, b.org_id
    );
    let v = layer.verify(&a, &creds).await.unwrap();
    assert!(v.isolated() && v.verified(), "{:?}", v.failures());
    assert!(
        v.probes.iter().any(|p| p.name == b_into_a && p.passed),
        "{:#?}",
        v.probes
    );

    // A policy in the shared namespace that opens every pod breaks the isolation, by name.
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), &shared);
    let open: NetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "open"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]},
    }))
    .unwrap();
    api.create(&PostParams::default(), &open).await.unwrap();
    let v = layer.verify(&a, &creds).await.unwrap();
    let p = v.probes.iter().find(|p| p.name == b_into_a).unwrap();
    assert!(
        !p.passed && p.detail.contains(&format!("{shared}/open")),
        "{p:?}"
    );
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains(&format!("{shared}/open")))
    );
    api.delete("open", &DeleteParams::default()).await.unwrap();
    assert!(layer.verify(&a, &creds).await.unwrap().verified());

    // Cleanup of A leaves B's policy alone.
    layer.cleanup(&a).await.unwrap();
    assert_eq!(
        names(&client, &shared, MANAGED).await,
        vec![format!("bulkhead-{}-isolation", b.org_id)]
    );
    layer.cleanup(&b).await.unwrap();
    assert!(names(&client, &shared, MANAGED).await.is_empty());

    // A shared namespace that does not exist is a configuration error, said plainly.
    let missing =
        platform(json!({"mode": "sharedNamespace", "sharedNamespaces": [unique("absent")]}));
    let err = NetworkLayer::new(client.clone(), &missing)
        .unwrap()
        .ensure(&a, &mut creds)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    forget(&client, &[&a, &b], &[&shared]).await;
}
