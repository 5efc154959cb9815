//! Storage layer against the testbed: `user` mode and the bucket guard on SeaweedFS (enforced for
//! real), `role` and `abac` modes on moto (API shape and idempotency only: moto does not evaluate
//! conditions or policy variables).

mod common;

use std::collections::BTreeSet;

use aws_sdk_s3::config::{BehaviorVersion, Credentials as AwsCredentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use bulkhead::api::DeletionPolicy;
use bulkhead::api::platform::StoragePlatform;
use bulkhead::layers::storage::policy::{GUARD_BUCKET_SID, GUARD_SID, POLICY_VERSION};
use bulkhead::layers::storage::{self, StorageLayer};
use bulkhead::layers::{Credentials, Layer, LayerError, Tenant, Verification};
use bulkhead::tenant::OrgId;
use common::{Testbed, unique};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
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

fn seaweed(bucket: &str) -> StorageLayer {
    let tb = Testbed::get();
    StorageLayer::connect(
        &platform(tb.s3_endpoint(), bucket, json!({})),
        tb.s3_access_key(),
        tb.s3_secret_key(),
    )
    .expect("connect")
}

fn moto(bucket: &str, extra: Value) -> StorageLayer {
    let tb = Testbed::get();
    StorageLayer::connect(
        &platform(tb.moto_endpoint(), bucket, extra),
        tb.var("BULKHEAD_MOTO_ACCESS_KEY"),
        tb.var("BULKHEAD_MOTO_SECRET_KEY"),
    )
    .expect("connect")
}

/// A bucket name unique to this run (S3 bucket names allow no '_' and at most 63 characters).
fn bucket(tag: &str) -> String {
    unique(&format!("bh-{tag}"))
}

fn org(tag: &str) -> OrgId {
    OrgId::parse(&unique(tag)).expect("valid org id")
}

/// An owner reference to an Organization with this UID.
fn owner(uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "bulkhead.dev/v1alpha1".into(),
        kind: "Organization".into(),
        name: "org".into(),
        uid: uid.into(),
        ..Default::default()
    }
}

fn tenant(org: &OrgId, peers: &[&OrgId]) -> Tenant {
    Tenant {
        display_name: format!("Org \"{org}\" O'Brien & Co"),
        ..common::tenant_of(org, &unique("uid"), peers, DeletionPolicy::Delete)
    }
}

/// Raw admin clients, to change things behind the operator's back.
struct Admin {
    s3: aws_sdk_s3::Client,
    iam: aws_sdk_iam::Client,
}

fn admin(endpoint: &str, key: &str, secret: &str) -> Admin {
    let creds = AwsCredentials::new(key, secret, None, None, "test-admin");
    let s3 = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(creds.clone())
        .endpoint_url(endpoint)
        .force_path_style(true)
        .build();
    let iam = aws_sdk_iam::config::Builder::new()
        .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
        .region(aws_sdk_iam::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .endpoint_url(endpoint)
        .build();
    Admin {
        s3: aws_sdk_s3::Client::from_conf(s3),
        iam: aws_sdk_iam::Client::from_conf(iam),
    }
}

fn seaweed_admin() -> Admin {
    let tb = Testbed::get();
    admin(tb.s3_endpoint(), tb.s3_access_key(), tb.s3_secret_key())
}

fn moto_admin() -> Admin {
    let tb = Testbed::get();
    admin(
        tb.moto_endpoint(),
        tb.var("BULKHEAD_MOTO_ACCESS_KEY"),
        tb.var("BULKHEAD_MOTO_SECRET_KEY"),
    )
}

/// The moto tests count the server's roles, so they take turns.
static MOTO: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn provision(layer: &StorageLayer, t: &Tenant) -> Credentials {
    let mut creds = Credentials::default();
    layer.ensure(t, &mut creds).await.expect("ensure");
    creds
}

fn failed(v: &Verification) -> Vec<String> {
    v.probes
        .iter()
        .filter(|p| !p.passed)
        .map(|p| format!("{}: {}", p.name, p.detail))
        .collect()
}

fn assert_clean(v: &Verification) {
    assert!(v.findings.is_empty(), "findings: {:?}", v.findings);
    assert!(v.verified(), "failed probes: {:?}", failed(v));
}

fn probe_passed(v: &Verification, name: &str) -> bool {
    v.probes
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no probe {name:?} in {:?}", v.probes))
        .passed
}

/// Whether `policy` holds `statement` (servers store policies re-serialized, so compare canonically).
fn holds(policy: &Value, statement: &Value) -> bool {
    policy["Statement"].as_array().is_some_and(|sts| {
        sts.iter()
            .any(|s| storage::policy::same_document(s, statement))
    })
}

async fn guard_text(a: &Admin, bucket: &str) -> Value {
    let out =
        a.s3.get_bucket_policy()
            .bucket(bucket)
            .send()
            .await
            .expect("bucket policy");
    serde_json::from_str(out.policy().unwrap_or_default()).expect("policy JSON")
}

/// Empties and deletes a test's bucket: SeaweedFS gives every bucket its own volumes, and the
/// shared server runs out of them when buckets pile up.
async fn drop_bucket(adm: &Admin, bucket: &str) {
    for _ in 0..100 {
        let Ok(page) = adm.s3.list_objects_v2().bucket(bucket).send().await else {
            break;
        };
        if page.contents().is_empty() {
            break;
        }
        for o in page.contents() {
            let key = o.key().unwrap_or_default();
            let _ = adm.s3.delete_object().bucket(bucket).key(key).send().await;
        }
    }
    let _ = adm.s3.delete_bucket().bucket(bucket).send().await;
}

async fn cleanup_all(layer: &StorageLayer, tenants: &[&Tenant]) {
    for t in tenants {
        layer.cleanup(t).await.expect("cleanup");
    }
    let _ = layer.delete_prefix(&OrgId::sentinel()).await;
    drop_bucket(&seaweed_admin(), &layer.spec().bucket).await;
}

/// Removes what a test made (its tenants' users, keys and objects, and any user it created
/// behind the operator's back) when dropped, so a failed assertion leaks no IAM user or key. The
/// work runs on a fresh runtime in its own thread: the test's runtime may be unwinding.
struct Teardown {
    spec: StoragePlatform,
    keys: (String, String),
    tenants: Vec<Tenant>,
    foreign_users: Vec<String>,
}

impl Teardown {
    fn new(layer: &StorageLayer, key: &str, secret: &str) -> Self {
        Self {
            spec: layer.spec().clone(),
            keys: (key.to_owned(), secret.to_owned()),
            tenants: Vec::new(),
            foreign_users: Vec::new(),
        }
    }
    fn track(&mut self, t: &Tenant) {
        self.tenants.push(t.clone());
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        let spec = self.spec.clone();
        let (key, secret) = self.keys.clone();
        let tenants = std::mem::take(&mut self.tenants);
        let users = std::mem::take(&mut self.foreign_users);
        let work = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("teardown runtime");
            rt.block_on(async move {
                let Ok(layer) = StorageLayer::connect(&spec, &key, &secret) else {
                    return;
                };
                for mut t in tenants {
                    t.deletion_policy = DeletionPolicy::Delete;
                    let _ = layer.cleanup(&t).await;
                }
                let _ = layer.delete_prefix(&OrgId::sentinel()).await;
                let endpoint = spec.endpoint.clone().unwrap_or_default();
                let adm = admin(&endpoint, &key, &secret);
                for u in users {
                    remove_user(&adm, &u).await;
                }
                drop_bucket(&adm, &spec.bucket).await;
            });
        });
        let _ = work.join();
    }
}

