//! The storage layer against an attacker who can create Organizations: an orgId that names an
//! IAM principal bulkhead did not create (a CI user, a role, the operator's own), and a second
//! Organization claiming an existing orgId that is then deleted with `deletionPolicy: Delete`.
//! Each attempt prints a row `| attempt | expected | observed |` (`cargo test --test
//! adversary_storage -- --nocapture`) and fails when the defence is gone.

mod common;

use aws_sdk_s3::config::{BehaviorVersion, Credentials as AwsCredentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use bulkhead::api::DeletionPolicy;
use bulkhead::api::platform::StoragePlatform;
use bulkhead::layers::storage::StorageLayer;
use bulkhead::layers::{Credentials, Layer, LayerError, Tenant};
use bulkhead::tenant::OrgId;
use common::{Testbed, attempt_row, unique};
use serde_json::{Value, json};

fn platform(endpoint: &str, bucket: &str, extra: Value) -> StoragePlatform {
    let mut v = json!({
        "endpoint": endpoint,
        "region": "us-east-1",
        "bucket": bucket,
        "adminSecretRef": {"name": "unused-in-tests"},
        "forcePathStyle": true,
    });
    if let (Some(base), Value::Object(more)) = (v.as_object_mut(), extra) {
        base.extend(more);
    }
    serde_json::from_value(v).expect("storage platform spec")
}

/// Endpoint and admin keys of SeaweedFS (`false`) or moto (`true`).
fn server(moto: bool) -> (String, String, String) {
    let tb = Testbed::get();
    if moto {
        (
            tb.moto_endpoint().to_owned(),
            tb.var("BULKHEAD_MOTO_ACCESS_KEY").to_owned(),
            tb.var("BULKHEAD_MOTO_SECRET_KEY").to_owned(),
        )
    } else {
        (
            tb.s3_endpoint().to_owned(),
            tb.s3_access_key().to_owned(),
            tb.s3_secret_key().to_owned(),
        )
    }
}

fn layer(moto: bool, bucket: &str, extra: Value) -> StorageLayer {
    let (ep, key, secret) = server(moto);
    StorageLayer::connect(&platform(&ep, bucket, extra), &key, &secret).expect("connect")
}

fn role_mode() -> Value {
    json!({"mode": "role", "oidcIssuer": "oidc.cluster.test/id/TEST", "accountId": "123456789012", "serviceAccount": "app"})
}

/// Raw admin clients, acting behind the operator's back.
struct Admin {
    s3: aws_sdk_s3::Client,
    iam: aws_sdk_iam::Client,
    sts: aws_sdk_sts::Client,
}

fn admin(moto: bool) -> Admin {
    let (ep, key, secret) = server(moto);
    let creds = AwsCredentials::new(key, secret, None, None, "test-admin");
    let s3 = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(creds.clone())
        .endpoint_url(&ep)
        .force_path_style(true)
        .build();
    let iam = aws_sdk_iam::config::Builder::new()
        .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
        .region(aws_sdk_iam::config::Region::new("us-east-1"))
        .credentials_provider(creds.clone())
        .endpoint_url(&ep)
        .build();
    let sts = aws_sdk_sts::config::Builder::new()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .endpoint_url(&ep)
        .build();
    Admin {
        s3: aws_sdk_s3::Client::from_conf(s3),
        iam: aws_sdk_iam::Client::from_conf(iam),
        sts: aws_sdk_sts::Client::from_conf(sts),
    }
}

/// An Organization with this orgId and owner UID, deleted with `Delete`.
fn tenant(org: &OrgId, uid: &str) -> Tenant {
    common::tenant_of(org, uid, &[], DeletionPolicy::Delete)
}

fn outcome<T>(r: &Result<T, LayerError>) -> String {
    match r {
        Ok(_) => "accepted".to_owned(),
        Err(e) => format!("{}: {e}", e.reason()),
    }
}

/// What the admin sees of an IAM user: its tags, keys and attached policies, `None` if absent.
async fn user_view(adm: &Admin, name: &str) -> Option<(Vec<(String, String)>, Vec<String>, usize)> {
    adm.iam.get_user().user_name(name).send().await.ok()?;
    let tags = adm
        .iam
        .list_user_tags()
        .user_name(name)
        .send()
        .await
        .expect("tags");
    let keys = adm
        .iam
        .list_access_keys()
        .user_name(name)
        .send()
        .await
        .expect("keys");
    let att = adm
        .iam
        .list_attached_user_policies()
        .user_name(name)
        .send()
        .await
        .expect("attached");
    Some((
        tags.tags()
            .iter()
            .map(|t| (t.key().to_owned(), t.value().to_owned()))
            .collect(),
        keys.access_key_metadata()
            .iter()
            .filter_map(|k| k.access_key_id().map(str::to_owned))
            .collect(),
        att.attached_policies().len(),
    ))
}

async fn remove_user(adm: &Admin, name: &str) {
    if let Ok(keys) = adm.iam.list_access_keys().user_name(name).send().await {
        for k in keys.access_key_metadata() {
            let id = k.access_key_id().unwrap_or_default();
            let _ = adm
                .iam
                .delete_access_key()
                .user_name(name)
                .access_key_id(id)
                .send()
                .await;
        }
    }
    let _ = adm.iam.delete_user().user_name(name).send().await;
}

/// Removes what a test made, also when it fails: runs on a fresh runtime in its own thread.
struct Teardown {
    moto: bool,
    spec: StoragePlatform,
    tenants: Vec<Tenant>,
    users: Vec<String>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        let (moto, spec) = (self.moto, self.spec.clone());
        let tenants = std::mem::take(&mut self.tenants);
        let users = std::mem::take(&mut self.users);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("teardown runtime");
            rt.block_on(async move {
                let (_, key, secret) = server(moto);
                if let Ok(layer) = StorageLayer::connect(&spec, &key, &secret) {
                    for t in &tenants {
                        let _ = layer.cleanup(t).await;
                    }
                    let _ = layer.delete_prefix(&OrgId::sentinel()).await;
                }
                let adm = admin(moto);
                for u in users {
                    remove_user(&adm, &u).await;
                }
                // SeaweedFS gives each bucket its own volumes: never leave one behind.
                for _ in 0..100 {
                    let Ok(page) = adm.s3.list_objects_v2().bucket(&spec.bucket).send().await
                    else {
                        break;
                    };
                    if page.contents().is_empty() {
                        break;
                    }
                    for o in page.contents() {
                        let key = o.key().unwrap_or_default();
                        let _ = adm
                            .s3
                            .delete_object()
                            .bucket(&spec.bucket)
                            .key(key)
                            .send()
                            .await;
                    }
                }
                let _ = adm.s3.delete_bucket().bucket(&spec.bucket).send().await;
            });
        })
        .join();
    }
}

