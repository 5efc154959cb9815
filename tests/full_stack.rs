//! The whole product on the testbed: an operator process reconciling Organizations on a platform
//! with all four layers, checked from the outside with each organization's own credentials:
//! isolation, BYOK keys, rotation, no credential in the log, and cleanup by deletion policy.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials as AwsCredentials, Region};
use bulkhead::api::{IsolationPlatform, Organization};
use common::org::{conditions, credentials, is_true, wait_verified};
use common::{Operator, Testbed, install_crds, pg_connect, unique, wait_for};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

async fn redis_connect(url: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
}

fn s3_client(c: &BTreeMap<String, String>) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(c["S3_REGION"].clone()))
        .endpoint_url(c["S3_ENDPOINT"].clone())
        .force_path_style(true)
        .credentials_provider(AwsCredentials::new(
            &c["AWS_ACCESS_KEY_ID"],
            &c["AWS_SECRET_ACCESS_KEY"],
            None,
            None,
            "test",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// What org `me` can reach of org `other` with its own credentials, checked outside the operator.
async fn assert_isolated(me: &BTreeMap<String, String>, my_id: &str, other_id: &str) {
    let db = pg_connect(&me["DATABASE_URL"])
        .await
        .expect("tenant connects");
    let foreign: i64 = db
        .query_one(
            "SELECT count(*) FROM public.conversations WHERE org_id <> $1",
            &[&my_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(foreign, 0, "{my_id} sees other orgs' conversations");
    let err = db
        .execute(
            "INSERT INTO public.conversations (org_id, title) VALUES ($1, 'x')",
            &[&other_id],
        )
        .await
        .expect_err("insert with another org's id must fail");
    let detail = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_else(|| err.to_string());
    assert!(detail.contains("row-level security"), "{detail}");

    let mut r = redis_connect(&me["REDIS_URL"]).await.expect("tenant AUTH");
    let res: redis::RedisResult<Option<String>> = redis::cmd("GET")
        .arg(format!("org:{other_id}:canary"))
        .query_async(&mut r)
        .await;
    let e = res.expect_err("GET of another org's key must fail");
    assert!(
        e.to_string().contains("NOPERM") || e.to_string().to_lowercase().contains("no permission"),
        "{e}"
    );
    let _: () = redis::cmd("SET")
        .arg(format!("org:{my_id}:session:1"))
        .arg("v")
        .query_async(&mut r)
        .await
        .expect("own key");

    let s3 = s3_client(me);
    let bucket = &me["S3_BUCKET"];
    s3.put_object()
        .bucket(bucket)
        .key(format!("{my_id}/own.txt"))
        .body(b"mine".to_vec().into())
        .send()
        .await
        .expect("own prefix");
    let e = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(format!("{other_id}/"))
        .send()
        .await
        .expect_err("list other prefix");
    assert!(format!("{e:?}").contains("AccessDenied"), "{e:?}");
}

#[tokio::test]
async fn organizations_are_isolated_in_every_layer_rotated_and_cleaned_up() {
    let tb = Testbed::get();
    let client = tb.kube().await;
    install_crds(&client).await;
    let tag = unique("fs");
    let fp = common::FullPlatform::create(&client, &tag, 30).await;
    let (operator_ns, db_url, platform) =
        (fp.operator_ns.clone(), fp.db_url.clone(), fp.name.clone());
    let byok = format!("sk-byok-{}", bulkhead::layers::random_secret(24));
    let a = format!("{tag}-a");
    common::put_byok_source(&client, &operator_ns, "a-openai", &a, &[("apiKey", &byok)]).await;
    let operator = Operator::start(&platform, &operator_ns);

    let b = format!("{tag}-b");
    let orgs: Api<Organization> = Api::all(client.clone());
    for (name, extra) in [
        (
            &a,
            json!({ "aiProviders": [{ "name": "openai", "secretRef": { "name": "a-openai", "key": "apiKey" } }] }),
        ),
        (
            &b,
            json!({ "deletionPolicy": "Delete", "displayName": "B's \"team\"; DROP TABLE members; --" }),
        ),
    ] {
        let mut spec = json!({ "orgId": name, "platformRef": platform });
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let o: Organization = serde_json::from_value(json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization", "metadata": { "name": name }, "spec": spec
        }))
        .unwrap();
        orgs.create(&PostParams::default(), &o).await.expect("org");
    }
    let oa = wait_verified(&orgs, &a).await;
    wait_verified(&orgs, &b).await;
    for layer in [
        "DatabaseIsolated",
        "StorageIsolated",
        "CacheIsolated",
        "NetworkIsolated",
    ] {
        assert!(
            is_true(&oa, layer),
            "{layer} not True:\n{}",
            conditions(&oa)
        );
    }
    let ns_a = format!("{tag}-{a}");
    let ns_b = format!("{tag}-{b}");
    let ca = credentials(&client, &ns_a).await;
    let cb = credentials(&client, &ns_b).await;

    // Isolation, checked from outside with each organization's own credentials, both ways.
    assert_isolated(&ca, &a, &b).await;
    assert_isolated(&cb, &b, &a).await;

    // BYOK: the key is in A's Secret only; status names the provider, never the key.
    assert_eq!(ca.get("AI_OPENAI_API_KEY"), Some(&byok));
    assert_eq!(
        oa.status.as_ref().unwrap().ai_providers,
        vec!["openai".to_owned()]
    );
    let all = Api::<Secret>::all(client.clone())
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=bulkhead"))
        .await
        .unwrap();
    for s in all.items {
        let holds = s
            .data
            .unwrap_or_default()
            .values()
            .any(|v| v.0 == byok.as_bytes());
        assert!(
            !holds || s.metadata.namespace.as_deref() == Some(ns_a.as_str()),
            "BYOK key found in {:?}",
            s.metadata.namespace
        );
    }
    let status_json = serde_json::to_string(&oa.status).unwrap();
    assert!(!status_json.contains(&byok) && !status_json.contains(&ca["DATABASE_PASSWORD"]));

    // Rotation: every layer's credentials replaced in one write; the old ones stop working.
    orgs.patch(
        &a,
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "annotations": { "bulkhead.dev/rotate": "r1" } } })),
    )
    .await
    .unwrap();
    wait_for("rotation carried out", Duration::from_secs(120), || {
        let orgs = orgs.clone();
        let a = a.clone();
        async move {
            let o = orgs.get(&a).await.ok()?;
            (o.status?.rotation.as_deref() == Some("r1")).then_some(())
        }
    })
    .await;
    let rotated = credentials(&client, &ns_a).await;
    for k in [
        "DATABASE_PASSWORD",
        "REDIS_PASSWORD",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        assert_ne!(rotated[k], ca[k], "{k} was not rotated");
    }
    assert!(
        pg_connect(&ca["DATABASE_URL"]).await.is_err(),
        "old database password still works"
    );
    assert!(
        redis_connect(&ca["REDIS_URL"]).await.is_err(),
        "old Redis password still works"
    );
    let old_s3 = s3_client(&ca)
        .list_objects_v2()
        .bucket(&ca["S3_BUCKET"])
        .prefix(format!("{a}/"))
        .send()
        .await;
    assert!(old_s3.is_err(), "old S3 key still works");
    assert_isolated(&rotated, &a, &b).await;
    wait_verified(&orgs, &a).await;

    // No credential ever reached the operator's log.
    let log = operator.log();
    assert!(log.contains("reconciled"), "the log is empty?\n{log}");
    for creds in [&ca, &cb, &rotated] {
        for k in [
            "DATABASE_PASSWORD",
            "REDIS_PASSWORD",
            "AWS_SECRET_ACCESS_KEY",
            "AI_OPENAI_API_KEY",
        ] {
            if let Some(v) = creds.get(k) {
                assert!(!log.contains(v.as_str()), "{k} found in the operator's log");
            }
        }
    }

    // Deleting B (policy Delete) removes its identities and data and nothing of A's.
    orgs.delete(&b, &DeleteParams::default()).await.unwrap();
    common::wait_gone(&orgs, &b, Duration::from_secs(120)).await;
    assert!(
        pg_connect(&cb["DATABASE_URL"]).await.is_err(),
        "B's role still logs in"
    );
    assert!(
        redis_connect(&cb["REDIS_URL"]).await.is_err(),
        "B's ACL user still authenticates"
    );
    let admin_db = pg_connect(&db_url).await.unwrap();
    let b_rows: i64 = admin_db
        .query_one(
            "SELECT count(*) FROM public.conversations WHERE org_id = $1",
            &[&b],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(b_rows, 0, "B's rows survived a Delete policy");
    assert_isolated(&rotated, &a, &b).await;

    orgs.delete(&a, &DeleteParams::default()).await.unwrap();
    common::wait_gone(&orgs, &a, Duration::from_secs(120)).await;
    drop(operator);
    Api::<IsolationPlatform>::all(client.clone())
        .delete(&platform, &DeleteParams::default())
        .await
        .unwrap();
}