/// A teardown of these SeaweedFS tenants, for tests that provision them by hand.
fn teardown_of(layer: &StorageLayer, tenants: &[&Tenant]) -> Teardown {
    let tb = Testbed::get();
    let mut t = Teardown::new(layer, tb.s3_access_key(), tb.s3_secret_key());
    for x in tenants {
        t.track(x);
    }
    t
}

/// Deletes an IAM user with its keys and policies, as the admin.
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
    if let Ok(att) = adm
        .iam
        .list_attached_user_policies()
        .user_name(name)
        .send()
        .await
    {
        for p in att.attached_policies() {
            let arn = p.policy_arn().unwrap_or_default();
            let _ = adm
                .iam
                .detach_user_policy()
                .user_name(name)
                .policy_arn(arn)
                .send()
                .await;
        }
    }
    if let Ok(inline) = adm.iam.list_user_policies().user_name(name).send().await {
        for p in inline.policy_names() {
            let _ = adm
                .iam
                .delete_user_policy()
                .user_name(name)
                .policy_name(p)
                .send()
                .await;
        }
    }
    let _ = adm.iam.delete_user().user_name(name).send().await;
}

/// A prepared `user`-mode layer on SeaweedFS with its own bucket, the admin's raw clients, and a
/// teardown that runs even when the test fails.
struct Setup {
    bucket: String,
    layer: StorageLayer,
    adm: Admin,
    teardown: Teardown,
}

impl Setup {
    async fn seaweed(tag: &str) -> Self {
        let tb = Testbed::get();
        let bucket = bucket(tag);
        let layer = seaweed(&bucket);
        layer.prepare().await.expect("prepare");
        let teardown = Teardown::new(&layer, tb.s3_access_key(), tb.s3_secret_key());
        Self {
            bucket,
            layer,
            adm: seaweed_admin(),
            teardown,
        }
    }

    /// A tenant of a fresh orgId, provisioned; torn down with the test.
    async fn org(&mut self, tag: &str, peers: &[&OrgId]) -> (Tenant, Credentials) {
        let t = tenant(&org(tag), peers);
        self.teardown.track(&t);
        let creds = provision(&self.layer, &t).await;
        (t, creds)
    }

    async fn put(&self, key: &str, body: &'static [u8]) {
        self.adm
            .s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from_static(body))
            .send()
            .await
            .expect("put object");
    }

    async fn exists(&self, key: &str) -> bool {
        self.adm
            .s3
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .is_ok()
    }

    /// Asserts cleanup of every tracked tenant works, then nothing is left to tear down.
    async fn finish(mut self) {
        for t in std::mem::take(&mut self.teardown.tenants) {
            self.layer.cleanup(&t).await.expect("cleanup");
        }
    }
}

/// The access key ids of an IAM user, as the admin sees them.
async fn key_ids(adm: &Admin, user: &str) -> Vec<String> {
    adm.iam
        .list_access_keys()
        .user_name(user)
        .send()
        .await
        .expect("list access keys")
        .access_key_metadata()
        .iter()
        .filter_map(|k| k.access_key_id().map(str::to_owned))
        .collect()
}

async fn user_exists(adm: &Admin, user: &str) -> bool {
    match adm.iam.get_user().user_name(user).send().await {
        Ok(_) => true,
        Err(e) => {
            assert_eq!(
                aws_sdk_iam::error::ProvideErrorMetadata::code(&e),
                Some("NoSuchEntity"),
                "{e:?}"
            );
            false
        }
    }
}

/// A drift made as the admin behind the operator's back.
#[derive(Clone, Copy, Debug)]
enum Breach {
    /// A wide managed policy attached to the user.
    AttachWide,
    /// A wide inline policy put on the user.
    InlineWide,
    /// The user's own policy detached.
    DetachOurs,
    /// A second access key the Secret does not hold.
    ExtraKey,
    /// The user's own policy widened to the whole bucket.
    WidenOurs,
}

fn wide_policy(bucket: &str) -> Value {
    json!({"Version": POLICY_VERSION, "Statement": [{"Effect": "Allow", "Action": "s3:*",
        "Resource": [format!("arn:aws:s3:::{bucket}"), format!("arn:aws:s3:::{bucket}/*")]}]})
}

/// Makes one breach as the admin; returns what to remove afterwards (an extra policy's ARN).
async fn breach(s: &Setup, org: &OrgId, kind: Breach) -> Option<String> {
    let (iam, user) = (&s.adm.iam, org.as_str());
    let ours = format!("arn:aws:iam::000000000000:policy/bulkhead/bulkhead-{org}");
    let wide = wide_policy(&s.bucket).to_string();
    match kind {
        Breach::AttachWide => {
            let p = iam
                .create_policy()
                .policy_name(unique("wide"))
                .policy_document(wide)
                .send()
                .await
                .expect("create policy");
            let arn = p.policy().and_then(|p| p.arn()).expect("arn").to_owned();
            iam.attach_user_policy()
                .user_name(user)
                .policy_arn(&arn)
                .send()
                .await
                .expect("attach");
            return Some(arn);
        }
        Breach::InlineWide => {
            iam.put_user_policy()
                .user_name(user)
                .policy_name("sneaky")
                .policy_document(wide)
                .send()
                .await
                .expect("put user policy");
        }
        Breach::DetachOurs => {
            let got = iam
                .get_policy()
                .policy_arn(&ours)
                .send()
                .await
                .expect("policy");
            let arn = got.policy().and_then(|p| p.arn()).expect("arn");
            iam.detach_user_policy()
                .user_name(user)
                .policy_arn(arn)
                .send()
                .await
                .expect("detach");
        }
        Breach::ExtraKey => {
            iam.create_access_key()
                .user_name(user)
                .send()
                .await
                .expect("extra key");
        }
        Breach::WidenOurs => {
            let got = iam
                .get_policy()
                .policy_arn(&ours)
                .send()
                .await
                .expect("policy");
            let arn = got.policy().and_then(|p| p.arn()).expect("arn");
            iam.create_policy_version()
                .policy_arn(arn)
                .policy_document(wide)
                .set_as_default(true)
                .send()
                .await
                .expect("widen");
        }
    }
    None
}