async fn put(adm: &Admin, bucket: &str, key: &str) {
    adm.s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from_static(b"not the attacker's"))
        .send()
        .await
        .expect("put object");
}

async fn exists(adm: &Admin, bucket: &str, key: &str) -> bool {
    adm.s3
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .is_ok()
}

#[tokio::test]
async fn an_org_id_naming_a_foreign_iam_user_is_refused_and_survives_the_claimants_deletion() {
    let bucket = unique("bh-adv-user");
    let l = layer(false, &bucket, json!({}));
    let adm = admin(false);
    l.prepare().await.expect("prepare");
    let name = unique("ci-deploy");
    let mut td = Teardown {
        moto: false,
        spec: l.spec().clone(),
        tenants: vec![],
        users: vec![name.clone()],
    };
    adm.iam
        .create_user()
        .user_name(&name)
        .send()
        .await
        .expect("create ci user");
    adm.iam
        .create_access_key()
        .user_name(&name)
        .send()
        .await
        .expect("ci key");
    let before = user_view(&adm, &name).await.expect("ci user");

    let evil = tenant(&OrgId::parse(&name).unwrap(), &unique("attacker"));
    td.tenants.push(evil.clone());
    let mut creds = Credentials::default();
    let r = l.ensure(&evil, &mut creds).await;
    let after = user_view(&adm, &name).await;
    attempt_row(
        &format!("orgId {name} (an existing IAM user): ensure"),
        "Refused; user, tags and keys unchanged",
        &format!(
            "{}; unchanged: {}",
            outcome(&r),
            after.as_ref() == Some(&before)
        ),
    );
    assert!(matches!(r, Err(LayerError::Refused(_))), "{}", outcome(&r));
    assert_eq!(after.as_ref(), Some(&before), "the user was changed");
    assert!(creds.entries().is_empty(), "no credentials handed out");

    // The CI user's own data under the prefix its name makes.
    let data = format!("{name}/artifact.tgz");
    put(&adm, &bucket, &data).await;
    let r = l.cleanup(&evil).await;
    let after = user_view(&adm, &name).await;
    let kept = exists(&adm, &bucket, &data).await;
    attempt_row(
        "delete the claimant (deletionPolicy Delete)",
        "user, keys and objects kept",
        &format!(
            "{}; user unchanged: {}; objects kept: {kept}",
            outcome(&r),
            after.as_ref() == Some(&before)
        ),
    );
    assert!(r.is_ok(), "{}", outcome(&r));
    assert_eq!(after.as_ref(), Some(&before), "cleanup touched the CI user");
    assert!(kept, "cleanup deleted the CI user's objects");

    let r = l.retire(&evil, &mut creds).await;
    let after = user_view(&adm, &name).await;
    attempt_row(
        "switch the claimant's storage off (retire)",
        "user and keys kept",
        &format!(
            "{}; unchanged: {}",
            outcome(&r),
            after.as_ref() == Some(&before)
        ),
    );
    assert_eq!(after.as_ref(), Some(&before), "retire touched the CI user");
    let _ = adm
        .s3
        .delete_object()
        .bucket(&bucket)
        .key(&data)
        .send()
        .await;
}

