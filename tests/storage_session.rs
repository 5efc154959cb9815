//! Storage `session` mode against the testbed's SeaweedFS, enforced for real: no per-organization
//! IAM object; each organization's session of one shared role, scoped by a session policy, held
//! in its credentials Secret and replaced before it expires. The role comes from SeaweedFS's IAM
//! configuration file (`testbed/lib/seaweed_sts.sh`); the env file names it
//! (`BULKHEAD_S3_SESSION_ROLE_ARN`).

mod common;

use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials as AwsCredentials, Region};
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use bulkhead::api::DeletionPolicy;
use bulkhead::api::platform::StoragePlatform;
use bulkhead::layers::storage::policy::{
    GUARD_SESSION_BUCKET_SID, GUARD_SESSION_SID, POLICY_VERSION,
};
use bulkhead::layers::storage::{self, StorageLayer};
use bulkhead::layers::{Credentials, Layer, LayerError, Tenant, Verification};
use bulkhead::tenant::OrgId;
use common::{Testbed, unique};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

/// The role the testbed's SeaweedFS defines for session mode.
fn role_arn() -> String {
    let tb = Testbed::get();
    std::env::var("BULKHEAD_S3_SESSION_ROLE_ARN").unwrap_or_else(|_| {
        panic!(
            "the testbed env file {} has no BULKHEAD_S3_SESSION_ROLE_ARN: its SeaweedFS runs without the session role (testbed/lib/seaweed_sts.sh)",
            tb.var("BULKHEAD_TESTBED_DIR")
        )
    })
}

fn spec(bucket: &str, extra: Value) -> StoragePlatform {
    let tb = Testbed::get();
    let mut v = json!({
        "endpoint": tb.s3_endpoint(),
        "region": "us-east-1",
        "bucket": bucket,
        "adminSecretRef": {"name": "unused-in-tests"},
        "forcePathStyle": true,
        "mode": "session",
        "sessionRoleArn": role_arn(),
    });
    if let (Some(base), Value::Object(more)) = (v.as_object_mut(), extra) {
        base.extend(more);
    }
    serde_json::from_value(v).expect("storage platform spec")
}

fn connect(spec: &StoragePlatform) -> Result<StorageLayer, LayerError> {
    let tb = Testbed::get();
    StorageLayer::connect(spec, tb.s3_access_key(), tb.s3_secret_key())
}

fn bucket(tag: &str) -> String {
    unique(&format!("bh-{tag}"))
}

fn org(tag: &str) -> OrgId {
    OrgId::parse(&unique(tag)).expect("valid org id")
}

fn tenant(org: &OrgId, peers: &[&OrgId], policy: DeletionPolicy) -> Tenant {
    common::tenant_of(org, &unique("uid"), peers, policy)
}

/// The admin's raw clients, to look and to change things behind the operator's back.
struct Admin {
    s3: aws_sdk_s3::Client,
    iam: aws_sdk_iam::Client,
    sts: aws_sdk_sts::Client,
}

fn admin() -> Admin {
    let tb = Testbed::get();
    let creds = AwsCredentials::new(
        tb.s3_access_key(),
        tb.s3_secret_key(),
        None,
        None,
        "test-admin",
    );
    let s3 = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(creds.clone())
        .endpoint_url(tb.s3_endpoint())
        .force_path_style(true)
        .build();
    let iam = aws_sdk_iam::config::Builder::new()
        .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
        .region(aws_sdk_iam::config::Region::new("us-east-1"))
        .credentials_provider(creds.clone())
        .endpoint_url(tb.s3_endpoint())
        .build();
    let sts = aws_sdk_sts::config::Builder::new()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .endpoint_url(tb.s3_endpoint())
        .build();
    Admin {
        s3: aws_sdk_s3::Client::from_conf(s3),
        iam: aws_sdk_iam::Client::from_conf(iam),
        sts: aws_sdk_sts::Client::from_conf(sts),
    }
}

/// An S3 client acting with the session a credentials Secret holds.
fn s3_as(creds: &Credentials) -> aws_sdk_s3::Client {
    common::admin::s3_tenant(Testbed::get(), creds)
}

/// What the server answered to one real request: `ok` or the error code.
async fn answer<T, E>(
    req: impl std::future::Future<
        Output = Result<T, aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
    >,
) -> String
where
    E: ProvideErrorMetadata,
{
    match req.await {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.code().unwrap_or("no code").to_owned(),
    }
}