/// Breaks one organization's IAM as the admin, checks that verify finds it (a finding naming
/// `needle`), that the next ensure repairs and reports it, and that verify passes again.
async fn break_and_repair(kind: Breach, needle: &str) {
    let mut s = Setup::seaweed("brk").await;
    let (ta, ca) = s.org("br", &[]).await;
    assert_clean(&s.layer.verify(&ta, &ca).await.expect("verify"));
    let extra = breach(&s, &ta.org_id, kind).await;
    let v = s.layer.verify(&ta, &ca).await.expect("verify breached");
    assert!(
        v.findings.iter().any(|f| f.contains(needle)),
        "{kind:?}: no finding mentions {needle:?}: {:?}",
        v.findings
    );
    let mut creds = ca.clone();
    let rep = s.layer.ensure(&ta, &mut creds).await.expect("repair");
    assert!(!rep.is_empty(), "{kind:?}: the repair is reported");
    assert_eq!(creds, ca, "{kind:?}: repairing keeps the key");
    assert_clean(&s.layer.verify(&ta, &creds).await.expect("verify repaired"));
    if let Some(arn) = extra {
        let _ = s.adm.iam.delete_policy().policy_arn(arn).send().await;
    }
    s.finish().await;
}

#[tokio::test]
async fn attached_wide_policy_is_found_and_detached() {
    break_and_repair(Breach::AttachWide, "is attached to user").await;
}

#[tokio::test]
async fn inline_policy_is_found_and_deleted() {
    break_and_repair(Breach::InlineWide, "inline policy sneaky").await;
}

#[tokio::test]
async fn detached_own_policy_is_found_and_attached_again() {
    break_and_repair(Breach::DetachOurs, "is not attached to user").await;
}

#[tokio::test]
async fn extra_access_key_is_found_and_deleted() {
    break_and_repair(Breach::ExtraKey, "does not hold").await;
}

#[tokio::test]
async fn widened_own_policy_is_found_and_restored() {
    break_and_repair(Breach::WidenOurs, "differs from the plan").await;
}

#[tokio::test]
async fn user_mode_isolates_prefixes_and_every_probe_passes() {
    let b = bucket("iso");
    let layer = seaweed(&b);
    layer.prepare().await.expect("prepare");
    let (a, o) = (org("sa"), org("sb"));
    let (ta, tb_) = (tenant(&a, &[&o]), tenant(&o, &[&a]));
    let _guard = teardown_of(&layer, &[&ta, &tb_]);
    let ca = provision(&layer, &ta).await;
    let cb = provision(&layer, &tb_).await;

    for key in [
        storage::KEY_BUCKET,
        storage::KEY_PREFIX,
        storage::KEY_ENDPOINT,
        storage::KEY_REGION,
        storage::KEY_ACCESS_KEY_ID,
        storage::KEY_SECRET_ACCESS_KEY,
    ] {
        assert!(ca.get(key).is_some_and(|v| !v.is_empty()), "{key} missing");
    }
    assert_eq!(ca.get(storage::KEY_PREFIX), Some(format!("{a}/").as_str()));
    assert_eq!(ca.get(storage::KEY_BUCKET), Some(b.as_str()));
    assert!(ca.get(storage::KEY_ROLE_ARN).is_none());
    assert_eq!(layer.identity(&a), Some(a.to_string()));
    assert!(!format!("{ca:?}").contains(ca.get(storage::KEY_SECRET_ACCESS_KEY).unwrap()));

    let v = layer.verify(&ta, &ca).await.expect("verify");
    assert_clean(&v);
    // Own prefix four ways + presign, five per peer (sentinel and b), four bucket-level.
    assert_eq!(v.probes.len(), 5 + 5 * 2 + 4, "{:?}", v.probes);
    let names: BTreeSet<&str> = v.probes.iter().map(|p| p.name.as_str()).collect();
    for want in [
        format!("GET {o}/bulkhead-canary as {a}"),
        format!("GET bulkhead-sentinel/bulkhead-canary as {a}"),
        format!("PUT {o}/bulkhead-probe-from-{a} as {a}"),
        format!("DELETE {o}/bulkhead-probe-from-{a} as {a}"),
        format!("LIST {o}/ as {a}"),
        format!("presigned GET {o}/bulkhead-canary as {a}"),
        format!("presigned GET {a}/bulkhead-canary as {a}"),
        format!("ListBuckets as {a}"),
        format!("GetBucketPolicy {b} as {a}"),
        format!("PutBucketPolicy {b} as {a}"),
        format!("LIST whole bucket {b} as {a}"),
    ] {
        assert!(
            names.contains(want.as_str()),
            "missing probe {want}: {names:?}"
        );
    }
    assert_clean(&layer.verify(&tb_, &cb).await.expect("verify b"));

    // A second pass changes nothing and keeps the key.
    let mut again = ca.clone();
    let repairs = layer.ensure(&ta, &mut again).await.expect("ensure again");
    assert!(repairs.is_empty(), "{repairs:?}");
    assert_eq!(again, ca);
    assert!(layer.prepare().await.expect("prepare again").is_empty());

    cleanup_all(&layer, &[&ta, &tb_]).await;
}