#[tokio::test]
async fn an_org_id_naming_the_operator_is_refused_in_user_and_role_mode() {
    for moto in [false, true] {
        let adm = admin(moto);
        let me = adm.sts.get_caller_identity().send().await.expect("whoami");
        let arn = me.arn().unwrap_or_default().to_owned();
        let name = arn.rsplit('/').next().unwrap_or_default().to_owned();
        let Ok(id) = OrgId::parse(&name) else {
            attempt_row(
                &format!("orgId naming the operator {arn}"),
                "Refused",
                "not applicable: the name is no valid orgId",
            );
            continue;
        };
        let bucket = unique("bh-adv-op");
        let (mode, extra) = if moto {
            ("role", role_mode())
        } else {
            ("user", json!({}))
        };
        let l = layer(moto, &bucket, extra);
        l.prepare().await.expect("prepare");
        let evil = tenant(&id, &unique("attacker"));
        let _td = Teardown {
            moto,
            spec: l.spec().clone(),
            tenants: vec![],
            users: vec![],
        };
        let role_before = adm.iam.get_role().role_name(&name).send().await.is_ok();
        let mut creds = Credentials::default();
        let r = l.ensure(&evil, &mut creds).await;
        let role_after = adm.iam.get_role().role_name(&name).send().await.is_ok();
        attempt_row(
            &format!("{mode} mode: orgId {name} (the operator's own principal): ensure"),
            "Refused; no principal created",
            &format!(
                "{}; role created: {}",
                outcome(&r),
                role_after && !role_before
            ),
        );
        assert!(
            matches!(r, Err(LayerError::Refused(_))),
            "{mode}: {}",
            outcome(&r)
        );
        assert!(creds.entries().is_empty());
        assert_eq!(role_after, role_before, "{mode}: a role was created");

        let data = format!("{name}/operator-file");
        put(&adm, &bucket, &data).await;
        let r = l.cleanup(&evil).await;
        let still = adm.s3.list_buckets().send().await.is_ok();
        let kept = exists(&adm, &bucket, &data).await;
        attempt_row(
            &format!("{mode} mode: delete it (deletionPolicy Delete)"),
            "the operator keeps working; its objects kept",
            &format!(
                "{}; operator works: {still}; objects kept: {kept}",
                outcome(&r)
            ),
        );
        assert!(r.is_ok() && still && kept, "{mode}: {}", outcome(&r));
        let r = l.retire(&evil, &mut creds).await;
        assert!(r.is_ok() && adm.s3.list_buckets().send().await.is_ok());
        let _ = adm
            .s3
            .delete_object()
            .bucket(&bucket)
            .key(&data)
            .send()
            .await;
    }
}