/// Every request `me`'s session should and should not be able to make, against `peer`.
async fn attack(c: &aws_sdk_s3::Client, b: &str, me: &OrgId, peer: &OrgId) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut expect = |what: String, got: String, want: &str| {
        if got != want {
            wrong.push(format!("{what}: {got}, expected {want}"));
        }
    };
    let own = format!("{me}/bulkhead-canary");
    let theirs = format!("{peer}/bulkhead-canary");
    expect(
        format!("GET {own}"),
        answer(c.get_object().bucket(b).key(&own).send()).await,
        "ok",
    );
    expect(
        format!("PUT {me}/written"),
        answer(
            c.put_object()
                .bucket(b)
                .key(format!("{me}/written"))
                .body(ByteStream::from_static(b"x"))
                .send(),
        )
        .await,
        "ok",
    );
    expect(
        format!("LIST {me}/"),
        answer(
            c.list_objects_v2()
                .bucket(b)
                .prefix(format!("{me}/"))
                .send(),
        )
        .await,
        "ok",
    );
    expect(
        format!("GET {theirs}"),
        answer(c.get_object().bucket(b).key(&theirs).send()).await,
        "AccessDenied",
    );
    expect(
        format!("PUT {peer}/from-{me}"),
        answer(
            c.put_object()
                .bucket(b)
                .key(format!("{peer}/from-{me}"))
                .body(ByteStream::from_static(b"x"))
                .send(),
        )
        .await,
        "AccessDenied",
    );
    expect(
        format!("DELETE {theirs}"),
        answer(c.delete_object().bucket(b).key(&theirs).send()).await,
        "AccessDenied",
    );
    expect(
        format!("LIST {peer}/"),
        answer(
            c.list_objects_v2()
                .bucket(b)
                .prefix(format!("{peer}/"))
                .send(),
        )
        .await,
        "AccessDenied",
    );
    expect(
        "LIST whole bucket".to_owned(),
        answer(c.list_objects_v2().bucket(b).send()).await,
        "AccessDenied",
    );
    expect(
        format!("LIST prefix {me} (no slash)"),
        answer(c.list_objects_v2().bucket(b).prefix(me.as_str()).send()).await,
        "AccessDenied",
    );
    wrong
}

fn failed(v: &Verification) -> Vec<String> {
    v.failures()
}

fn assert_clean(v: &Verification) {
    assert!(v.findings.is_empty(), "findings: {:?}", v.findings);
    assert!(v.verified(), "failed probes: {:?}", failed(v));
}

async fn user_names(adm: &Admin) -> Vec<String> {
    adm.iam
        .list_users()
        .send()
        .await
        .expect("list users")
        .users()
        .iter()
        .map(|u| u.user_name().to_owned())
        .collect()
}

async fn keys_under(adm: &Admin, b: &str, prefix: &str) -> Vec<String> {
    match adm
        .s3
        .list_objects_v2()
        .bucket(b)
        .prefix(prefix)
        .send()
        .await
    {
        Ok(out) => out
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn expiry(creds: &Credentials) -> Timestamp {
    creds
        .get(storage::KEY_CREDENTIAL_EXPIRATION)
        .expect("expiry key")
        .parse()
        .expect("RFC 3339 expiry")
}

/// A bucket and its layer, emptied and deleted when dropped (also when the test fails).
struct Bucket {
    name: String,
    tenants: Vec<Tenant>,
    spec: StoragePlatform,
}

impl Bucket {
    async fn new(tag: &str, extra: Value) -> (Self, StorageLayer) {
        let name = bucket(tag);
        let spec = spec(&name, extra);
        let layer = connect(&spec).expect("connect");
        layer.prepare().await.expect("prepare");
        (
            Self {
                name,
                tenants: Vec::new(),
                spec,
            },
            layer,
        )
    }

    fn track(&mut self, t: &Tenant) {
        self.tenants.push(t.clone());
    }
}

impl Drop for Bucket {
    fn drop(&mut self) {
        let (name, spec, tenants) = (
            self.name.clone(),
            self.spec.clone(),
            std::mem::take(&mut self.tenants),
        );
        let work = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("teardown runtime");
            rt.block_on(async move {
                // Session-mode cleanup, then user mode's for a test that switched modes (it
                // removes only IAM users this tenant owns).
                let mut user_spec = spec.clone();
                user_spec.mode = Default::default();
                for spec in [spec, user_spec] {
                    if let Ok(layer) = connect(&spec) {
                        for t in &tenants {
                            let mut t = t.clone();
                            t.deletion_policy = DeletionPolicy::Delete;
                            let _ = layer.cleanup(&t).await;
                        }
                        let _ = layer.delete_prefix(&OrgId::sentinel()).await;
                    }
                }
                let adm = admin();
                for _ in 0..100 {
                    let Ok(page) = adm.s3.list_objects_v2().bucket(&name).send().await else {
                        break;
                    };
                    if page.contents().is_empty() {
                        break;
                    }
                    for o in page.contents() {
                        let key = o.key().unwrap_or_default();
                        let _ = adm.s3.delete_object().bucket(&name).key(key).send().await;
                    }
                }
                let _ = adm.s3.delete_bucket().bucket(&name).send().await;
            });
        });
        let _ = work.join();
    }
}

