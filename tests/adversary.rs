//! The attacker who can create Organizations, against a running operator on a platform with every
//! layer. Each attempt prints a row (attempt | expected | observed); run with `--nocapture` to
//! see the table. The tenant attacker, who holds only its own credentials, is played per layer in
//! `adversary_database.rs`, `adversary_cache.rs` and `adversary_storage.rs`.

mod common;

use std::time::Duration;

use bulkhead::api::{ADOPT_ANNOTATION, Organization};
use common::{
    FullPlatform, Operator, Testbed, attempt_row, install_crds, pg_connect, unique, wait_for,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn condition(o: &Organization, t: &str) -> Option<(String, String, String)> {
    o.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| {
            (
                format!("{:?}", c.status),
                c.reason.clone(),
                c.message.clone(),
            )
        })
}

fn organization(name: &str, platform: &str, extra: serde_json::Value) -> Organization {
    let mut spec = json!({ "orgId": name, "platformRef": platform });
    spec.as_object_mut()
        .expect("object")
        .extend(extra.as_object().cloned().unwrap_or_default());
    serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization",
        "metadata": { "name": name }, "spec": spec
    }))
    .expect("organization")
}

async fn wait_condition(
    api: &Api<Organization>,
    name: &str,
    t: &str,
    status: &str,
    secs: u64,
) -> (Organization, (String, String, String)) {
    let what = format!("{name} {t}={status}");
    wait_for(&what, Duration::from_secs(secs), || {
        let api = api.clone();
        let name = name.to_owned();
        let t = t.to_owned();
        let status = status.to_owned();
        async move {
            let o = api.get(&name).await.ok()?;
            let c = condition(&o, &t)?;
            (c.0 == status).then_some((o, c))
        }
    })
    .await
}