#[tokio::test]
async fn widened_policy_is_held_by_the_guard_and_caught_when_the_guard_goes_too() {
    let b = bucket("wide");
    let layer = seaweed(&b);
    let adm = seaweed_admin();
    layer.prepare().await.expect("prepare");
    let (a, o) = (org("wa"), org("wb"));
    let (ta, tb_) = (tenant(&a, &[&o]), tenant(&o, &[&a]));
    let _guard = teardown_of(&layer, &[&ta, &tb_]);
    let ca = provision(&layer, &ta).await;
    provision(&layer, &tb_).await;
    assert_clean(&layer.verify(&ta, &ca).await.unwrap());

    // Behind the operator's back: a's policy now allows everything in the bucket.
    let widened = json!({"Version": POLICY_VERSION, "Statement": [{"Effect": "Allow", "Action": "s3:*",
        "Resource": [format!("arn:aws:s3:::{b}"), format!("arn:aws:s3:::{b}/*")]}]});
    let arn = adm
        .iam
        .get_policy()
        .policy_arn(format!(
            "arn:aws:iam::000000000000:policy/bulkhead/bulkhead-{a}"
        ))
        .send()
        .await
        .unwrap();
    let arn = arn.policy().unwrap().arn().unwrap().to_owned();
    adm.iam
        .create_policy_version()
        .policy_arn(&arn)
        .policy_document(widened.to_string())
        .set_as_default(true)
        .send()
        .await
        .unwrap();

    let v = layer.verify(&ta, &ca).await.unwrap();
    assert!(
        v.findings
            .iter()
            .any(|f| f.contains("differs from the plan")),
        "{:?}",
        v.findings
    );
    // The guard still refuses every cross-tenant attempt.
    assert!(v.verified(), "the guard should hold: {:?}", failed(&v));

    // Now the guard goes too, keeping a foreign statement: isolation is broken and the probes say so.
    let foreign = json!({"Sid": "OperatorsOwn", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::000000000000:user/nobody-here"},
        "Action": "s3:GetObject", "Resource": format!("arn:aws:s3:::{b}/public/*")});
    let only_foreign = json!({"Version": POLICY_VERSION, "Statement": [foreign.clone()]});
    adm.s3
        .put_bucket_policy()
        .bucket(&b)
        .policy(only_foreign.to_string())
        .send()
        .await
        .unwrap();
    let v = layer.verify(&ta, &ca).await.unwrap();
    assert!(
        v.findings.iter().any(|f| f.contains("no guard statement")),
        "{:?}",
        v.findings
    );
    assert!(!probe_passed(
        &v,
        &format!("GET {o}/bulkhead-canary as {a}")
    ));
    assert!(!probe_passed(
        &v,
        &format!("presigned GET {o}/bulkhead-canary as {a}")
    ));
    assert!(!probe_passed(&v, &format!("LIST {o}/ as {a}")));
    assert!(!probe_passed(
        &v,
        &format!("GET bulkhead-sentinel/bulkhead-canary as {a}")
    ));
    assert!(!v.verified());
    let mut status = bulkhead::api::IsolationPlatformStatus::default();
    layer.platform_status(&mut status).await.unwrap();
    assert!(!status.storage.as_ref().unwrap().guard_in_place);

    // The next pass repairs both, and keeps the foreign statement.
    let prep = layer.prepare().await.unwrap();
    assert!(prep.iter().any(|r| r.0.contains("guard")), "{prep:?}");
    let mut creds = ca.clone();
    let rep = layer.ensure(&ta, &mut creds).await.unwrap();
    assert!(
        rep.iter().any(|r| r.0.contains("widened or edited")),
        "{rep:?}"
    );
    assert_eq!(creds, ca, "repairing the policy keeps the key");
    assert_clean(&layer.verify(&ta, &creds).await.unwrap());
    let policy = guard_text(&adm, &b).await;
    let sts = policy["Statement"].as_array().unwrap();
    assert!(
        holds(&policy, &foreign),
        "foreign statement preserved: {policy}"
    );
    assert_eq!(
        sts.iter()
            .filter(|s| s["Sid"] == GUARD_SID || s["Sid"] == GUARD_BUCKET_SID)
            .count(),
        2
    );

    cleanup_all(&layer, &[&ta, &tb_]).await;
}

#[tokio::test]
async fn extra_attached_and_inline_policies_are_found_and_removed() {
    let b = bucket("extra");
    let layer = seaweed(&b);
    let adm = seaweed_admin();
    layer.prepare().await.unwrap();
    let a = org("xa");
    let ta = tenant(&a, &[]);
    let _guard = teardown_of(&layer, &[&ta]);
    let ca = provision(&layer, &ta).await;
    let wide = json!({"Version": POLICY_VERSION, "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]});
    let extra = adm
        .iam
        .create_policy()
        .policy_name(unique("extra"))
        .policy_document(wide.to_string())
        .send()
        .await
        .unwrap();
    let extra_arn = extra.policy().unwrap().arn().unwrap().to_owned();
    adm.iam
        .attach_user_policy()
        .user_name(a.as_str())
        .policy_arn(&extra_arn)
        .send()
        .await
        .unwrap();
    let v = layer.verify(&ta, &ca).await.unwrap();
    assert!(
        v.findings.iter().any(|f| f.contains("is attached to user")),
        "{:?}",
        v.findings
    );
    // The guard fences this bucket only: every bucket on the server is now listed.
    assert!(
        !probe_passed(&v, &format!("ListBuckets as {a}")),
        "{:?}",
        v.probes
    );
    let mut creds = ca.clone();
    let rep = layer.ensure(&ta, &mut creds).await.unwrap();
    assert!(rep.iter().any(|r| r.0.contains("detached")), "{rep:?}");
    assert_clean(&layer.verify(&ta, &creds).await.unwrap());
    adm.iam
        .delete_policy()
        .policy_arn(&extra_arn)
        .send()
        .await
        .unwrap();
    cleanup_all(&layer, &[&ta]).await;
}

#[tokio::test]
async fn guard_edits_are_found_and_repaired_and_reformatting_is_not_an_edit() {
    let b = bucket("guard");
    let layer = seaweed(&b);
    let adm = seaweed_admin();
    // The operator's own statements exist before bulkhead arrives.
    adm.s3.create_bucket().bucket(&b).send().await.unwrap();
    let foreign = json!({"Sid": "Backups", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::000000000000:user/backup-svc"},
        "Action": ["s3:GetObject"], "Resource": [format!("arn:aws:s3:::{b}/backups/*")]});
    adm.s3
        .put_bucket_policy()
        .bucket(&b)
        .policy(json!({"Version": POLICY_VERSION, "Statement": [foreign.clone()]}).to_string())
        .send()
        .await
        .unwrap();
    let prep = layer.prepare().await.unwrap();
    assert!(prep.iter().any(|r| r.0.contains("guard")));
    let installed = guard_text(&adm, &b).await;
    assert!(holds(&installed, &foreign), "{installed}");
    let guard = installed["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Sid"] == GUARD_SID)
        .unwrap()
        .clone();
    let guard_bucket = installed["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Sid"] == GUARD_BUCKET_SID)
        .unwrap()
        .clone();

    let a = org("ga");
    let ta = tenant(&a, &[]);
    let _guard = teardown_of(&layer, &[&ta]);
    let ca = provision(&layer, &ta).await;
    assert_clean(&layer.verify(&ta, &ca).await.unwrap());

    // Reordered keys and lists, pretty-printed: no update, no repair.
    let mut reordered = guard.clone();
    let mut nr: Vec<Value> = reordered["NotResource"].as_array().unwrap().clone();
    nr.reverse();
    reordered["NotResource"] = Value::Array(nr);
    let pretty = serde_json::to_string_pretty(&json!({"Statement": [guard_bucket.clone(), reordered, foreign.clone()], "Version": POLICY_VERSION})).unwrap();
    adm.s3
        .put_bucket_policy()
        .bucket(&b)
        .policy(pretty)
        .send()
        .await
        .unwrap();
    assert!(
        layer.prepare().await.unwrap().is_empty(),
        "reformatting is not drift"
    );
    let (state, bytes) = layer.guard_state().await.unwrap();
    assert_eq!(state, storage::policy::GuardState::InPlace);
    assert!(bytes > 0);

    // Edited: the guard now exempts everyone's prefix. Found, then repaired.
    let mut edited = guard.clone();
    edited["NotResource"] = json!([format!("arn:aws:s3:::{b}/*"), format!("arn:aws:s3:::{b}")]);
    adm.s3.put_bucket_policy().bucket(&b).policy(json!({"Version": POLICY_VERSION, "Statement": [foreign.clone(), edited, guard_bucket.clone()]}).to_string()).send().await.unwrap();
    let v = layer.verify(&ta, &ca).await.unwrap();
    assert!(
        v.findings.iter().any(|f| f.contains("were edited")),
        "{:?}",
        v.findings
    );
    let mut status = bulkhead::api::IsolationPlatformStatus::default();
    layer.platform_status(&mut status).await.unwrap();
    assert!(!status.storage.as_ref().unwrap().guard_in_place);
    let prep = layer.prepare().await.unwrap();
    assert!(prep.iter().any(|r| r.0.contains("edited")), "{prep:?}");
    let repaired = guard_text(&adm, &b).await;
    assert!(holds(&repaired, &foreign), "{repaired}");
    layer.platform_status(&mut status).await.unwrap();
    assert!(status.storage.as_ref().unwrap().guard_in_place);
    assert_clean(&layer.verify(&ta, &ca).await.unwrap());

    cleanup_all(&layer, &[&ta]).await;
}