async fn provision(layer: &StorageLayer, t: &Tenant) -> Credentials {
    let mut creds = Credentials::default();
    let repairs = layer.ensure(t, &mut creds).await.expect("ensure");
    assert!(
        repairs.is_empty(),
        "a first session is no repair: {repairs:?}"
    );
    creds
}

#[tokio::test]
async fn sessions_isolate_both_ways_and_nothing_is_created_in_iam() {
    let adm = admin();
    let users_before = user_names(&adm).await;
    let (mut bk, layer) = Bucket::new("ses", json!({})).await;
    let b = bk.name.clone();
    let (a, o) = (org("sa"), org("sb"));
    let (ta, tb_) = (
        tenant(&a, &[&o], DeletionPolicy::Delete),
        tenant(&o, &[&a], DeletionPolicy::Delete),
    );
    bk.track(&ta);
    bk.track(&tb_);
    let started = Timestamp::now();
    let ca = provision(&layer, &ta).await;
    let cb = provision(&layer, &tb_).await;

    for key in [
        storage::KEY_BUCKET,
        storage::KEY_PREFIX,
        storage::KEY_ENDPOINT,
        storage::KEY_REGION,
        storage::KEY_ACCESS_KEY_ID,
        storage::KEY_SECRET_ACCESS_KEY,
        storage::KEY_SESSION_TOKEN,
        storage::KEY_CREDENTIAL_EXPIRATION,
    ] {
        assert!(ca.get(key).is_some_and(|v| !v.is_empty()), "{key} missing");
    }
    assert!(ca.get(storage::KEY_ROLE_ARN).is_none());
    assert!(ca.get(storage::KEY_SESSION_TAG).is_none());
    assert_ne!(
        ca.get(storage::KEY_ACCESS_KEY_ID),
        cb.get(storage::KEY_ACCESS_KEY_ID)
    );
    // The default lifetime is an hour; the next pass is due at half of it.
    let lifetime = expiry(&ca).duration_since(started).as_secs();
    assert!((3590..=3660).contains(&lifetime), "{lifetime} s");
    assert_eq!(
        layer.renew_by(&ca),
        Some(Timestamp::from_second(expiry(&ca).as_second() - 1800).unwrap())
    );
    assert_eq!(
        layer.identity(&a),
        Some(format!("assumed-role/bulkhead-tenant-sessions/{a}"))
    );
    let shown = format!("{ca:?}");
    for secret in [storage::KEY_SECRET_ACCESS_KEY, storage::KEY_SESSION_TOKEN] {
        assert!(
            !shown.contains(ca.get(secret).unwrap()),
            "{secret} in Debug"
        );
    }

    // Real requests, both ways.
    let wrong = attack(&s3_as(&ca), &b, &a, &o).await;
    assert!(wrong.is_empty(), "{a}'s session: {wrong:?}");
    let wrong = attack(&s3_as(&cb), &b, &o, &a).await;
    assert!(wrong.is_empty(), "{o}'s session: {wrong:?}");
    let buckets = s3_as(&ca)
        .list_buckets()
        .send()
        .await
        .expect("list buckets");
    assert!(
        buckets
            .buckets()
            .iter()
            .all(|x| x.name() == Some(b.as_str())),
        "another bucket revealed"
    );

    // The operator's probes, with the session from the Secret.
    let v = layer.verify(&ta, &ca).await.expect("verify");
    assert_clean(&v);
    assert_eq!(v.probes.len(), 5 + 5 * 2 + 4, "{:?}", v.probes);
    assert_clean(&layer.verify(&tb_, &cb).await.expect("verify b"));

    // A second pass keeps the session, and writes nothing new.
    let mut again = ca.clone();
    let repairs = layer.ensure(&ta, &mut again).await.expect("ensure again");
    assert!(repairs.is_empty(), "{repairs:?}");
    assert_eq!(again, ca);
    assert!(layer.prepare().await.expect("prepare again").is_empty());

    // Nothing per organization in IAM.
    let users_after = user_names(&adm).await;
    assert_eq!(users_before.len(), users_after.len(), "{users_after:?}");
    assert!(
        !users_after
            .iter()
            .any(|u| *u == a.as_str() || *u == o.as_str())
    );
}

