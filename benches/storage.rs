//! Storage benchmark: `cargo bench --bench storage` against the testbed (`testbed/up`).
//!
//! Provisions storage isolation for 1,000 organizations on the testbed's SeaweedFS, counts the
//! API calls per organization, reads the bucket policy's size at 1, 10, 100 and 1,000
//! organizations (it must not grow), re-ensures and verifies a sample, and removes everything
//! again. The baseline, measured in the same run, is one plain S3 round trip (HeadBucket) as the
//! admin.
//!
//! - `BULKHEAD_BENCH_ORGS` sets the number of organizations (default 1,000);
//! - `BULKHEAD_BENCH_SECONDS` bounds each mode's provisioning (default 900);
//! - `BULKHEAD_BENCH_MODES` lists the storage modes to run, in order, each in its own bucket
//!   (default `user`; `user,session` compares them in one run). `user` makes an IAM user,
//!   managed policy and access key per organization; `session` makes nothing in IAM and
//!   assumes the testbed's session role (`BULKHEAD_S3_SESSION_ROLE_ARN`) once per organization.
//!   Every mode's organizations stay until all modes are provisioned, so a mode that runs after
//!   `user` runs beside its IAM users; then everything is removed.

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
/// Wall-clock bound for one mode's provisioning (`BULKHEAD_BENCH_SECONDS` overrides it).
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

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One stage of provisioning: organizations `from..to`.
struct Stage {
    from: usize,
    to: usize,
    per_org: Duration,
    calls: f64,
    policy_bytes: usize,
}

/// One mode's run, kept until every mode is provisioned.
struct ModeRun {
    mode: String,
    bucket: String,
    layer: StorageLayer,
    orgs: Vec<OrgId>,
    provisioned: usize,
    stages: Vec<Stage>,
    per_org: Duration,
}

struct Bench {
    admin_s3: aws_sdk_s3::Client,
    admin_iam: aws_sdk_iam::Client,
    baseline: Duration,
    n: usize,
    limit: Duration,
    run: u32,
}

impl Bench {
    fn x(&self, d: Duration) -> f64 {
        d.as_secs_f64() / self.baseline.as_secs_f64()
    }

    async fn iam_users(&self) -> String {
        match self.admin_iam.list_users().send().await {
            Ok(out) => format!(
                "{}{}",
                out.users().len(),
                if out.is_truncated() { "+" } else { "" }
            ),
            Err(_) => "?".to_owned(),
        }
    }

    fn spec(&self, mode: &str, bucket: &str) -> StoragePlatform {
        let tb = common::Testbed::get();
        let mut spec = serde_json::json!({
            "endpoint": tb.s3_endpoint(), "region": "us-east-1", "bucket": bucket,
            "adminSecretRef": {"name": "unused"}, "forcePathStyle": true, "mode": mode,
        });
        if mode == "session" {
            spec["sessionRoleArn"] = tb.var("BULKHEAD_S3_SESSION_ROLE_ARN").into();
        }
        serde_json::from_value(spec).expect("spec")
    }