#[tokio::test]
async fn deleted_access_key_is_found_and_replaced() {
    let b = bucket("key");
    let layer = seaweed(&b);
    let adm = seaweed_admin();
    layer.prepare().await.unwrap();
    let a = org("ka");
    let ta = tenant(&a, &[]);
    let _guard = teardown_of(&layer, &[&ta]);
    let ca = provision(&layer, &ta).await;
    adm.iam
        .delete_access_key()
        .user_name(a.as_str())
        .access_key_id(ca.get(storage::KEY_ACCESS_KEY_ID).unwrap())
        .send()
        .await
        .unwrap();
    let v = layer.verify(&ta, &ca).await.unwrap();
    assert!(
        v.findings.iter().any(|f| f.contains("no longer exists")),
        "{:?}",
        v.findings
    );
    assert!(
        !probe_passed(&v, &format!("PUT {a}/bulkhead-probe as {a}")),
        "the deleted key must not work"
    );
    let mut creds = ca.clone();
    let rep = layer.ensure(&ta, &mut creds).await.unwrap();
    assert!(rep.iter().any(|r| r.0.contains("was deleted")), "{rep:?}");
    assert_ne!(
        creds.get(storage::KEY_ACCESS_KEY_ID),
        ca.get(storage::KEY_ACCESS_KEY_ID)
    );
    assert_clean(&layer.verify(&ta, &creds).await.unwrap());
    cleanup_all(&layer, &[&ta]).await;
}

#[tokio::test]
async fn rotation_issues_a_new_key_and_the_old_one_stops_working() {
    let b = bucket("rot");
    let layer = seaweed(&b);
    layer.prepare().await.unwrap();
    let a = org("ra");
    let mut ta = tenant(&a, &[]);
    let _guard = teardown_of(&layer, &[&ta]);
    let old = provision(&layer, &ta).await;
    ta.rotate = true;
    let mut new = old.clone();
    let rep = layer.ensure(&ta, &mut new).await.unwrap();
    assert!(rep.iter().any(|r| r.0.contains("rotated")), "{rep:?}");
    assert_ne!(
        new.get(storage::KEY_ACCESS_KEY_ID),
        old.get(storage::KEY_ACCESS_KEY_ID)
    );
    ta.rotate = false;
    assert_clean(&layer.verify(&ta, &new).await.unwrap());
    let v = layer.verify(&ta, &old).await.unwrap();
    assert!(
        !probe_passed(&v, &format!("PUT {a}/bulkhead-probe as {a}")),
        "the old key still works: {:?}",
        v.probes
    );
    cleanup_all(&layer, &[&ta]).await;
}