#[tokio::test]
async fn the_guard_holds_a_session_whose_policy_was_widened() {
    let adm = admin();
    let (mut bk, layer) = Bucket::new("sgd", json!({})).await;
    let b = bk.name.clone();
    let (a, o) = (org("ga"), org("gb"));
    let (ta, tb_) = (
        tenant(&a, &[&o], DeletionPolicy::Delete),
        tenant(&o, &[&a], DeletionPolicy::Delete),
    );
    bk.track(&ta);
    bk.track(&tb_);
    provision(&layer, &ta).await;
    provision(&layer, &tb_).await;

    let policy: Value = serde_json::from_str(
        adm.s3
            .get_bucket_policy()
            .bucket(&b)
            .send()
            .await
            .expect("bucket policy")
            .policy()
            .unwrap_or_default(),
    )
    .expect("policy JSON");
    let sids: Vec<&str> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["Sid"].as_str())
        .collect();
    assert!(
        sids.contains(&GUARD_SESSION_SID) && sids.contains(&GUARD_SESSION_BUCKET_SID),
        "{sids:?}"
    );

    // A session of the role named after a, whose session policy grants the whole bucket: what a
    // widened policy, or a session minted by someone else, would give.
    let wide = json!({"Version": POLICY_VERSION, "Statement": [{"Effect": "Allow", "Action": "s3:*",
        "Resource": [format!("arn:aws:s3:::{b}"), format!("arn:aws:s3:::{b}/*")]}]});
    let out = adm
        .sts
        .assume_role()
        .role_arn(role_arn())
        .role_session_name(a.as_str())
        .duration_seconds(900)
        .policy(wide.to_string())
        .send()
        .await
        .expect("assume role");
    let c = out.credentials().expect("credentials");
    let mut widened = Credentials::default();
    widened.set(storage::KEY_ACCESS_KEY_ID, c.access_key_id());
    widened.set(storage::KEY_SECRET_ACCESS_KEY, c.secret_access_key());
    widened.set(storage::KEY_SESSION_TOKEN, c.session_token());
    let wrong = attack(&s3_as(&widened), &b, &a, &o).await;
    assert!(wrong.is_empty(), "the guard alone: {wrong:?}");

    // Without the guard, the same session reads the peer's canary: the guard was the wall.
    adm.s3
        .delete_bucket_policy()
        .bucket(&b)
        .send()
        .await
        .expect("delete policy");
    let theirs = format!("{o}/bulkhead-canary");
    assert_eq!(
        answer(s3_as(&widened).get_object().bucket(&b).key(&theirs).send()).await,
        "ok",
        "without the guard the widened session reaches the peer"
    );
    let repairs = layer.prepare().await.expect("prepare");
    assert!(repairs.iter().any(|r| r.0.contains("guard")), "{repairs:?}");
    assert_eq!(
        answer(s3_as(&widened).get_object().bucket(&b).key(&theirs).send()).await,
        "AccessDenied",
        "the guard is back"
    );
}