#[tokio::test]
async fn an_organization_creator_cannot_turn_the_operator_against_a_tenant() {
    let tb = Testbed::get();
    let client = tb.kube().await;
    install_crds(&client).await;
    let tag = unique("adv");
    let fp = FullPlatform::create(&client, &tag, 3600).await;
    let _operator = Operator::start(&fp.name, &fp.operator_ns);
    let orgs: Api<Organization> = Api::all(client.clone());
    println!("| attempt | expected | observed |\n|---|---|---|");

    // 1. Claim an existing orgId under another name: the API server refuses it.
    let victim = format!("{tag}-victim");
    orgs.create(
        &PostParams::default(),
        &organization(&victim, &fp.name, json!({ "displayName": "Victim" })),
    )
    .await
    .expect("victim");
    let (v, _) = wait_condition(&orgs, &victim, "Ready", "True", 180).await;
    let victim_uid = v.metadata.uid.clone().expect("uid");
    let mut squat = organization(&victim, &fp.name, json!({ "deletionPolicy": "Delete" }));
    squat.metadata.name = Some(format!("{tag}-squatter"));
    let err = orgs
        .create(&PostParams::default(), &squat)
        .await
        .expect_err("a second Organization claiming the victim's orgId must be refused");
    let observed = match &err {
        kube::Error::Api(s) => format!("{} {}", s.code, s.message),
        e => e.to_string(),
    };
    attempt_row(
        "claim an existing orgId",
        "422 from the API server",
        &observed,
    );
    assert!(
        observed.contains("metadata.name must equal spec.orgId"),
        "{observed}"
    );

    // 2. Point BYOK at each of the platform's admin Secrets, even labelled for the attacker.
    let admin_values = [
        fp.db_url.clone(),
        tb.redis_admin_url().to_owned(),
        tb.s3_secret_key().to_owned(),
    ];
    for (secret, key) in [("pg", "url"), ("redis", "url"), ("s3", "secretAccessKey")] {
        let evil = format!("{tag}-byok-{secret}");
        common::label_secret(
            &client,
            &fp.operator_ns,
            secret,
            bulkhead::api::BYOK_LABEL,
            &evil,
        )
        .await;
        let extra = json!({ "aiProviders": [{ "name": "steal", "secretRef": { "name": secret, "key": key } }] });
        orgs.create(
            &PostParams::default(),
            &organization(&evil, &fp.name, extra),
        )
        .await
        .expect("create");
        let (_, c) = wait_condition(&orgs, &evil, "CredentialsReady", "False", 120).await;
        attempt_row(
            &format!("BYOK from admin Secret {secret:?}"),
            "CredentialsReady False ProviderKeyIneligible, no admin value copied",
            &format!("{} {}: {}", c.0, c.1, c.2),
        );
        assert_eq!(c.1, "ProviderKeyIneligible", "{}", c.2);
        let ns = format!("{tag}-{evil}");
        if let Some(s) = Api::<Secret>::namespaced(client.clone(), &ns)
            .get_opt("bulkhead-credentials")
            .await
            .expect("read Secret")
        {
            for (k, v) in s.data.unwrap_or_default() {
                let v = String::from_utf8_lossy(&v.0).into_owned();
                assert!(
                    !admin_values.iter().any(|a| v.contains(a.as_str())),
                    "admin value copied into {ns} under {k}"
                );
            }
        }
        orgs.delete(&evil, &DeleteParams::default())
            .await
            .expect("delete");
    }

    // 3. Metacharacters of SQL, JSON and Redis in a display name change nothing but the text.
    let odd = format!("{tag}-odd");
    let display = "x'); DROP TABLE organizations; -- \"}]*?[a] \\ \r\nKEYS * $1";
    orgs.create(
        &PostParams::default(),
        &organization(&odd, &fp.name, json!({ "displayName": display })),
    )
    .await
    .expect("odd");
    wait_condition(&orgs, &odd, "Ready", "True", 180).await;
    let db = pg_connect(&fp.db_url).await.expect("db");
    let stored: String = db
        .query_one(
            "SELECT display_name FROM public.organizations WHERE id = $1",
            &[&odd],
        )
        .await
        .expect("registry row")
        .get(0);
    attempt_row(
        "metacharacters in displayName",
        "stored verbatim, Ready",
        &format!("{stored:?}"),
    );
    assert_eq!(stored, display);

    // 4. Switch a layer off: its identity and credentials go, nothing is kept alive by it.
    let before = orgs.get(&odd).await.expect("odd");
    let user = before
        .status
        .as_ref()
        .and_then(|s| s.identities.as_ref())
        .and_then(|i| i.cache_user.clone())
        .expect("cache user recorded");
    orgs.patch(
        &odd,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "cache": { "enabled": false } } })),
    )
    .await
    .expect("switch cache off");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &format!("{tag}-{odd}"));
    wait_for("cache identity retired", Duration::from_secs(120), || {
        let (orgs, secrets, odd) = (orgs.clone(), secrets.clone(), odd.clone());
        async move {
            let o = orgs.get(&odd).await.ok()?;
            let ids = o.status?.identities?;
            let data = secrets.get("bulkhead-credentials").await.ok()?.data?;
            (ids.cache_user.is_none() && !data.keys().any(|k| k.starts_with("REDIS_")))
                .then_some(())
        }
    })
    .await;
    let mut redis = redis::Client::open(tb.redis_admin_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let acl: redis::Value = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(&user)
        .query_async(&mut redis)
        .await
        .expect("ACL GETUSER");
    attempt_row(
        "switch the cache layer off to keep its user",
        "ACL user and REDIS_* keys removed",
        &format!("ACL GETUSER {user}: {acl:?}"),
    );
    assert_eq!(acl, redis::Value::Nil, "the retired ACL user still exists");
    // The finalizer, like every write of the operator, is under its own field manager.
    let managers: Vec<String> = before
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.to_string().contains("f:finalizers"))
        })
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(
        managers,
        vec!["bulkhead".to_owned()],
        "finalizer written by {managers:?}"
    );

    // 5. Delete the victim with Retain, then recreate it: its data is not inherited silently.
    db.execute(
        "INSERT INTO public.projects (org_id, name) VALUES ($1, 'crown jewels')",
        &[&victim],
    )
    .await
    .expect("victim row");
    orgs.delete(&victim, &DeleteParams::default())
        .await
        .expect("delete victim");
    common::wait_gone(&orgs, &victim, Duration::from_secs(120)).await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    common::wait_gone(
        &namespaces,
        &format!("{tag}-{victim}"),
        Duration::from_secs(120),
    )
    .await;
    orgs.create(
        &PostParams::default(),
        &organization(&victim, &fp.name, json!({})),
    )
    .await
    .expect("recreate");
    let c = wait_for("Ready False Refused", Duration::from_secs(120), || {
        let orgs = orgs.clone();
        let victim = victim.clone();
        async move {
            let c = condition(&orgs.get(&victim).await.ok()?, "Ready")?;
            (c.1 == "Refused").then_some(c)
        }
    })
    .await;
    attempt_row(
        "recreate a deleted (Retain) orgId without adopting",
        "Ready False Refused, naming the old UID",
        &format!("{}: {}", c.1, c.2),
    );
    assert!(c.2.contains(&victim_uid), "{}", c.2);

    // 6. Adopting is an explicit act, and the status says it happened.
    orgs.patch(
        &victim,
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "annotations": { ADOPT_ANNOTATION: victim_uid } } })),
    )
    .await
    .expect("annotate");
    let (o, _) = wait_condition(&orgs, &victim, "Ready", "True", 180).await;
    let adopted = o.status.and_then(|s| s.adopted_from);
    attempt_row(
        "adopt retained data with the annotation",
        "Ready, status.adoptedFrom = old UID, rows kept",
        &format!("adoptedFrom={adopted:?}"),
    );
    assert_eq!(adopted.as_deref(), Some(victim_uid.as_str()));
    let kept: i64 = db
        .query_one(
            "SELECT count(*) FROM public.projects WHERE org_id = $1 AND name = 'crown jewels'",
            &[&victim],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(kept, 1, "retained rows survive adoption");

    for name in [&victim, &odd] {
        orgs.delete(name, &DeleteParams::default()).await.ok();
        common::wait_gone(&orgs, name, Duration::from_secs(120)).await;
    }
}
