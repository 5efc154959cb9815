//! The chart's Grafana dashboard and PrometheusRule: promtool accepts the rules, the alerts
//! fire on the series they are meant for, and every metric they name is served by a real
//! operator reconciling an Organization on the testbed.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bulkhead::api::{IsolationPlatform, Organization};
use common::{Operator, Testbed, ensure_namespace, install_crds, unique, wait_for};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// promtool, built from the Go module proxy and cached by `testbed/build-promtool`.
fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("BULKHEAD_PROMTOOL") {
        return PathBuf::from(p);
    }
    let out = Command::new(repo().join("testbed/build-promtool"))
        .output()
        .expect("run testbed/build-promtool");
    assert!(
        out.status.success(),
        "testbed/build-promtool failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 path");
    PathBuf::from(stdout.lines().last().expect("promtool path").trim())
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir()
        .join("bulkhead-observability-tests")
        .join(unique("run"));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// The chart rendered with the dashboard and the rules on.
fn rendered() -> Vec<Value> {
    let helm = Path::new(Testbed::get().k8s_bin()).join("helm");
    let out = Command::new(helm)
        .args(["template", "bulkhead", "--namespace", "bulkhead-system"])
        .arg(repo().join("charts/bulkhead"))
        .args([
            "--set",
            "dashboard.enabled=true",
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "prometheusRule.verificationIntervalSeconds=60",
        ])
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

/// The rules file promtool reads: the PrometheusRule's spec.
fn rules_file(dir: &Path) -> PathBuf {
    let docs = rendered();
    let rule = find(&docs, "PrometheusRule");
    let path = dir.join("rules.yaml");
    std::fs::write(&path, serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
    path
}

fn dashboard() -> Value {
    let docs = rendered();
    let cm = find(&docs, "ConfigMap");
    assert_eq!(
        cm["metadata"]["labels"]["grafana_dashboard"], "1",
        "the sidecar's label"
    );
    serde_json::from_str(
        cm["data"]["bulkhead.json"]
            .as_str()
            .expect("dashboard JSON"),
    )
    .expect("the dashboard is JSON")
}

/// Every PromQL expression of the dashboard and the alerts.
fn expressions() -> Vec<String> {
    let dir = scratch();
    let rules: Value =
        serde_yaml::from_str(&std::fs::read_to_string(rules_file(&dir)).unwrap()).unwrap();
    let mut exprs: Vec<String> = rules["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["expr"].as_str().unwrap().to_owned())
        .collect();
    for panel in dashboard()["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    exprs
}

/// The `bulkhead_*` metric names in `expr`, as exposed (with `_total`, `_bucket`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("bulkhead_"))
        .map(str::to_owned)
        .collect()
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run command");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn promtool_accepts_the_rendered_rules() {
    let dir = scratch();
    let (ok, out) = run(Command::new(promtool())
        .args(["check", "rules"])
        .arg(rules_file(&dir)));
    println!("{out}");
    assert!(ok, "promtool check rules: {out}");
    assert!(out.contains("5 rules found"), "{out}");
}

/// promtool's own rule tests: each alert fires on the series it is meant for, and stays quiet
/// on a healthy fleet.
#[test]
fn alerts_fire_on_the_series_they_are_meant_for() {
    let dir = scratch();
    let rules = rules_file(&dir);
    let job = "bulkhead-metrics";
    let tests = json!({
        "rule_files": [rules.to_str().unwrap()],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                { "series": "bulkhead_organizations_probe_failed{layer=\"cache\"}", "values": "0 0 1x20" },
                { "series": "bulkhead_organizations_probe_failed{layer=\"database\"}", "values": "0x22" },
                // 60 s interval, 3 intervals: fires past 180 s, held 5 minutes.
                { "series": "bulkhead_organization_not_ready_max_seconds", "values": "0 0 200+60x20" },
                { "series": "bulkhead_layer_failures_total{layer=\"database\",reason=\"BackendUnreachable\"}", "values": "0 0 1+1x20" },
                { "series": "bulkhead_layer_failures_total{layer=\"cache\",reason=\"ConfigurationError\"}", "values": "0 1+1x21" },
                // 2 intervals of 60 s: past 120 s from 11m, held 5 minutes.
                { "series": "bulkhead_verification_age_max_seconds", "values": "30x10 200+60x11" },
                { "series": format!("up{{job=\"{job}\"}}"), "values": "1x22" },
            ],
            "alert_rule_test": [
                { "eval_time": "1m", "alertname": "BulkheadCrossTenantProbeFailed", "exp_alerts": [] },
                { "eval_time": "3m", "alertname": "BulkheadCrossTenantProbeFailed",
                  "exp_alerts": [{ "exp_labels": { "severity": "critical", "layer": "cache" },
                                   "exp_annotations": {
                    "summary": "A cross-tenant probe of the cache layer was not refused",
                    "description": "1 organization(s) could reach another organization's data in the cache layer at their last verification. `kubectl get organizations` and the IsolationVerified condition name the failing check." } }] },
                { "eval_time": "4m", "alertname": "BulkheadOrganizationNotReady", "exp_alerts": [] },
                { "eval_time": "10m", "alertname": "BulkheadOrganizationNotReady",
                  "exp_alerts": [{ "exp_labels": { "severity": "warning" },
                                   "exp_annotations": {
                    "summary": "An organization has not been Ready for more than 3 verification intervals",
                    "description": "The longest not-Ready organization has been so for 11m 20s; its Ready condition says why." } }] },
                { "eval_time": "10m", "alertname": "BulkheadBackendUnreachable",
                  "exp_alerts": [{ "exp_labels": { "severity": "warning", "layer": "database" },
                                   "exp_annotations": {
                    "summary": "The database backend is unreachable from the operator",
                    "description": "Passes of the database layer fail with BackendUnreachable; the affected organizations' conditions name the server." } }] },
                { "eval_time": "12m", "alertname": "BulkheadVerificationBehind", "exp_alerts": [] },
                { "eval_time": "20m", "alertname": "BulkheadVerificationBehind",
                  "exp_alerts": [{ "exp_labels": { "severity": "warning" },
                                   "exp_annotations": {
                    "summary": "Verification is falling behind its schedule",
                    "description": "An organization was last probed 12m 20s ago, more than 2 intervals of 60 s." } }] },
                { "eval_time": "20m", "alertname": "BulkheadOperatorDown", "exp_alerts": [] },
            ],
        }],
    });
    let path = dir.join("tests.yaml");
    std::fs::write(&path, serde_yaml::to_string(&tests).unwrap()).unwrap();
    // The rules render with the chart's fullname; the test's series use that job name.
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    assert!(
        rules_text.contains(job),
        "job name in the rules: {rules_text}"
    );
    let (ok, out) = run(Command::new(promtool()).args(["test", "rules"]).arg(&path));
    println!("{out}");
    assert!(ok, "promtool test rules: {out}");
}