#[tokio::test]
async fn sessions_are_replaced_before_they_expire() {
    // Due 60 s after each issue (the shortest gap allowed): 900 s sessions (STS's shortest)
    // replaced 840 s before they end.
    let (mut bk, layer) = Bucket::new(
        "ref",
        json!({"sessionDurationSeconds": 900, "sessionRefreshBeforeSeconds": 840}),
    )
    .await;
    let b = bk.name.clone();
    let a = org("ra");
    let ta = tenant(&a, &[], DeletionPolicy::Delete);
    bk.track(&ta);
    let first = provision(&layer, &ta).await;
    let due = layer.renew_by(&first).expect("renew time");
    assert_eq!(due.as_second(), expiry(&first).as_second() - 840);
    let lifetime = expiry(&first).duration_since(Timestamp::now()).as_secs();
    assert!((840..=960).contains(&lifetime), "{lifetime} s");

    // Before it is due, a pass keeps it.
    let mut kept = first.clone();
    assert!(layer.ensure(&ta, &mut kept).await.unwrap().is_empty());
    assert_eq!(kept, first);

    // Once due, a pass issues the next one (a routine refresh: no repair), due 60 s later again.
    let wait = due.duration_since(Timestamp::now()).as_secs_f64() + 1.0;
    tokio::time::sleep(Duration::from_secs_f64(wait.max(0.0))).await;
    let mut next = first.clone();
    let repairs = layer.ensure(&ta, &mut next).await.expect("ensure when due");
    assert!(repairs.is_empty(), "{repairs:?}");
    assert_ne!(
        next.get(storage::KEY_ACCESS_KEY_ID),
        first.get(storage::KEY_ACCESS_KEY_ID)
    );
    assert_ne!(
        next.get(storage::KEY_SESSION_TOKEN),
        first.get(storage::KEY_SESSION_TOKEN)
    );
    assert!(expiry(&next) > expiry(&first));
    assert!(layer.renew_by(&next) > Some(due));
    assert_clean(&layer.verify(&ta, &next).await.expect("verify"));

    // Both work until the old one expires: consumers that have not re-read the Secret yet go on.
    let canary = layer.canary_key(&a);
    for c in [&first, &next] {
        assert_eq!(
            answer(s3_as(c).get_object().bucket(&b).key(&canary).send()).await,
            "ok"
        );
    }
}

#[tokio::test]
async fn a_broken_or_foreign_session_in_the_secret_is_found_and_replaced() {
    let (mut bk, layer) = Bucket::new("brk", json!({})).await;
    let (a, o) = (org("fa"), org("fb"));
    let (ta, tb_) = (
        tenant(&a, &[&o], DeletionPolicy::Delete),
        tenant(&o, &[&a], DeletionPolicy::Delete),
    );
    bk.track(&ta);
    bk.track(&tb_);
    let ca = provision(&layer, &ta).await;
    let cb = provision(&layer, &tb_).await;

    // b's session in a's Secret (location keys a's): the audit names it, ensure replaces it.
    let mut swapped = ca.clone();
    for k in [
        storage::KEY_ACCESS_KEY_ID,
        storage::KEY_SECRET_ACCESS_KEY,
        storage::KEY_SESSION_TOKEN,
        storage::KEY_CREDENTIAL_EXPIRATION,
    ] {
        swapped.set(k, cb.get(k).unwrap());
    }
    let v = layer.verify(&ta, &swapped).await.expect("verify");
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains(&format!("assumed-role/bulkhead-tenant-sessions/{o}"))),
        "{:?}",
        v.findings
    );
    let repairs = layer.ensure(&ta, &mut swapped).await.expect("ensure");
    assert!(
        repairs
            .iter()
            .any(|r| r.0.contains("a new session was issued")),
        "{repairs:?}"
    );
    assert_ne!(
        swapped.get(storage::KEY_ACCESS_KEY_ID),
        cb.get(storage::KEY_ACCESS_KEY_ID)
    );
    assert_clean(&layer.verify(&ta, &swapped).await.expect("verify"));

    // A token the server refuses.
    let mut garbled = ca.clone();
    garbled.set(storage::KEY_SESSION_TOKEN, "not-a-token");
    let v = layer.verify(&ta, &garbled).await.expect("verify");
    assert!(
        v.findings.iter().any(|f| f.contains("refused by STS")),
        "{:?}",
        v.findings
    );
    assert!(!v.verified());
    let repairs = layer.ensure(&ta, &mut garbled).await.expect("ensure");
    assert!(
        repairs.iter().any(|r| r.0.contains("refused by STS")),
        "{repairs:?}"
    );
    assert_clean(&layer.verify(&ta, &garbled).await.expect("verify"));

    // No expiry: replaced, with a repair.
    let mut no_expiry = ca.clone();
    no_expiry.remove(storage::KEY_CREDENTIAL_EXPIRATION);
    let v = layer.verify(&ta, &no_expiry).await.expect("verify");
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains(storage::KEY_CREDENTIAL_EXPIRATION)),
        "{:?}",
        v.findings
    );
    let repairs = layer.ensure(&ta, &mut no_expiry).await.expect("ensure");
    assert!(
        repairs
            .iter()
            .any(|r| r.0.contains(storage::KEY_CREDENTIAL_EXPIRATION)),
        "{repairs:?}"
    );
    assert!(no_expiry.get(storage::KEY_CREDENTIAL_EXPIRATION).is_some());

    // Rotation issues a new session, and says the old one cannot be revoked (it still works).
    let rotating = Tenant {
        rotate: true,
        ..ta.clone()
    };
    let mut rotated = ca.clone();
    let repairs = layer.ensure(&rotating, &mut rotated).await.expect("rotate");
    assert!(
        repairs.iter().any(|r| r.0.contains("cannot be revoked")),
        "{repairs:?}"
    );
    assert_ne!(
        rotated.get(storage::KEY_ACCESS_KEY_ID),
        ca.get(storage::KEY_ACCESS_KEY_ID)
    );
    let canary = layer.canary_key(&a);
    assert_eq!(
        answer(s3_as(&ca).get_object().bucket(&bk.name).key(&canary).send()).await,
        "ok",
        "STS sessions are not revoked by a rotation"
    );
}