#[tokio::test]
async fn an_org_id_naming_a_foreign_role_is_neither_adopted_nor_deleted() {
    let bucket = unique("bh-adv-role");
    let l = layer(true, &bucket, role_mode());
    let adm = admin(true);
    l.prepare().await.expect("prepare");
    let name = unique("ci-deploy");
    let trust = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
        "Principal": {"AWS": "arn:aws:iam::123456789012:user/ci"}, "Action": "sts:AssumeRole"}]});
    adm.iam
        .create_role()
        .role_name(&name)
        .assume_role_policy_document(trust.to_string())
        .send()
        .await
        .expect("create foreign role");
    let read = || async {
        let r = adm.iam.get_role().role_name(&name).send().await.ok()?;
        let doc = r.role()?.assume_role_policy_document()?.to_owned();
        let tags = adm
            .iam
            .list_role_tags()
            .role_name(&name)
            .send()
            .await
            .ok()?;
        Some((
            bulkhead::layers::storage::policy::decode_document(&doc).ok()?,
            tags.tags().len(),
        ))
    };
    let before = read().await.expect("role");
    let mut evil = tenant(&OrgId::parse(&name).unwrap(), &unique("attacker"));
    // moto cannot list a prefix holding '/', so the claimant keeps (would-be) data.
    evil.deletion_policy = DeletionPolicy::Retain;
    let _td = Teardown {
        moto: true,
        spec: l.spec().clone(),
        tenants: vec![],
        users: vec![],
    };
    let mut creds = Credentials::default();
    let r = l.ensure(&evil, &mut creds).await;
    let after = read().await;
    attempt_row(
        &format!("role mode: orgId {name} (an existing untagged role): ensure"),
        "Refused; trust policy and tags unchanged",
        &format!(
            "{}; unchanged: {}",
            outcome(&r),
            after.as_ref() == Some(&before)
        ),
    );
    assert!(matches!(r, Err(LayerError::Refused(_))), "{}", outcome(&r));
    assert_eq!(after.as_ref(), Some(&before), "the role was rewritten");
    let r = l.cleanup(&evil).await;
    let after = read().await;
    attempt_row(
        "role mode: delete the claimant",
        "the role is kept",
        &format!("{}; kept: {}", outcome(&r), after.is_some()),
    );
    assert!(r.is_ok(), "{}", outcome(&r));
    assert_eq!(
        after.as_ref(),
        Some(&before),
        "cleanup deleted or changed the role"
    );
    let _ = adm.iam.delete_role().role_name(&name).send().await;
}

#[tokio::test]
async fn a_claimant_of_an_existing_org_id_deleted_with_delete_removes_nothing_of_the_owner() {
    let bucket = unique("bh-adv-claim");
    let l = layer(false, &bucket, json!({}));
    let adm = admin(false);
    l.prepare().await.expect("prepare");
    let id = OrgId::parse(&unique("globex")).unwrap();
    let real = tenant(&id, &unique("globex-uid"));
    let _td = Teardown {
        moto: false,
        spec: l.spec().clone(),
        tenants: vec![real.clone()],
        users: vec![],
    };
    let mut owner_creds = Credentials::default();
    l.ensure(&real, &mut owner_creds)
        .await
        .expect("the owner's ensure");
    let data = format!("{id}/real-file.txt");
    put(&adm, &bucket, &data).await;
    let before = user_view(&adm, id.as_str()).await.expect("owner's user");

    let squatter = tenant(&id, &unique("squatter-uid"));
    let mut creds = Credentials::default();
    let r = l.ensure(&squatter, &mut creds).await;
    attempt_row(
        &format!("second Organization claims orgId {id}: ensure"),
        "Refused",
        &outcome(&r),
    );
    assert!(matches!(r, Err(LayerError::Refused(_))), "{}", outcome(&r));
    assert!(creds.entries().is_empty());

    let r = l.cleanup(&squatter).await;
    let after = user_view(&adm, id.as_str()).await;
    let kept = exists(&adm, &bucket, &data).await;
    let owner_ok = l
        .verify(&real, &owner_creds)
        .await
        .map(|v| v.isolated() && v.verified())
        .unwrap_or(false);
    attempt_row(
        "delete the claimant (deletionPolicy Delete)",
        "owner's objects, user and key kept; owner still verified",
        &format!(
            "{}; objects kept: {kept}; user and key unchanged: {}; owner verified: {owner_ok}",
            outcome(&r),
            after.as_ref() == Some(&before)
        ),
    );
    assert!(r.is_ok(), "{}", outcome(&r));
    assert!(kept, "the claimant's deletion removed the owner's objects");
    assert_eq!(
        after.as_ref(),
        Some(&before),
        "the owner's user or key changed"
    );
    assert!(owner_ok, "the owner no longer verifies");
    assert_eq!(
        l.prefix_owner(&id).await.unwrap().as_deref(),
        Some(real.owner.uid.as_str())
    );
}