#[tokio::test]
async fn every_metric_of_the_dashboard_and_alerts_is_served() {
    let named: BTreeSet<String> = expressions().iter().flat_map(|e| metric_names(e)).collect();
    assert!(named.len() >= 8, "metrics named: {named:?}");

    // A real operator with one Organization on a network-only platform, and one repaired drift.
    let tb = Testbed::get();
    let client = tb.kube().await;
    install_crds(&client).await;
    let platform = unique("observe");
    let operator_ns = format!("{platform}-op");
    ensure_namespace(&client, &operator_ns).await;
    let p: IsolationPlatform = serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform",
        "metadata": { "name": platform },
        "spec": { "network": { "namespaceTemplate": format!("{platform}-{{orgId}}") },
                  "verification": { "intervalSeconds": 3600 } }
    }))
    .unwrap();
    let platforms: Api<IsolationPlatform> = Api::all(client.clone());
    platforms.create(&PostParams::default(), &p).await.unwrap();
    let operator = Operator::start(&platform, &operator_ns);
    let base = operator.http_base().await;
    let orgs: Api<Organization> = Api::all(client.clone());
    let name = format!("{platform}-a");
    let o: Organization = serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization", "metadata": { "name": name },
        "spec": { "orgId": name, "platformRef": platform }
    }))
    .unwrap();
    orgs.create(&PostParams::default(), &o).await.unwrap();
    let scrape = |base: String| async move {
        reqwest::get(format!("{base}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()
    };
    wait_for(
        "the Organization Ready in /metrics",
        Duration::from_secs(120),
        || {
            let base = base.clone();
            async move {
                let text = scrape(base).await?;
                text.lines()
                    .any(|l| l == "bulkhead_organizations_ready 1")
                    .then_some(())
            }
        },
    )
    .await;
    let namespace = format!("{platform}-{name}");
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &namespace);
    // One policy: the layer tells a deleted policy from a first apply by the plan's hash on the
    // policies still there.
    policies
        .delete("bulkhead-default-deny", &DeleteParams::default())
        .await
        .unwrap();
    let text = wait_for(
        "a drift repair in /metrics",
        Duration::from_secs(60),
        || {
            let base = base.clone();
            async move {
                let text = scrape(base).await?;
                text.contains("bulkhead_drift_repairs_total{layer=\"network\"} 1")
                    .then_some(text)
            }
        },
    )
    .await;

    let mut missing = Vec::new();
    for metric in &named {
        let served = text
            .lines()
            .any(|l| !l.starts_with('#') && l.starts_with(metric.as_str()));
        println!("{metric:<45} {}", if served { "served" } else { "MISSING" });
        if !served {
            missing.push(metric.clone());
        }
    }
    assert!(missing.is_empty(), "not in /metrics: {missing:?}\n{text}");
    orgs.delete(&name, &DeleteParams::default()).await.unwrap();
    common::wait_gone(&orgs, &name, Duration::from_secs(60)).await;
    platforms
        .delete(&platform, &DeleteParams::default())
        .await
        .unwrap();
}