#[tokio::test]
async fn cleanup_retain_keeps_objects_and_delete_removes_them_all() {
    use futures::StreamExt;
    let b = bucket("clean");
    let layer = seaweed(&b);
    let adm = seaweed_admin();
    layer.prepare().await.unwrap();
    let (keep, gone) = (org("keep"), org("gone"));
    let mut tk = tenant(&keep, &[]);
    tk.deletion_policy = DeletionPolicy::Retain;
    let tg = tenant(&gone, &[]);
    let _guard = teardown_of(&layer, &[&tk, &tg]);
    provision(&layer, &tk).await;
    provision(&layer, &tg).await;
    // More than one page and one DeleteObjects batch.
    let n = 1_030;
    futures::stream::iter(0..n)
        .map(|i| {
            let (s3, b, gone) = (adm.s3.clone(), b.clone(), gone.clone());
            async move {
                s3.put_object()
                    .bucket(b)
                    .key(format!("{gone}/f/{i:05}"))
                    .body(ByteStream::from_static(b"x"))
                    .send()
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    adm.s3
        .put_object()
        .bucket(&b)
        .key(format!("{keep}/file"))
        .body(ByteStream::from_static(b"kept"))
        .send()
        .await
        .unwrap();

    layer.cleanup(&tk).await.unwrap();
    layer.cleanup(&tg).await.unwrap();
    let listed = |p: String| {
        let s3 = adm.s3.clone();
        let b = b.clone();
        async move {
            s3.list_objects_v2()
                .bucket(b)
                .prefix(p)
                .send()
                .await
                .unwrap()
                .key_count()
                .unwrap_or(0)
        }
    };
    assert_eq!(
        listed(format!("{keep}/")).await,
        1,
        "Retain keeps the organization's objects (the canary goes)"
    );
    assert_eq!(
        listed(format!("{gone}/")).await,
        0,
        "Delete removes every object"
    );
    for o in [&keep, &gone] {
        let err = adm
            .iam
            .get_user()
            .user_name(o.as_str())
            .send()
            .await
            .unwrap_err();
        assert_eq!(
            aws_sdk_iam::error::ProvideErrorMetadata::code(&err),
            Some("NoSuchEntity")
        );
    }
    // Cleanup twice is fine.
    layer.cleanup(&tg).await.unwrap();
    adm.s3
        .delete_object()
        .bucket(&b)
        .key(format!("{keep}/file"))
        .send()
        .await
        .unwrap();
    let _ = layer.delete_prefix(&OrgId::sentinel()).await;
    drop_bucket(&adm, &b).await;
}

#[tokio::test]
async fn odd_org_ids_provision_and_verify() {
    let b = bucket("odd");
    let layer = seaweed(&b);
    layer.prepare().await.unwrap();
    let long = format!("9{}", unique("x").replace('-', "0"))
        .chars()
        .chain(std::iter::repeat('z'))
        .take(63)
        .collect::<String>();
    let ids: Vec<OrgId> = [unique("0"), unique("a"), long]
        .iter()
        .map(|s| OrgId::parse(s).unwrap())
        .collect();
    let tenants: Vec<Tenant> = ids
        .iter()
        .map(|id| tenant(id, &ids.iter().filter(|p| *p != id).collect::<Vec<_>>()))
        .collect();
    let _guard = teardown_of(&layer, &tenants.iter().collect::<Vec<_>>());
    let mut all = Vec::new();
    for t in &tenants {
        all.push(provision(&layer, t).await);
    }
    for (t, c) in tenants.iter().zip(&all) {
        assert_clean(&layer.verify(t, c).await.unwrap());
    }
    cleanup_all(&layer, &tenants.iter().collect::<Vec<_>>()).await;
}

#[tokio::test]
async fn an_org_id_naming_an_exempt_user_is_refused_and_nothing_is_created() {
    let tb = Testbed::get();
    let b = bucket("exempt");
    let name = unique("svc");
    let spec = platform(tb.s3_endpoint(), &b, json!({"guardExemptUsers": [name]}));
    let layer = StorageLayer::connect(&spec, tb.s3_access_key(), tb.s3_secret_key()).unwrap();
    layer.prepare().await.unwrap();
    let id = OrgId::parse(&name).unwrap();
    let mut creds = Credentials::default();
    let err = layer
        .ensure(&tenant(&id, &[]), &mut creds)
        .await
        .unwrap_err();
    assert!(matches!(err, LayerError::Refused(_)), "{err}");
    assert!(creds.entries().is_empty());
    let err = seaweed_admin()
        .iam
        .get_user()
        .user_name(&name)
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        aws_sdk_iam::error::ProvideErrorMetadata::code(&err),
        Some("NoSuchEntity")
    );
    let _ = layer.delete_prefix(&OrgId::sentinel()).await;
    drop_bucket(&seaweed_admin(), &b).await;
}

#[tokio::test]
async fn bad_configuration_is_refused_before_any_request() {
    let tb = Testbed::get();
    for bad in [
        json!({"prefixTemplate": "tenants/"}),
        json!({"prefixTemplate": "{orgId}"}),
        json!({"prefixTemplate": "*/{orgId}/"}),
        json!({"iamPath": "bulkhead"}),
        json!({"mode": "role"}),
    ] {
        let spec = platform(tb.s3_endpoint(), "some-bucket", bad.clone());
        assert!(
            matches!(
                StorageLayer::connect(&spec, "k", "s"),
                Err(LayerError::Config(_))
            ),
            "{bad}"
        );
    }
    let spec = platform(tb.s3_endpoint(), "Bad_Bucket", json!({}));
    assert!(StorageLayer::connect(&spec, "k", "s").is_err());
    let spec = platform(tb.s3_endpoint(), "good-bucket", json!({}));
    assert!(StorageLayer::connect(&spec, "", "s").is_err());
}

#[tokio::test]
async fn unreachable_backend_is_reported_as_such() {
    let spec = platform("http://127.0.0.1:9", "some-bucket", json!({}));
    let layer = StorageLayer::connect(&spec, "k", "s").unwrap();
    let err = layer.prepare().await.unwrap_err();
    assert_eq!(err.reason(), "BackendUnreachable", "{err}");
}

#[tokio::test]
async fn role_mode_on_moto_creates_a_tagged_role_idempotently() {
    let _turn = MOTO.lock().await;
    let b = bucket("role");
    let layer = moto(
        &b,
        json!({"mode": "role", "oidcIssuer": "oidc.cluster.test/id/TEST", "accountId": "123456789012", "serviceAccount": "app"}),
    );
    let adm = moto_admin();
    layer.prepare().await.expect("prepare");
    let a = org("rl");
    // Retain: moto rejects the signature of a listing whose prefix holds '/', so Delete cannot run there.
    let mut ta = tenant(&a, &[]);
    ta.deletion_policy = DeletionPolicy::Retain;
    let creds = provision(&layer, &ta).await;
    let arn = creds
        .get(storage::KEY_ROLE_ARN)
        .expect("role ARN")
        .to_owned();
    assert!(arn.ends_with(&format!(":role/bulkhead/{a}")), "{arn}");
    assert!(creds.get(storage::KEY_ACCESS_KEY_ID).is_none());
    assert_eq!(layer.identity(&a), Some(a.to_string()));
    let tags = adm
        .iam
        .list_role_tags()
        .role_name(a.as_str())
        .send()
        .await
        .unwrap();
    assert!(
        tags.tags()
            .iter()
            .any(|t| t.key() == "org_id" && t.value() == a.as_str())
    );
    let role = adm
        .iam
        .get_role()
        .role_name(a.as_str())
        .send()
        .await
        .unwrap();
    let trust = storage::policy::decode_document(
        role.role().unwrap().assume_role_policy_document().unwrap(),
    )
    .unwrap();
    assert_eq!(
        trust["Statement"][0]["Condition"]["StringEquals"]["oidc.cluster.test/id/TEST:sub"],
        format!("system:serviceaccount:org-{a}:app")
    );

    let mut again = creds.clone();
    assert!(layer.ensure(&ta, &mut again).await.unwrap().is_empty());
    assert_eq!(again, creds);
    let v = layer.verify(&ta, &creds).await.unwrap();
    assert!(v.findings.is_empty(), "{:?}", v.findings);
    assert!(
        !v.probes.is_empty(),
        "the operator assumed the role and probed (moto's answers prove nothing)"
    );

    // Widened behind the operator's back: found and repaired (shape only on moto).
    let wide = json!({"Version": POLICY_VERSION, "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]});
    adm.iam
        .put_role_policy()
        .role_name(a.as_str())
        .policy_name("bulkhead-prefix")
        .policy_document(wide.to_string())
        .send()
        .await
        .unwrap();
    adm.iam
        .put_role_policy()
        .role_name(a.as_str())
        .policy_name("sneaky")
        .policy_document(wide.to_string())
        .send()
        .await
        .unwrap();
    let v = layer.verify(&ta, &creds).await.unwrap();
    assert!(
        v.findings.iter().any(|f| f.contains("widened or edited")),
        "{:?}",
        v.findings
    );
    assert!(
        v.findings.iter().any(|f| f.contains("sneaky")),
        "{:?}",
        v.findings
    );
    let rep = layer.ensure(&ta, &mut again).await.unwrap();
    assert_eq!(rep.len(), 2, "{rep:?}");
    assert!(layer.verify(&ta, &creds).await.unwrap().findings.is_empty());

    layer.cleanup(&ta).await.unwrap();
    assert!(
        adm.iam
            .get_role()
            .role_name(a.as_str())
            .send()
            .await
            .is_err()
    );
    layer.cleanup(&ta).await.unwrap();
}

#[tokio::test]
async fn abac_mode_on_moto_creates_one_shared_role_and_nothing_per_org() {
    let _turn = MOTO.lock().await;
    let b = bucket("abac");
    let role = unique("bulkhead-tenant");
    let layer = moto(
        &b,
        json!({"mode": "abac", "sharedRoleName": role, "accountId": "123456789012"}),
    );
    let adm = moto_admin();
    let roles_before = adm
        .iam
        .list_roles()
        .max_items(1000)
        .send()
        .await
        .unwrap()
        .roles()
        .len();
    layer.prepare().await.expect("prepare");
    assert!(
        layer.prepare().await.unwrap().is_empty(),
        "prepare is idempotent"
    );
    let shared = adm.iam.get_role().role_name(&role).send().await.unwrap();
    let policy = adm
        .iam
        .get_role_policy()
        .role_name(&role)
        .policy_name("bulkhead-prefix")
        .send()
        .await
        .unwrap();
    let doc = storage::policy::decode_document(policy.policy_document()).unwrap();
    assert_eq!(
        doc["Statement"][0]["Resource"][0],
        format!("arn:aws:s3:::{b}/${{aws:PrincipalTag/org_id}}/*")
    );

    let (a, o) = (org("aa"), org("ab"));
    let (mut ta, mut tb_) = (tenant(&a, &[&o]), tenant(&o, &[&a]));
    ta.deletion_policy = DeletionPolicy::Retain;
    tb_.deletion_policy = DeletionPolicy::Retain;
    let ca = provision(&layer, &ta).await;
    let cb = provision(&layer, &tb_).await;
    assert_eq!(
        ca.get(storage::KEY_ROLE_ARN),
        Some(shared.role().unwrap().arn())
    );
    assert_eq!(ca.get(storage::KEY_ROLE_ARN), cb.get(storage::KEY_ROLE_ARN));
    assert_eq!(ca.get(storage::KEY_SESSION_TAG), Some(a.as_str()));
    assert_eq!(layer.identity(&a), None);
    let roles_after = adm
        .iam
        .list_roles()
        .max_items(1000)
        .send()
        .await
        .unwrap()
        .roles()
        .len();
    assert_eq!(
        roles_after,
        roles_before + 1,
        "one shared role, none per organization"
    );
    let v = layer.verify(&ta, &ca).await.unwrap();
    assert!(v.findings.is_empty(), "{:?}", v.findings);
    assert!(!v.probes.is_empty());

    for t in [&ta, &tb_] {
        layer.cleanup(t).await.unwrap();
    }
    adm.iam
        .delete_role_policy()
        .role_name(&role)
        .policy_name("bulkhead-prefix")
        .send()
        .await
        .unwrap();
    adm.iam.delete_role().role_name(&role).send().await.unwrap();
}

/// An S3 client acting with an organization's access key from its credentials Secret.
fn s3_as(creds: &Credentials) -> aws_sdk_s3::Client {
    common::admin::s3_tenant(Testbed::get(), creds)
}

/// Whether `creds` can read `key`, retried briefly while a new key propagates (`want` is what
/// the caller expects, so a propagating refusal is retried only when success is expected).
async fn can_read(creds: &Credentials, bucket: &str, key: &str, want: bool) -> bool {
    let c = s3_as(creds);
    for _ in 0..20 {
        let ok = c.get_object().bucket(bucket).key(key).send().await.is_ok();
        if ok == want {
            return ok;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    !want
}

#[tokio::test]
async fn rotation_deletes_every_old_key_and_old_requests_and_presigned_urls_are_refused() {
    let mut s = Setup::seaweed("rot2").await;
    let (mut ta, old) = s.org("rk", &[]).await;
    let canary = s.layer.canary_key(&ta.org_id);
    assert!(can_read(&old, &s.bucket, &canary, true).await);
    let cfg =
        aws_sdk_s3::presigning::PresigningConfig::expires_in(std::time::Duration::from_secs(600))
            .unwrap();
    let presigned = s3_as(&old)
        .get_object()
        .bucket(&s.bucket)
        .key(&canary)
        .presigned(cfg)
        .await
        .unwrap();
    let fetch = |uri: String| async move {
        reqwest::get(uri)
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(
        fetch(presigned.uri().to_owned()).await,
        200,
        "presigned GET before rotation"
    );

    ta.rotate = true;
    let mut new = old.clone();
    let rep = s.layer.ensure(&ta, &mut new).await.unwrap();
    assert!(rep.iter().any(|r| r.0.contains("rotated")), "{rep:?}");
    let new_id = new.get(storage::KEY_ACCESS_KEY_ID).unwrap().to_owned();
    assert_ne!(Some(new_id.as_str()), old.get(storage::KEY_ACCESS_KEY_ID));
    assert_eq!(
        key_ids(&s.adm, ta.org_id.as_str()).await,
        vec![new_id],
        "rotation leaves only the new key"
    );
    assert!(
        !can_read(&old, &s.bucket, &canary, false).await,
        "the old key still reads"
    );
    let mut status = 200;
    for _ in 0..20 {
        status = fetch(presigned.uri().to_owned()).await;
        if status != 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert_eq!(status, 403, "a URL presigned with the old key still works");
    assert!(can_read(&new, &s.bucket, &canary, true).await);
    s.finish().await;
}

#[tokio::test]
async fn retained_data_is_refused_to_a_new_owner_and_adopted_only_explicitly() {
    let mut s = Setup::seaweed("ret").await;
    let id = org("rt");
    let mut first = tenant(&id, &[]);
    first.deletion_policy = DeletionPolicy::Retain;
    s.teardown.track(&first);
    provision(&s.layer, &first).await;
    let data = format!("{id}/data.txt");
    s.put(&data, b"the first owner's").await;
    s.layer.cleanup(&first).await.expect("cleanup retain");
    assert!(!user_exists(&s.adm, id.as_str()).await);
    assert!(s.exists(&data).await, "Retain keeps the objects");
    assert_eq!(
        s.layer.prefix_owner(&id).await.unwrap().as_deref(),
        Some(first.owner.uid.as_str()),
        "the owner record outlives the user"
    );

    // A new Organization with the same orgId: refused, and nothing is created.
    let mut second = tenant(&id, &[]);
    s.teardown.track(&second);
    let mut creds = Credentials::default();
    let err = s.layer.ensure(&second, &mut creds).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LayerError::Refused(_)), "{err}");
    for part in [
        id.as_str(),
        first.owner.uid.as_str(),
        "bulkhead.dev/adopt-from",
    ] {
        assert!(msg.contains(part), "{msg} lacks {part}");
    }
    assert!(creds.entries().is_empty());
    assert!(
        !user_exists(&s.adm, id.as_str()).await,
        "refused, nothing created"
    );
    assert!(s.exists(&data).await);
    // Its deletion removes nothing either.
    s.layer.cleanup(&second).await.unwrap();
    assert!(s.exists(&data).await);

    // Naming the earlier owner takes the data over, and says so.
    second.adopt_from = Some(first.owner.uid.clone());
    let rep = s.layer.ensure(&second, &mut creds).await.expect("adopt");
    let want = format!(
        "re-attached retained data of Organization UID {}",
        first.owner.uid
    );
    assert!(rep.iter().any(|r| r.0 == want), "{rep:?}");
    assert_eq!(
        s.layer.prefix_owner(&id).await.unwrap().as_deref(),
        Some(second.owner.uid.as_str())
    );
    assert!(can_read(&creds, &s.bucket, &data, true).await);
    assert_clean(&s.layer.verify(&second, &creds).await.unwrap());
    let again = s.layer.ensure(&second, &mut creds).await.unwrap();
    assert!(again.is_empty(), "{again:?}");
    // The first owner can no longer touch it.
    s.layer.cleanup(&first).await.unwrap();
    assert!(s.exists(&data).await);
    assert!(user_exists(&s.adm, id.as_str()).await);
    s.teardown
        .tenants
        .retain(|t| t.owner.uid == second.owner.uid);
    s.finish().await;
}

#[tokio::test]
async fn a_legacy_user_is_refused_until_adopted_as_legacy_and_loses_its_old_key() {
    let mut s = Setup::seaweed("leg").await;
    let id = org("lg");
    let name = id.as_str();
    // As an earlier bulkhead left it: tagged with the orgId only, with a key.
    s.adm
        .iam
        .create_user()
        .user_name(name)
        .send()
        .await
        .unwrap();
    s.teardown.foreign_users.push(name.to_owned());
    s.adm
        .iam
        .tag_user()
        .user_name(name)
        .tags(
            aws_sdk_iam::types::Tag::builder()
                .key("org_id")
                .value(name)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    s.adm
        .iam
        .create_access_key()
        .user_name(name)
        .send()
        .await
        .unwrap();
    let old_keys = key_ids(&s.adm, name).await;
    let mut t = tenant(&id, &[]);
    s.teardown.track(&t);
    let mut creds = Credentials::default();
    let err = s.layer.ensure(&t, &mut creds).await.unwrap_err();
    assert!(matches!(err, LayerError::Refused(_)), "{err}");
    assert!(err.to_string().contains("legacy"), "{err}");
    assert_eq!(
        key_ids(&s.adm, name).await,
        old_keys,
        "refused, nothing changed"
    );

    t.adopt_from = Some("legacy".into());
    let rep = s.layer.ensure(&t, &mut creds).await.expect("adopt legacy");
    assert!(rep.iter().any(|r| r.0.contains("taken over")), "{rep:?}");
    let now = key_ids(&s.adm, name).await;
    assert_eq!(now.len(), 1);
    assert!(!old_keys.contains(&now[0]), "the old key was replaced");
    assert_clean(&s.layer.verify(&t, &creds).await.unwrap());
    s.finish().await;
}

#[tokio::test]
async fn retire_removes_the_user_and_keys_keeps_objects_and_drops_the_secret_keys() {
    let mut s = Setup::seaweed("retire").await;
    let (t, mut creds) = s.org("rr", &[]).await;
    let name = t.org_id.as_str().to_owned();
    let data = format!("{name}/kept.txt");
    s.put(&data, b"kept").await;

    // Another Organization claiming the orgId retires nothing of the owner's.
    let mut other = tenant(&t.org_id, &[]);
    other.owner = owner(&unique("other"));
    let mut other_creds = creds.clone();
    assert!(
        s.layer
            .retire(&other, &mut other_creds)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(user_exists(&s.adm, &name).await);

    let rep = s.layer.retire(&t, &mut creds).await.expect("retire");
    assert!(rep.iter().any(|r| r.0.contains(&name)), "{rep:?}");
    assert!(!user_exists(&s.adm, &name).await, "the user is gone");
    for key in storage::CREDENTIAL_KEYS {
        assert!(creds.get(key).is_none(), "{key} left in the Secret");
    }
    assert!(s.exists(&data).await, "objects stay");
    assert!(
        s.layer.retire(&t, &mut creds).await.unwrap().is_empty(),
        "idempotent"
    );
    // Switched on again: a new user and key, the same data.
    let creds = provision(&s.layer, &t).await;
    assert!(can_read(&creds, &s.bucket, &data, true).await);
    s.finish().await;
}
