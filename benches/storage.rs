//! Storage benchmark: `cargo bench --bench storage` against the testbed (`testbed/up`).
//!
//! Provisions storage isolation (`user` mode: IAM user, managed policy, access key, canary) for
//! 1,000 organizations on the testbed's SeaweedFS, counts the API calls per organization, reads
//! the bucket policy's size at 1, 10, 100 and 1,000 organizations (it must not grow), verifies a
//! sample, and removes everything again. The baseline, measured in the same run, is one plain
//! S3 round trip (HeadBucket) as the admin. `BULKHEAD_BENCH_ORGS` overrides the count.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use bulkhead::api::DeletionPolicy;
use bulkhead::api::platform::StoragePlatform;
use bulkhead::layers::storage::StorageLayer;
use bulkhead::layers::{Credentials, Layer, Tenant};
use bulkhead::tenant::OrgId;
use futures::StreamExt;

/// Concurrent operations against the server.
const CONCURRENCY: usize = 8;
/// Wall-clock bound for provisioning (`BULKHEAD_BENCH_SECONDS` overrides it).
const TIME_LIMIT: Duration = Duration::from_secs(15 * 60);
const BASELINE_CALLS: u32 = 200;
const VERIFY_SAMPLE: usize = 10;

fn tenant(org: &OrgId, peers: Vec<OrgId>) -> Tenant {
    Tenant {
        name: org.to_string(),
        org_id: org.clone(),
        display_name: org.to_string(),
        namespace: format!("org-{org}"),
        deletion_policy: DeletionPolicy::Delete,
        rotate: false,
        peers,
        owner: Default::default(),
        adopt_from: None,
        resource_quota: None,
        limit_range: None,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let tb = common::Testbed::get();
    let n: usize = std::env::var("BULKHEAD_BENCH_ORGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let run = std::process::id() % 100_000;
    let bucket = format!("bh-bench-{run}");
    let spec: StoragePlatform = serde_json::from_value(serde_json::json!({
        "endpoint": tb.s3_endpoint(), "region": "us-east-1", "bucket": bucket,
        "adminSecretRef": {"name": "unused"}, "forcePathStyle": true,
    }))
    .expect("spec");
    let layer =
        StorageLayer::connect(&spec, tb.s3_access_key(), tb.s3_secret_key()).expect("connect");
    let limit = std::env::var("BULKHEAD_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(TIME_LIMIT);
    let deadline = Instant::now() + limit;
    layer.prepare().await.expect("prepare");

    // Baseline: one admin round trip.
    let admin = {
        let creds = aws_sdk_s3::config::Credentials::new(
            tb.s3_access_key(),
            tb.s3_secret_key(),
            None,
            None,
            "bench",
        );
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(creds)
            .endpoint_url(tb.s3_endpoint())
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    };
    let t = Instant::now();
    for _ in 0..BASELINE_CALLS {
        admin
            .head_bucket()
            .bucket(&bucket)
            .send()
            .await
            .expect("HeadBucket");
    }
    let baseline = t.elapsed() / BASELINE_CALLS;
    println!(
        "baseline: one S3 round trip (HeadBucket) = {:.2} ms",
        ms(baseline)
    );

    let orgs: Vec<OrgId> = (0..n)
        .map(|i| OrgId::parse(&format!("bench-{run}-{i}")).expect("org id"))
        .collect();
    let mut sizes = Vec::new();
    let mut provisioned = 0usize;
    let mut provision_time = Duration::ZERO;
    let mut provision_calls = 0u64;
    let mut creds_of: Vec<Option<Credentials>> = vec![None; n];
    let milestones: Vec<usize> = [1usize, 10, 100, 1000, n]
        .into_iter()
        .filter(|m| *m <= n)
        .collect();
    for &milestone in &milestones {
        if milestone <= provisioned {
            continue;
        }
        let calls_before = layer.api_calls();
        let t = Instant::now();
        // In order, so that the organizations provisioned before the deadline are the first ones.
        let batch: Vec<Option<(usize, Credentials)>> =
            futures::stream::iter(provisioned..milestone)
                .map(|i| {
                    let (layer, org) = (&layer, &orgs[i]);
                    async move {
                        if Instant::now() > deadline {
                            return None;
                        }
                        let mut creds = Credentials::default();
                        layer
                            .ensure(&tenant(org, vec![OrgId::sentinel()]), &mut creds)
                            .await
                            .expect("ensure");
                        Some((i, creds))
                    }
                })
                .buffered(CONCURRENCY)
                .collect()
                .await;
        let elapsed = t.elapsed();
        let calls = layer.api_calls() - calls_before;
        let done: Vec<(usize, Credentials)> = batch.into_iter().map_while(|b| b).collect();
        let stage = done.len();
        provision_time += elapsed;
        provision_calls += calls;
        for (i, c) in done {
            creds_of[i] = Some(c);
        }
        provisioned += stage;
        let policy = layer
            .bucket_policy()
            .await
            .expect("bucket policy")
            .unwrap_or_default();
        println!(
            "organizations {:>5}..{provisioned:<5}: {:.1} ms per organization ({:.1}x baseline), {:.2} calls each; bucket policy now {} bytes",
            provisioned - stage,
            ms(elapsed) / stage.max(1) as f64,
            elapsed.as_secs_f64() / stage.max(1) as f64 / baseline.as_secs_f64(),
            calls as f64 / stage.max(1) as f64,
            policy.len()
        );
        sizes.push((provisioned, policy.len()));
        if provisioned < milestone {
            println!(
                "time limit ({} s) reached after {provisioned} organizations",
                limit.as_secs()
            );
            break;
        }
    }
    let per_org = provision_time / provisioned.max(1) as u32;
    let calls_per_org = provision_calls as f64 / provisioned.max(1) as f64;
    println!(
        "provisioned {provisioned} organizations in {:.1} s ({CONCURRENCY} concurrent): {:.1} ms per organization = {:.1}x baseline, {calls_per_org:.2} API calls per organization",
        provision_time.as_secs_f64(),
        ms(per_org),
        per_org.as_secs_f64() / baseline.as_secs_f64(),
    );

    // Steady state: a second ensure of the sample changes nothing.
    let sample: Vec<usize> = (0..provisioned)
        .step_by((provisioned / VERIFY_SAMPLE).max(1))
        .take(VERIFY_SAMPLE)
        .collect();
    let calls_before = layer.api_calls();
    let t = Instant::now();
    for &i in &sample {
        let mut c = creds_of[i].clone().unwrap_or_default();
        let repairs = layer
            .ensure(&tenant(&orgs[i], vec![OrgId::sentinel()]), &mut c)
            .await
            .expect("ensure again");
        assert!(
            repairs.is_empty(),
            "steady-state ensure repaired something: {repairs:?}"
        );
    }
    let reensure = t.elapsed() / sample.len().max(1) as u32;
    let reensure_calls = (layer.api_calls() - calls_before) as f64 / sample.len().max(1) as f64;
    println!(
        "steady-state ensure: {:.1} ms per organization = {:.1}x baseline, {reensure_calls:.1} API calls",
        ms(reensure),
        reensure.as_secs_f64() / baseline.as_secs_f64()
    );

    // Verification of a sample, each attacking the sentinel and one real peer.
    let calls_before = layer.api_calls();
    let t = Instant::now();
    for &i in &sample {
        let peer = orgs[(i + 1) % provisioned].clone();
        let v = layer
            .verify(
                &tenant(&orgs[i], vec![OrgId::sentinel(), peer]),
                creds_of[i].as_ref().expect("creds"),
            )
            .await
            .expect("verify");
        assert!(v.isolated() && v.verified(), "{:?}", v.failures());
    }
    let verify = t.elapsed() / sample.len().max(1) as u32;
    let verify_calls = (layer.api_calls() - calls_before) as f64 / sample.len().max(1) as f64;
    println!(
        "verify (2 peers): {:.1} ms per organization = {:.1}x baseline, {verify_calls:.1} API calls",
        ms(verify),
        verify.as_secs_f64() / baseline.as_secs_f64()
    );

    let first = sizes.first().map(|s| s.1).unwrap_or(0);
    let constant = sizes.iter().all(|s| s.1 == first);
    println!(
        "bucket policy size constant across {:?}: {constant}",
        sizes.iter().map(|s| s.0).collect::<Vec<_>>()
    );

    // Remove everything.
    let t = Instant::now();
    let calls_before = layer.api_calls();
    futures::stream::iter(0..provisioned)
        .map(|i| {
            let (layer, org) = (&layer, &orgs[i]);
            async move {
                layer
                    .cleanup(&tenant(org, Vec::new()))
                    .await
                    .expect("cleanup")
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let cleanup_calls = (layer.api_calls() - calls_before) as f64 / provisioned.max(1) as f64;
    println!(
        "cleanup (Delete) of {provisioned} organizations: {:.1} s, {cleanup_calls:.1} API calls per organization",
        t.elapsed().as_secs_f64()
    );
    layer
        .delete_prefix(&OrgId::sentinel())
        .await
        .expect("sentinel");
    admin
        .delete_bucket_policy()
        .bucket(&bucket)
        .send()
        .await
        .expect("delete policy");
    admin
        .delete_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("delete bucket");
    assert!(
        constant,
        "the bucket policy grew with the number of organizations"
    );
}