    /// Provisions one mode's organizations, stage by stage, then re-ensures and verifies a sample.
    async fn provision(&self, mode: &str) -> ModeRun {
        let tb = common::Testbed::get();
        let bucket = format!("bh-bench-{}-{mode}", self.run);
        let layer = StorageLayer::connect(
            &self.spec(mode, &bucket),
            tb.s3_access_key(),
            tb.s3_secret_key(),
        )
        .expect("connect");
        println!(
            "\n== mode {mode}: bucket {bucket}, {} IAM users on the server before",
            self.iam_users().await
        );
        layer.prepare().await.expect("prepare");
        let n = self.n;
        let orgs: Vec<OrgId> = (0..n)
            .map(|i| OrgId::parse(&format!("b{}{}-{i}", self.run, &mode[..1])).expect("org id"))
            .collect();
        let deadline = Instant::now() + self.limit;
        let mut run = ModeRun {
            mode: mode.to_owned(),
            bucket,
            layer,
            orgs,
            provisioned: 0,
            stages: Vec::new(),
            per_org: Duration::ZERO,
        };
        let mut creds_of: Vec<Option<Credentials>> = vec![None; n];
        let mut total = Duration::ZERO;
        let mut total_calls = 0u64;
        let milestones: Vec<usize> = [1usize, 10, 100, 200, 500, 1000, n]
            .into_iter()
            .filter(|m| *m <= n)
            .collect();
        for &milestone in &milestones {
            if milestone <= run.provisioned {
                continue;
            }
            let (layer, orgs) = (&run.layer, &run.orgs);
            let calls_before = layer.api_calls();
            let t = Instant::now();
            // In order, so that the organizations provisioned before the deadline are the first ones.
            let batch: Vec<Option<(usize, Credentials)>> =
                futures::stream::iter(run.provisioned..milestone)
                    .map(|i| {
                        let org = &orgs[i];
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
            total += elapsed;
            total_calls += calls;
            for (i, c) in done {
                creds_of[i] = Some(c);
            }
            let policy = layer
                .bucket_policy()
                .await
                .expect("bucket policy")
                .unwrap_or_default();
            let s = Stage {
                from: run.provisioned,
                to: run.provisioned + stage,
                per_org: elapsed / stage.max(1) as u32,
                calls: calls as f64 / stage.max(1) as f64,
                policy_bytes: policy.len(),
            };
            println!(
                "organizations {:>5}..{:<5}: {:.1} ms per organization ({:.1}x baseline), {:.2} calls each; bucket policy now {} bytes",
                s.from,
                s.to,
                ms(s.per_org),
                self.x(s.per_org),
                s.calls,
                s.policy_bytes
            );
            run.provisioned = s.to;
            run.stages.push(s);
            if run.provisioned < milestone {
                println!(
                    "time limit ({} s) reached after {} organizations",
                    self.limit.as_secs(),
                    run.provisioned
                );
                break;
            }
        }
        let provisioned = run.provisioned;
        run.per_org = total / provisioned.max(1) as u32;
        println!(
            "provisioned {provisioned} organizations in {:.1} s ({CONCURRENCY} concurrent): {:.1} ms per organization = {:.1}x baseline, {:.2} API calls per organization",
            total.as_secs_f64(),
            ms(run.per_org),
            self.x(run.per_org),
            total_calls as f64 / provisioned.max(1) as f64,
        );

        // Steady state: a second ensure of the sample changes nothing.
        let layer = &run.layer;
        let sample: Vec<usize> = (0..provisioned)
            .step_by((provisioned / VERIFY_SAMPLE).max(1))
            .take(VERIFY_SAMPLE)
            .collect();
        let calls_before = layer.api_calls();
        let t = Instant::now();
        for &i in &sample {
            let mut c = creds_of[i].clone().unwrap_or_default();
            let repairs = layer
                .ensure(&tenant(&run.orgs[i], vec![OrgId::sentinel()]), &mut c)
                .await
                .expect("ensure again");
            assert!(
                repairs.is_empty(),
                "steady-state ensure repaired something: {repairs:?}"
            );
            assert_eq!(
                Some(&c),
                creds_of[i].as_ref(),
                "steady state changed the credentials"
            );
        }
        let reensure = t.elapsed() / sample.len().max(1) as u32;
        let reensure_calls = (layer.api_calls() - calls_before) as f64 / sample.len().max(1) as f64;
        println!(
            "steady-state ensure: {:.1} ms per organization = {:.1}x baseline, {reensure_calls:.1} API calls",
            ms(reensure),
            self.x(reensure)
        );

        // Verification of a sample, each attacking the sentinel and one real peer.
        let calls_before = layer.api_calls();
        let t = Instant::now();
        for &i in &sample {
            let peer = run.orgs[(i + 1) % provisioned].clone();
            let v = layer
                .verify(
                    &tenant(&run.orgs[i], vec![OrgId::sentinel(), peer]),
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
            self.x(verify)
        );
        let first = run.stages.first().map(|s| s.policy_bytes).unwrap_or(0);
        println!(
            "bucket policy size constant across {:?}: {}",
            run.stages.iter().map(|s| s.to).collect::<Vec<_>>(),
            run.stages.iter().all(|s| s.policy_bytes == first)
        );
        run
    }

    /// Removes one mode's organizations, the sentinel, the policy and the bucket.
    async fn remove(&self, run: &ModeRun) {
        let t = Instant::now();
        let calls_before = run.layer.api_calls();
        futures::stream::iter(0..run.provisioned)
            .map(|i| {
                let (layer, org) = (&run.layer, &run.orgs[i]);
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
        let calls = (run.layer.api_calls() - calls_before) as f64 / run.provisioned.max(1) as f64;
        println!(
            "mode {}: cleanup (Delete) of {} organizations: {:.1} s, {calls:.1} API calls per organization",
            run.mode,
            run.provisioned,
            t.elapsed().as_secs_f64()
        );
        run.layer
            .delete_prefix(&OrgId::sentinel())
            .await
            .expect("sentinel");
        self.admin_s3
            .delete_bucket_policy()
            .bucket(&run.bucket)
            .send()
            .await
            .expect("delete policy");
        self.admin_s3
            .delete_bucket()
            .bucket(&run.bucket)
            .send()
            .await
            .expect("delete bucket");
    }
}

#[tokio::main]
async fn main() {
    let tb = common::Testbed::get();
    let modes: Vec<String> = std::env::var("BULKHEAD_BENCH_MODES")
        .unwrap_or_else(|_| "user".to_owned())
        .split(',')
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .collect();
    for m in &modes {
        assert!(
            m == "user" || m == "session",
            "BULKHEAD_BENCH_MODES: unknown mode {m:?} (user, session)"
        );
    }
    let run = std::process::id() % 100_000;
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
        .credentials_provider(creds.clone())
        .endpoint_url(tb.s3_endpoint())
        .force_path_style(true)
        .build();
    let admin_s3 = aws_sdk_s3::Client::from_conf(conf);
    let iam_conf = aws_sdk_iam::config::Builder::new()
        .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
        .region(aws_sdk_iam::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .endpoint_url(tb.s3_endpoint())
        .build();
    let admin_iam = aws_sdk_iam::Client::from_conf(iam_conf);

    // Baseline: one admin round trip, against a bucket of this run.
    let probe_bucket = format!("bh-bench-{run}-baseline");
    admin_s3
        .create_bucket()
        .bucket(&probe_bucket)
        .send()
        .await
        .expect("baseline bucket");
    let t = Instant::now();
    for _ in 0..BASELINE_CALLS {
        admin_s3
            .head_bucket()
            .bucket(&probe_bucket)
            .send()
            .await
            .expect("HeadBucket");
    }
    let baseline = t.elapsed() / BASELINE_CALLS;
    admin_s3
        .delete_bucket()
        .bucket(&probe_bucket)
        .send()
        .await
        .expect("delete baseline bucket");
    println!(
        "baseline: one S3 round trip (HeadBucket) = {:.2} ms",
        ms(baseline)
    );
    let bench = Bench {
        admin_s3,
        admin_iam,
        baseline,
        n: env_or("BULKHEAD_BENCH_ORGS", 1000),
        limit: Duration::from_secs(env_or("BULKHEAD_BENCH_SECONDS", TIME_LIMIT.as_secs())),
        run,
    };

    let mut runs = Vec::new();
    for mode in &modes {
        runs.push(bench.provision(mode).await);
    }

    if runs.len() > 1 {
        println!(
            "\n| organizations | {} |",
            runs.iter()
                .map(|r| format!("{} ms per organization", r.mode))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let first = &runs[0];
        for (k, s) in first.stages.iter().enumerate() {
            let cells: Vec<String> = runs
                .iter()
                .map(|r| {
                    let Some(o) = r.stages.get(k).filter(|o| o.from == s.from && o.to == s.to)
                    else {
                        return "not reached".to_owned();
                    };
                    let mut cell = format!("{:.1} ({:.0} calls)", ms(o.per_org), o.calls);
                    if r.mode != first.mode {
                        cell.push_str(&format!(
                            "; {} / {} = {:.0}x",
                            first.mode,
                            r.mode,
                            s.per_org.as_secs_f64() / o.per_org.as_secs_f64()
                        ));
                    }
                    cell
                })
                .collect();
            println!("| {} → {} | {} |", s.from, s.to, cells.join(" | "));
        }
        for r in &runs[1..] {
            println!(
                "overall: {} {:.1} ms, {} {:.1} ms per organization: {} takes {:.0}x the time of {}",
                first.mode,
                ms(first.per_org),
                r.mode,
                ms(r.per_org),
                first.mode,
                first.per_org.as_secs_f64() / r.per_org.as_secs_f64(),
                r.mode
            );
        }
    }

    let mut grew = Vec::new();
    for r in &runs {
        bench.remove(r).await;
        let first = r.stages.first().map(|s| s.policy_bytes).unwrap_or(0);
        if r.stages.iter().any(|s| s.policy_bytes != first) {
            grew.push(r.mode.clone());
        }
    }
    assert!(
        grew.is_empty(),
        "the bucket policy grew with the number of organizations in {grew:?}"
    );
}
