//! How bulkhead behaves under GitOps tools and with two replicas, on the testbed's API server.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead::api::{IsolationPlatform, Organization};
use common::{Operator, Testbed, install_crds, unique, wait_for};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

fn kubectl(args: &[&str]) -> std::process::Output {
    let tb = Testbed::get();
    Command::new(format!("{}/kubectl", tb.k8s_bin()))
        .args(args)
        .env("KUBECONFIG", tb.kubeconfig())
        .output()
        .expect("run kubectl")
}

async fn network_platform(client: &kube::Client, name: &str, prefix: &str) {
    let api: Api<IsolationPlatform> = Api::all(client.clone());
    let p: IsolationPlatform = serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform", "metadata": { "name": name },
        "spec": { "network": { "namespaceTemplate": format!("{prefix}-{{orgId}}") }, "verification": { "intervalSeconds": 30 } }
    }))
    .unwrap();
    api.create(&PostParams::default(), &p)
        .await
        .expect("platform");
}

fn is_ready(o: &Organization) -> bool {
    o.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && format!("{:?}", c.status) == "True")
    })
}

async fn wait_ready(api: &Api<Organization>, name: &str, timeout: Duration) -> Organization {
    wait_for(&format!("Organization {name} Ready"), timeout, || {
        let api = api.clone();
        let name = name.to_owned();
        async move { api.get(&name).await.ok().filter(is_ready) }
    })
    .await
}