#[tokio::test]
async fn bad_inputs_are_refused_with_clear_errors() {
    let config = |extra: Value| match connect(&spec("some-bucket", extra.clone())) {
        Err(LayerError::Config(m)) => m,
        other => panic!("{extra}: {other:?}"),
    };
    for (extra, words) in [
        (
            json!({"sessionRoleArn": null}),
            vec!["mode session needs sessionRoleArn"],
        ),
        (
            json!({"sessionRoleArn": "arn:aws:iam::000000000000:user/admin"}),
            vec!["sessionRoleArn", "role/<name>"],
        ),
        (
            json!({"sessionRoleArn": "bulkhead-tenant-sessions"}),
            vec!["sessionRoleArn", "not an IAM role ARN"],
        ),
        (
            json!({"sessionDurationSeconds": 899}),
            vec!["sessionDurationSeconds 899", "900"],
        ),
        (
            json!({"sessionDurationSeconds": 43201}),
            vec!["sessionDurationSeconds 43201", "43200"],
        ),
        (
            json!({"sessionDurationSeconds": 900, "sessionRefreshBeforeSeconds": 850}),
            vec!["sessionRefreshBeforeSeconds 850", "840"],
        ),
        (
            json!({"sessionRefreshBeforeSeconds": 30}),
            vec!["sessionRefreshBeforeSeconds 30"],
        ),
        (
            json!({"prefixTemplate": format!("{}/{{orgId}}/", "p".repeat(1500))}),
            vec!["session policy", "2048"],
        ),
    ] {
        let m = config(extra.clone());
        for w in words {
            assert!(m.contains(w), "{extra}: {m:?} lacks {w:?}");
        }
    }

    let (mut bk, layer) = Bucket::new("bad", json!({})).await;
    let adm = admin();
    // A one-character orgId cannot name an STS session: refused before anything is written.
    let short = OrgId::parse("z").unwrap();
    let ts = tenant(&short, &[], DeletionPolicy::Delete);
    match layer.ensure(&ts, &mut Credentials::default()).await {
        Err(LayerError::Refused(m)) => {
            assert!(m.contains("orgId z") && m.contains("2 to 64"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert!(keys_under(&adm, &bk.name, "z/").await.is_empty());
    assert!(
        keys_under(&adm, &bk.name, ".bulkhead/owners/z")
            .await
            .is_empty(),
        "no owner record"
    );

    // A role the operator may not assume: a configuration error naming the role and STS's answer.
    let mut other = spec(
        &bk.name,
        json!({"sessionRoleArn": "arn:aws:iam::000000000000:role/no-such-role"}),
    );
    other.bucket = bk.name.clone();
    let denied = connect(&other).expect("connect");
    let a = org("da");
    let ta = tenant(&a, &[], DeletionPolicy::Delete);
    bk.track(&ta);
    match denied.ensure(&ta, &mut Credentials::default()).await {
        Err(LayerError::Config(m)) => {
            assert!(
                m.contains("no-such-role") && m.contains("AccessDenied"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    // The session policy is the layer's own: an organization cannot pass one.
    assert!(
        layer.renew_by(&Credentials::default()).is_none(),
        "no session, no renewal"
    );
}

#[tokio::test]
async fn deletion_leaves_nothing_and_retire_drops_the_secret_keys() {
    let adm = admin();
    let users_before = user_names(&adm).await.len();
    let (mut bk, layer) = Bucket::new("del", json!({})).await;
    let b = bk.name.clone();
    let (a, r) = (org("xa"), org("xr"));
    let ta = tenant(&a, &[], DeletionPolicy::Delete);
    let tr = tenant(&r, &[], DeletionPolicy::Retain);
    bk.track(&ta);
    bk.track(&tr);
    let ca = provision(&layer, &ta).await;
    let cr = provision(&layer, &tr).await;
    for (c, o) in [(&ca, &a), (&cr, &r)] {
        for i in 0..3 {
            s3_as(c)
                .put_object()
                .bucket(&b)
                .key(format!("{o}/data/{i}"))
                .body(ByteStream::from_static(b"tenant data"))
                .send()
                .await
                .expect("tenant write");
        }
    }
    assert!(
        !keys_under(&adm, &b, &format!(".bulkhead/owners/{a}"))
            .await
            .is_empty()
    );

    // Delete: every object and the owner record go; nothing was in IAM.
    layer.cleanup(&ta).await.expect("cleanup");
    assert!(keys_under(&adm, &b, &format!("{a}/")).await.is_empty());
    assert!(
        keys_under(&adm, &b, &format!(".bulkhead/owners/{a}"))
            .await
            .is_empty()
    );
    layer.cleanup(&ta).await.expect("cleanup twice");
    // Retain: the data and its owner record stay; the canary goes.
    layer.cleanup(&tr).await.expect("cleanup retain");
    let kept = keys_under(&adm, &b, &format!("{r}/")).await;
    assert_eq!(kept.len(), 3, "{kept:?}");
    assert!(
        !keys_under(&adm, &b, &format!(".bulkhead/owners/{r}"))
            .await
            .is_empty()
    );
    assert_eq!(user_names(&adm).await.len(), users_before);

    // STS sessions cannot be revoked: one copied out of the deleted Organization's Secret still
    // reaches its (now empty) prefix until it expires. docs/storage.md says so.
    assert_eq!(
        answer(
            s3_as(&ca)
                .put_object()
                .bucket(&b)
                .key(format!("{a}/after-deletion"))
                .body(ByteStream::from_static(b"x"))
                .send()
        )
        .await,
        "ok"
    );
    let _ = adm
        .s3
        .delete_object()
        .bucket(&b)
        .key(format!("{a}/after-deletion"))
        .send()
        .await;

    // Retire (storage switched off): every storage key leaves the Secret, the data stays.
    let n = org("xn");
    let tn = tenant(&n, &[], DeletionPolicy::Delete);
    bk.track(&tn);
    let mut cn = provision(&layer, &tn).await;
    cn.set("DATABASE_URL", "kept");
    let repairs = layer.retire(&tn, &mut cn).await.expect("retire");
    assert!(repairs.is_empty(), "nothing in IAM to remove: {repairs:?}");
    for key in storage::CREDENTIAL_KEYS {
        assert!(cn.get(key).is_none(), "{key} left");
    }
    assert_eq!(cn.get("DATABASE_URL"), Some("kept"));
    assert!(!keys_under(&adm, &b, &format!("{n}/")).await.is_empty());
}

#[tokio::test]
async fn switching_to_user_mode_drops_the_session_token() {
    let (mut bk, layer) = Bucket::new("sw", json!({})).await;
    let a = org("wa");
    let ta = tenant(&a, &[], DeletionPolicy::Delete);
    bk.track(&ta);
    let mut creds = provision(&layer, &ta).await;
    let mut user_spec = bk.spec.clone();
    user_spec.mode = Default::default();
    let user = connect(&user_spec).expect("user mode");
    // The platform pass puts the user mode's guard back (the session statements go).
    assert!(!user.prepare().await.expect("prepare").is_empty());
    user.ensure(&ta, &mut creds)
        .await
        .expect("ensure in user mode");
    assert!(creds.get(storage::KEY_SESSION_TOKEN).is_none());
    assert!(creds.get(storage::KEY_CREDENTIAL_EXPIRATION).is_none());
    assert_clean(&user.verify(&ta, &creds).await.expect("verify"));
    user.cleanup(&ta).await.expect("cleanup user");
}