#[tokio::test]
async fn gitops_apply_sees_no_diff_and_no_conflict() {
    let client = Testbed::get().kube().await;
    install_crds(&client).await;
    let platform = unique("gitops");
    let ns = unique("gitops-op");
    common::ensure_namespace(&client, &ns).await;
    network_platform(&client, &platform, &platform).await;
    let _operator = Operator::start(&platform, &ns);

    let name = unique("gitops-org");
    let manifest = std::env::temp_dir().join(format!("{name}.yaml"));
    std::fs::write(
        &manifest,
        serde_json::to_string(&json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization",
            "metadata": { "name": name, "labels": { "team": "sales" }, "annotations": { "owner": "gitops" } },
            "spec": { "orgId": name, "displayName": "GitOps Org", "platformRef": platform }
        }))
        .unwrap(),
    )
    .unwrap();
    let file = manifest.to_str().unwrap();
    let out = kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=gitops",
        "-f",
        file,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let api: Api<Organization> = Api::all(client.clone());
    let ready = wait_ready(&api, &name, Duration::from_secs(90)).await;
    let generation = ready.metadata.generation;

    let diff = kubectl(&[
        "diff",
        "--server-side",
        "--field-manager=gitops",
        "-f",
        file,
    ]);
    assert_eq!(
        diff.status.code(),
        Some(0),
        "kubectl diff shows changes:\n{}",
        String::from_utf8_lossy(&diff.stdout)
    );
    assert!(diff.stdout.is_empty());

    let again = kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=gitops",
        "-f",
        file,
    ]);
    assert!(
        again.status.success(),
        "second apply conflicted: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    let after = api.get(&name).await.unwrap();
    assert_eq!(
        after.metadata.generation, generation,
        "the re-apply changed the generation"
    );

    // The operator owns status (and its finalizer), never the user's spec, labels or annotations.
    for mf in after.metadata.managed_fields.unwrap_or_default() {
        if mf.manager.as_deref() == Some("gitops") {
            continue;
        }
        let fields = serde_json::to_string(&mf.fields_v1).unwrap();
        for user_owned in ["f:spec", "f:labels", "f:annotations"] {
            assert!(
                !fields.contains(user_owned),
                "manager {:?} owns {user_owned}: {fields}",
                mf.manager
            );
        }
    }

    api.delete(&name, &DeleteParams::default()).await.unwrap();
    common::wait_gone(&api, &name, Duration::from_secs(60)).await;
    let _ = std::fs::remove_file(&manifest);
    Api::<IsolationPlatform>::all(client.clone())
        .delete(&platform, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_standby_takes_over_when_the_leader_is_killed() {
    let client = Testbed::get().kube().await;
    install_crds(&client).await;
    let platform = unique("ha");
    let ns = unique("ha-op");
    common::ensure_namespace(&client, &ns).await;
    network_platform(&client, &platform, &platform).await;
    let lease_seconds = 6u64;
    let args = [
        "--leader-elect",
        "--lease-name",
        "bulkhead-ha",
        "--lease-seconds",
        "6",
    ];
    let mut first = Operator::start_with(&platform, &ns, &args);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = |leases: Api<Lease>| async move {
        leases
            .get_opt("bulkhead-ha")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    };
    let leader1 = wait_for("first leader", Duration::from_secs(30), || {
        holder(leases.clone())
    })
    .await;
    let mut second = Operator::start_with(&platform, &ns, &args);

    let api: Api<Organization> = Api::all(client.clone());
    let make = |name: &str| -> Organization {
        serde_json::from_value(json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization", "metadata": { "name": name },
            "spec": { "orgId": name, "platformRef": platform }
        }))
        .unwrap()
    };
    let a = unique("ha-a");
    api.create(&PostParams::default(), &make(&a)).await.unwrap();
    wait_ready(&api, &a, Duration::from_secs(90)).await;
    // Only the lease holder writes: the standby has reconciled nothing.
    assert!(second.alive());
    assert!(
        !second.log().contains("reconciled"),
        "the standby reconciled:\n{}",
        second.log()
    );
    // The leader logs its pass right after the status write the test saw.
    wait_for("the leader's log line", Duration::from_secs(10), || {
        let seen = first.log().contains("reconciled");
        async move { seen.then_some(()) }
    })
    .await;

    // SIGKILL the leader, then change things while nobody leads.
    first.kill();
    let killed_at = Instant::now();
    let burst: Vec<String> = (0..3).map(|_| unique("ha-burst")).collect();
    for name in &burst {
        api.create(&PostParams::default(), &make(name))
            .await
            .unwrap();
    }
    let leader2 = wait_for(
        "a new leader",
        Duration::from_secs(lease_seconds * 3),
        || {
            let leases = leases.clone();
            let leader1 = leader1.clone();
            async move { holder(leases).await.filter(|h| *h != leader1) }
        },
    )
    .await;
    let takeover = killed_at.elapsed();
    assert!(
        takeover <= Duration::from_secs(lease_seconds + 4),
        "takeover took {takeover:?}, lease duration is {lease_seconds}s"
    );
    for name in &burst {
        wait_ready(&api, name, Duration::from_secs(90)).await;
    }
    assert!(
        second.log().contains("leader lease taken"),
        "{}",
        second.log()
    );
    eprintln!("takeover by {leader2} after {takeover:?}");

    for name in burst.iter().chain([&a]) {
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in burst.iter().chain([&a]) {
        common::wait_gone(&api, name, Duration::from_secs(60)).await;
    }
    second.kill();
    Api::<IsolationPlatform>::all(client.clone())
        .delete(&platform, &DeleteParams::default())
        .await
        .unwrap();
}

/// A testbed directory of its own for `testbed/operator`: it borrows the shared testbed's env
/// file (so the operator talks to the shared API server) but keeps its own pids, logs and env
/// file, so the shared testbed's records are never touched. Dropping it stops what it started.
struct DemoDir {
    dir: std::path::PathBuf,
    platform: String,
    extra: Vec<std::process::Child>,
}

impl DemoDir {
    fn new(platform: &str) -> DemoDir {
        let tb = Testbed::get();
        let dir = std::env::temp_dir().join(unique("bulkhead-demo-op"));
        std::fs::create_dir_all(&dir).unwrap();
        let shared = std::path::Path::new(tb.var("BULKHEAD_TESTBED_DIR")).join("env");
        let text = std::fs::read_to_string(&shared).expect("shared env file");
        let own: String = text
            .lines()
            .filter(|l| !l.starts_with("export BULKHEAD_OPERATOR_"))
            .map(|l| {
                if l.starts_with("export BULKHEAD_TESTBED_DIR=") {
                    format!("export BULKHEAD_TESTBED_DIR={}\n", dir.display())
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(dir.join("env"), own).unwrap();
        DemoDir {
            dir,
            platform: platform.to_owned(),
            extra: vec![],
        }
    }

    /// Runs a program (`testbed/operator ...`, `testbed/env`) from this checkout on this
    /// directory: success, stdout, stderr.
    fn run(&self, program: &str, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("BULKHEAD_TESTBED_DIR", &self.dir)
            .env("BULKHEAD_BIN", env!("CARGO_BIN_EXE_bulkhead"))
            .env("RUST_LOG", "info,kube=warn");
        // Whatever the test process inherited from the shared env file must not mask ours.
        for (k, _) in std::env::vars() {
            if k.starts_with("BULKHEAD_OPERATOR_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd.output().expect("run script");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// What a user gets from `. "$(testbed/env)"`: the operator's pid and metrics URL, and the
    /// body of that URL.
    fn sourced(&self) -> Result<(String, String, String), String> {
        let script = r#". "$(testbed/env)" && printf '%s\n%s\n' "$BULKHEAD_OPERATOR_PID" "$BULKHEAD_OPERATOR_METRICS_URL" && curl -fsS --max-time 5 "$BULKHEAD_OPERATOR_METRICS_URL""#;
        let (ok, out, err) = self.run("bash", &["-c", script]);
        if !ok {
            return Err(format!("{out}{err}"));
        }
        let mut lines = out.splitn(3, '\n');
        let pid = lines.next().unwrap_or_default().to_owned();
        let url = lines.next().unwrap_or_default().to_owned();
        Ok((pid, url, lines.next().unwrap_or_default().to_owned()))
    }

    fn pid(&self) -> u32 {
        std::fs::read_to_string(self.dir.join("pids/operator.pid"))
            .expect("operator pid file")
            .trim()
            .parse()
            .expect("pid")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/operator.log")).unwrap_or_default()
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = self.run("testbed/operator", &["stop"]);
        // Should the script have failed to stop it, the test still leaves nothing behind.
        for pid in operators_of(&self.platform) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        for c in &mut self.extra {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Pids of running `bulkhead run` processes whose command line names `platform`.
fn operators_of(platform: &str) -> Vec<u32> {
    let mut pids = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A zombie has an empty command line and does not count.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.get(1) == Some(&&b"run"[..]) && args.contains(&platform.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `make demo` runs its operator through `testbed/operator restart`. Afterwards `testbed/env`
/// must accept that operator (its command line does not name the testbed directory) and export
/// where it serves /metrics; starting it again must never leave two; and a pid reused by another
/// process must not count as the operator.
#[tokio::test]
async fn the_demo_operator_is_recognised_exported_and_never_doubled() {
    let client = Testbed::get().kube().await;
    install_crds(&client).await;
    let platform = unique("demo-op");
    let ns = unique("demo-op-ns");
    common::ensure_namespace(&client, &ns).await;
    let mut tb = DemoDir::new(&platform);
    let run_args = ["--namespace", ns.as_str(), "--platform", platform.as_str()];
    let op = "testbed/operator";

    // Not up yet: the env file alone is not a running testbed.
    let (ok, _, err) = tb.run("testbed/env", &[]);
    assert!(
        !ok,
        "testbed/env accepted a directory with no processes: {err}"
    );

    // First start: recorded, accepted by testbed/env, metrics URL exported and served.
    let (ok, out, err) = tb.run(op, &[&["start"][..], &run_args].concat());
    assert!(ok, "start failed:\n{err}\n{}", tb.log());
    assert_eq!(out.trim(), tb.dir.join("env").display().to_string());
    let pid1 = tb.pid();
    assert_eq!(operators_of(&platform), vec![pid1], "{err}");
    let (pid, url, body) = tb
        .sourced()
        .unwrap_or_else(|e| panic!(". \"$(testbed/env)\" failed with the operator running:\n{e}"));
    assert_eq!(pid, pid1.to_string());
    let addr = url
        .strip_prefix("http://")
        .and_then(|u| u.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("not a metrics URL: {url:?}"));
    assert!(addr.starts_with("127.0.0.1:"), "{url}");
    assert!(
        body.contains("bulkhead_organizations_ready") && body.contains("# EOF"),
        "{url} served:\n{body}"
    );
    // The URL is the one the operator itself reports.
    assert!(
        tb.log()
            .lines()
            .any(|l| l.contains("serving /metrics") && l.contains(addr)),
        "{addr} not in the operator's log:\n{}",
        tb.log()
    );

    // Second start: the running operator is reused, not doubled.
    let (ok, _, err) = tb.run(op, &[&["start"][..], &run_args].concat());
    assert!(ok, "{err}");
    assert!(err.contains("already running"), "{err}");
    assert_eq!(tb.pid(), pid1);
    assert_eq!(operators_of(&platform), vec![pid1]);

    // What the demo does on every run: restart. The old one is gone before the new one starts.
    let (ok, _, err) = tb.run(op, &[&["restart"][..], &run_args].concat());
    assert!(ok, "restart failed:\n{err}\n{}", tb.log());
    let pid2 = tb.pid();
    assert_ne!(pid2, pid1);
    assert_eq!(operators_of(&platform), vec![pid2], "{err}");
    assert!(
        err.contains(&format!("pid {pid1} replaced by pid {pid2}")),
        "{err}"
    );
    let (pid, _, body) = tb.sourced().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pid, pid2.to_string());
    assert!(body.contains("# EOF"), "{body}");

    // The operator dies and its pid goes to an unrelated process: that is not the operator.
    let killed = Command::new("kill")
        .args(["-KILL", &pid2.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_until("the killed operator gone", Duration::from_secs(10), || {
        operators_of(&platform).is_empty()
    });
    let stranger = Command::new("sleep").arg("120").spawn().unwrap();
    let stranger_pid = stranger.id();
    tb.extra.push(stranger);
    let id_file = tb.dir.join("pids/operator.id");
    let id = std::fs::read_to_string(&id_file).unwrap();
    let (recorded_pid, identity) = id.trim().split_once(' ').unwrap();
    assert_eq!(recorded_pid, pid2.to_string());
    std::fs::write(&id_file, format!("{stranger_pid} {identity}\n")).unwrap();
    std::fs::write(
        tb.dir.join("pids/operator.pid"),
        format!("{stranger_pid}\n"),
    )
    .unwrap();
    let (ok, _, err) = tb.run("testbed/env", &[]);
    assert!(
        !ok && err.contains("operator"),
        "testbed/env took pid {stranger_pid} (sleep) for the operator: {err}"
    );
    let (ok, _, err) = tb.run(op, &["status"]);
    assert!(!ok, "status took the stranger for the operator: {err}");
    let (ok, _, err) = tb.run(op, &[&["start"][..], &run_args].concat());
    assert!(ok, "{err}\n{}", tb.log());
    let pid3 = tb.pid();
    assert_ne!(pid3, stranger_pid);
    assert_eq!(operators_of(&platform), vec![pid3]);
    assert!(
        tb.extra[0].try_wait().unwrap().is_none(),
        "the operator script killed the unrelated process"
    );
    tb.sourced().unwrap_or_else(|e| panic!("{e}"));

    // Stop: nothing left, and the env file no longer points at a dead operator.
    let (ok, _, err) = tb.run(op, &["stop"]);
    assert!(ok, "{err}");
    wait_until("the operator gone", Duration::from_secs(10), || {
        operators_of(&platform).is_empty()
    });
    let env = std::fs::read_to_string(tb.dir.join("env")).unwrap();
    assert!(!env.contains("BULKHEAD_OPERATOR_"), "{env}");
    eprintln!(
        "operator pids: start {pid1}, reuse {pid1}, restart {pid2}, after pid reuse {pid3}; metrics {url}"
    );
    drop(tb);
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}
