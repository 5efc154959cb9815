//! The Helm chart against the testbed's real API server: lint, server-side dry run, install and
//! upgrade, and least privilege proved with the chart's own ServiceAccount token — by what it is
//! refused and by running the operator with it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bulkhead::api::{ConditionStatus, IsolationPlatform, Organization};
use common::{Operator, Testbed, install_crds, unique, wait_for};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

const KUBE_VERSION: &str = "1.36.3";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    repo().join("charts/bulkhead")
}

/// The testbed's kubectl or helm, never one from PATH.
fn tool(name: &str) -> PathBuf {
    Path::new(Testbed::get().k8s_bin()).join(name)
}

/// A scratch directory of this test run.
fn scratch(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join("bulkhead-helm-tests")
        .join(unique(prefix));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// What one command did.
struct Run {
    what: String,
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Self {
        assert!(
            self.ok,
            "`{}` failed\nstdout:\n{}\nstderr:\n{}",
            self.what, self.stdout, self.stderr
        );
        self
    }

    /// Refused by the API server, with `needle` (case-insensitive) in the refusal.
    fn refused(self, needle: &str) -> Self {
        assert!(
            !self.ok,
            "`{}` was allowed but must be refused\nstdout:\n{}",
            self.what, self.stdout
        );
        let said = format!("{}\n{}", self.stdout, self.stderr);
        assert!(
            said.to_lowercase().contains(&needle.to_lowercase()),
            "`{}` failed without {needle:?} in its error:\n{said}",
            self.what,
        );
        self
    }
}

fn run(mut cmd: Command, stdin: Option<&str>) -> Run {
    let what = format!(
        "{} {}",
        Path::new(cmd.get_program())
            .file_name()
            .unwrap_or_default()
            .to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    if let Some(input) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    Run {
        what,
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn helm(args: &[&str]) -> Run {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(args)
        .env("KUBECONFIG", Testbed::get().kubeconfig());
    run(cmd, None)
}

fn kubectl_with(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    let mut cmd = Command::new(tool("kubectl"));
    cmd.args(args).env("KUBECONFIG", kubeconfig);
    run(cmd, stdin)
}

/// kubectl as the testbed's admin.
fn kubectl(args: &[&str]) -> Run {
    kubectl_with(Path::new(Testbed::get().kubeconfig()), args, None)
}

/// `helm template` of the chart with extra arguments (`--set`, `-f`).
fn template(release: &str, namespace: &str, extra: &[&str]) -> Run {
    let chart = chart();
    let mut args = vec![
        "template",
        release,
        chart.to_str().expect("utf-8 path"),
        "-n",
        namespace,
    ];
    args.extend(["--kube-version", KUBE_VERSION]);
    args.extend(extra);
    helm(&args)
}

/// The documents of a rendered chart.
fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn container_args(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("container args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect()
}

/// A values file with a full platform block, credentials only as Secret references.
fn platform_values(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join("platform.yaml");
    let values = format!(
        r#"platform:
  enabled: true
  name: {name}
  spec:
    database:
      adminUrlSecretRef: {{ name: bulkhead-postgres, key: url }}
      identityMode: role
      overrides:
        - {{ table: skills, sharedReadColumn: scope, sharedReadValue: system }}
    storage:
      endpoint: http://127.0.0.1:8333
      bucket: tenant-uploads
      forcePathStyle: true
      adminSecretRef: {{ name: bulkhead-s3 }}
    cache:
      adminUrlSecretRef: {{ name: bulkhead-redis, key: url }}
    network:
      namespaceTemplate: "org-{{orgId}}"
      ingressNamespaces: [gateway]
    verification:
      intervalSeconds: 120
"#
    );
    std::fs::write(&path, values).expect("write values");
    path
}

/// A Helm release in its own namespace, uninstalled (and the namespace deleted) on drop.
struct Release {
    name: String,
    namespace: String,
}

impl Release {
    fn install(prefix: &str, extra: &[&str]) -> Release {
        let release = Release {
            name: unique(prefix),
            namespace: unique("bulkhead-sys"),
        };
        let chart = chart();
        let mut args = vec![
            "install",
            &release.name,
            chart.to_str().expect("utf-8 path"),
            "-n",
            &release.namespace,
            "--create-namespace",
        ];
        args.extend(extra);
        helm(&args).ok();
        release
    }

    /// The chart's fullname: the release name, which contains the chart name.
    fn fullname(&self) -> &str {
        &self.name
    }

    fn deployment(&self) -> Value {
        let out = kubectl(&[
            "get",
            "deployment",
            &self.name,
            "-n",
            &self.namespace,
            "-o",
            "json",
        ])
        .ok();
        serde_json::from_str(&out.stdout).expect("deployment json")
    }

    /// A kubeconfig authenticated as the chart's ServiceAccount, with a TokenRequest token.
    fn service_account_kubeconfig(&self, dir: &Path) -> PathBuf {
        let token = kubectl(&[
            "create",
            "token",
            self.fullname(),
            "-n",
            &self.namespace,
            "--duration=1h",
        ])
        .ok();
        let token = token.stdout.trim().to_owned();
        assert!(!token.is_empty(), "TokenRequest returned no token");
        let admin: serde_yaml::Value = serde_yaml::from_str(
            &std::fs::read_to_string(Testbed::get().kubeconfig()).expect("admin kubeconfig"),
        )
        .expect("admin kubeconfig yaml");
        let cluster = serde_json::to_value(&admin["clusters"][0]["cluster"]).expect("cluster");
        assert!(
            cluster["server"].is_string(),
            "the testbed kubeconfig names no server"
        );
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "testbed", "cluster": cluster }],
            "users": [{ "name": "operator", "user": { "token": token } }],
            "contexts": [{ "name": "operator", "context": { "cluster": "testbed", "user": "operator", "namespace": self.namespace } }],
            "current-context": "operator",
        });
        let path = dir.join("operator.kubeconfig");
        std::fs::write(
            &path,
            serde_yaml::to_string(&config).expect("kubeconfig yaml"),
        )
        .expect("write kubeconfig");
        path
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = helm(&["uninstall", &self.name, "-n", &self.namespace]);
        let _ = kubectl(&[
            "delete",
            "namespace",
            &self.namespace,
            "--wait=false",
            "--ignore-not-found",
        ]);
    }
}

/// `kubectl auth can-i` as `kubeconfig`: true for "yes".
fn can_i(kubeconfig: &Path, args: &[&str]) -> bool {
    let mut all = vec!["auth", "can-i"];
    all.extend(args);
    let out = kubectl_with(kubeconfig, &all, None);
    match out.stdout.trim() {
        "yes" => true,
        "no" => false,
        other => panic!("`{}` answered {other:?}: {}", out.what, out.stderr),
    }
}

fn rolebinding_yaml(
    name: &str,
    namespace: &str,
    cluster_role: &str,
    sa: &str,
    sa_namespace: &str,
) -> String {
    serde_yaml::to_string(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": { "name": name, "namespace": namespace },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role },
        "subjects": [{ "kind": "ServiceAccount", "name": sa, "namespace": sa_namespace }],
    }))
    .expect("rolebinding yaml")
}

/// Creates a RoleBinding as `kubeconfig`, on the server but without persisting it.
fn try_bind(
    kubeconfig: &Path,
    namespace: &str,
    cluster_role: &str,
    sa: &str,
    sa_namespace: &str,
) -> Run {
    let body = rolebinding_yaml(&unique("probe"), namespace, cluster_role, sa, sa_namespace);
    kubectl_with(
        kubeconfig,
        &["create", "--dry-run=server", "-f", "-"],
        Some(&body),
    )
}

fn try_patch_crd(kubeconfig: &Path) -> Run {
    kubectl_with(
        kubeconfig,
        &[
            "patch",
            "customresourcedefinition",
            "organizations.bulkhead.dev",
            "--type=merge",
            "-p",
            r#"{"metadata":{"annotations":{"bulkhead.dev/rbac-probe":"x"}}}"#,
            "--dry-run=server",
        ],
        None,
    )
}

// ---------------------------------------------------------------------------------------------
// Without the API server.
// ---------------------------------------------------------------------------------------------

#[test]
fn chart_crds_are_identical_to_the_crds_dir() {
    let canonical =
        std::fs::read(repo().join("crds/bulkhead.dev.yaml")).expect("crds/bulkhead.dev.yaml");
    let in_chart = std::fs::read(chart().join("crds/bulkhead.dev.yaml"))
        .expect("charts/bulkhead/crds/bulkhead.dev.yaml");
    assert!(
        canonical == in_chart,
        "charts/bulkhead/crds/bulkhead.dev.yaml differs from crds/bulkhead.dev.yaml: run `make crds`"
    );
    let chart_yaml = std::fs::read_to_string(chart().join("Chart.yaml")).expect("Chart.yaml");
    assert!(
        chart_yaml.contains(&format!("appVersion: \"{}\"", env!("CARGO_PKG_VERSION"))),
        "Chart.yaml's appVersion must be the crate version {}",
        env!("CARGO_PKG_VERSION")
    );
}

/// The JSON schema of `platform.spec` in values.schema.json: the IsolationPlatform's OpenAPI
/// schema with every object closed (`additionalProperties: false`), so that no value outside the
/// CRD's fields — such as a literal password — can be given.
fn values_schema_of(crd_schema: &Value) -> Value {
    match crd_schema {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                match k.as_str() {
                    k if k.starts_with("x-kubernetes-") => {}
                    "nullable" | "format" | "title" => {}
                    "properties" => {
                        let props = v
                            .as_object()
                            .expect("properties")
                            .iter()
                            .map(|(name, s)| (name.clone(), values_schema_of(s)))
                            .collect();
                        out.insert(k.clone(), Value::Object(props));
                    }
                    "items" | "additionalProperties" if v.is_object() => {
                        out.insert(k.clone(), values_schema_of(v));
                    }
                    _ => {
                        out.insert(k.clone(), v.clone());
                    }
                }
            }
            if map.get("nullable") == Some(&Value::Bool(true))
                && let Some(t) = out.get("type").cloned()
            {
                out.insert("type".into(), json!([t, "null"]));
            }
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

#[test]
fn values_schema_of_the_platform_is_the_crd_schema() {
    let crd = bulkhead::api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "IsolationPlatform")
        .expect("platform crd");
    let crd = serde_json::to_value(&crd).expect("crd json");
    let want = values_schema_of(
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"],
    );
    let path = chart().join("values.schema.json");
    let mut schema: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("values.schema.json"))
            .expect("json");
    let have = &schema["properties"]["platform"]["properties"]["spec"];
    if *have != want {
        if std::env::var_os("BULKHEAD_BLESS").is_some() {
            schema["properties"]["platform"]["properties"]["spec"] = want;
            let text = serde_json::to_string_pretty(&schema).expect("pretty") + "\n";
            std::fs::write(&path, text).expect("write values.schema.json");
            return;
        }
        panic!(
            "values.schema.json's platform.spec is not the IsolationPlatform schema: run `BULKHEAD_BLESS=1 cargo test --test helm values_schema`"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// With the testbed's helm (and, from here on, its API server).
// ---------------------------------------------------------------------------------------------

#[test]
fn helm_lint_strict_passes() {
    let dir = scratch("lint");
    let values = platform_values(&dir, "default");
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    let kv = ["--kube-version", KUBE_VERSION];
    helm(&[&["lint", "--strict", chart][..], &kv].concat()).ok();
    helm(&[&["lint", "--strict", chart, "--set", "replicas=2"][..], &kv].concat()).ok();
    helm(
        &[
            &[
                "lint",
                "--strict",
                chart,
                "-f",
                values.to_str().expect("utf-8"),
            ][..],
            &kv,
        ]
        .concat(),
    )
    .ok();
    helm(&[&["lint", "--strict", chart, "--set", "rbac.manageCrds=true,rbac.watchSecretsClusterWide=true,serviceMonitor.enabled=true"][..], &kv].concat())
        .ok();
    // Lint fails on a value the schema does not know, so it can fail at all.
    helm(&[&["lint", "--strict", chart, "--set", "replica=2"][..], &kv].concat())
        .refused("replica");
}

#[test]
fn platform_values_take_credentials_only_from_secrets() {
    let dir = scratch("platform-values");
    let cases: [(&str, &str); 5] = [
        // A field the IsolationPlatform does not have: the values schema is closed.
        (
            "platform:\n  enabled: true\n  spec:\n    database:\n      adminUrl: postgres://admin:hunter2@db:5432/app\n      adminUrlSecretRef: { name: pg, key: url }\n",
            "adminUrl",
        ),
        // A password inside a field that is a URL.
        (
            "platform:\n  enabled: true\n  spec:\n    storage:\n      endpoint: http://admin:hunter2@s3:8333\n      bucket: tenant-uploads\n      adminSecretRef: { name: s3 }\n",
            "password",
        ),
        // No Secret reference at all.
        (
            "platform:\n  enabled: true\n  spec:\n    cache:\n      keyPrefix: \"org:{orgId}:\"\n",
            "adminUrlSecretRef",
        ),
        (
            "platform:\n  enabled: true\n  spec:\n    database:\n      adminUrlSecretRef: { name: pg }\n",
            "key",
        ),
        // A Secret the operator could not read.
        (
            "platform:\n  enabled: true\n  spec:\n    database:\n      adminUrlSecretRef: { name: pg, key: url, namespace: kube-system }\n",
            "release namespace",
        ),
    ];
    for (i, (values, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad-{i}.yaml"));
        std::fs::write(&path, values).expect("write values");
        let out = template(
            "bulkhead",
            "bulkhead-system",
            &["-f", path.to_str().expect("utf-8")],
        )
        .refused(needle);
        assert!(
            !format!("{}{}", out.stdout, out.stderr).contains("hunter2"),
            "the refusal repeats the password: {}",
            out.stderr
        );
    }
    // The same shape with references renders the platform, named as asked.
    let good = platform_values(&dir, "shared");
    let out = template(
        "bulkhead",
        "bulkhead-system",
        &["-f", good.to_str().expect("utf-8")],
    )
    .ok();
    let docs = documents(&out.stdout);
    let platform = find(&docs, "IsolationPlatform", "shared").expect("rendered IsolationPlatform");
    assert_eq!(
        platform["spec"]["database"]["adminUrlSecretRef"]["name"],
        "bulkhead-postgres"
    );
    let parsed: IsolationPlatform =
        serde_json::from_value(platform.clone()).expect("a valid IsolationPlatform");
    assert_eq!(parsed.spec.verification.interval_seconds, 120);
}

#[test]
fn rendered_objects_follow_the_values() {
    let docs = documents(&template("bulkhead", "bulkhead-system", &[]).ok().stdout);
    let deploy = find(&docs, "Deployment", "bulkhead").expect("Deployment");
    let args = container_args(deploy);
    assert_eq!(
        args,
        [
            "run",
            "--namespace",
            "bulkhead-system",
            "--metrics-addr",
            "0.0.0.0:8080",
            "--concurrency",
            "8",
            "--log-json",
            "--namespace-role",
            "bulkhead-namespace",
            "--service-account",
            "bulkhead"
        ]
    );
    let pod = &deploy["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(
        c["image"],
        format!(
            "ghcr.io/bulkhead-dev/bulkhead:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(pod["serviceAccountName"], "bulkhead");
    assert!(
        c["resources"]["requests"]["memory"].is_string()
            && c["resources"]["limits"]["memory"].is_string()
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let env: Vec<&str> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(env, ["POD_NAME", "POD_NAMESPACE", "RUST_LOG"]);
    assert_eq!(
        deploy["spec"]["strategy"]["type"], "Recreate",
        "one replica without a lease never overlaps"
    );
    assert!(
        docs.iter().all(|d| d["kind"] != "PodDisruptionBudget"),
        "no PDB for one replica"
    );
    assert!(docs.iter().all(|d| d["kind"] != "ServiceMonitor"));
    assert!(docs.iter().all(|d| d["kind"] != "IsolationPlatform"));

    // Default RBAC: no Secret rule in the ClusterRole; bind only on the namespace role, which no
    // rendered binding grants.
    let role = find(&docs, "ClusterRole", "bulkhead").expect("ClusterRole");
    let rules = role["rules"].as_array().expect("rules");
    assert!(!rules.iter().any(|r| {
        r["resources"]
            .as_array()
            .is_some_and(|res| res.iter().any(|x| x == "secrets"))
    }));
    assert!(!rules.iter().any(|r| {
        r["apiGroups"]
            .as_array()
            .is_some_and(|g| g.iter().any(|x| x == "apiextensions.k8s.io"))
    }));
    let bind: Vec<&Value> = rules
        .iter()
        .filter(|r| {
            r["verbs"]
                .as_array()
                .is_some_and(|v| v.iter().any(|x| x == "bind"))
        })
        .collect();
    assert_eq!(bind.len(), 1);
    assert_eq!(bind[0]["resourceNames"], json!(["bulkhead-namespace"]));
    assert!(rules.iter().all(|r| {
        !r["verbs"]
            .as_array()
            .is_some_and(|v| v.iter().any(|x| x == "*" || x == "escalate"))
    }));
    assert!(docs.iter().all(
        |d| !(d["kind"].as_str().is_some_and(|k| k.ends_with("Binding"))
            && d["roleRef"]["name"] == "bulkhead-namespace")
    ));
    assert!(find(&docs, "ValidatingAdmissionPolicy", "bulkhead-guard").is_some());

    // Every flag the chart passes is one the binary accepts.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--help"])
        .output()
        .expect("run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let ha = documents(
        &template(
            "bulkhead",
            "bulkhead-system",
            &["--set", "replicas=2,rbac.watchSecretsClusterWide=true"],
        )
        .ok()
        .stdout,
    );
    let ha_deploy = find(&ha, "Deployment", "bulkhead").expect("Deployment");
    let ha_args = container_args(ha_deploy);
    for flag in args.iter().chain(&ha_args).filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(flag.as_str()),
            "`bulkhead run` has no flag {flag}:\n{help}"
        );
    }

    // Two replicas: leader election forced on, a PDB, rolling updates; cluster-wide Secret reads
    // and --watch-secrets only together.
    assert!(
        ha_args
            .windows(3)
            .any(|w| w == ["--leader-elect", "--lease-name", "bulkhead-leader"]),
        "{ha_args:?}"
    );
    assert!(ha_args.contains(&"--watch-secrets".to_owned()));
    assert_eq!(ha_deploy["spec"]["replicas"], 2);
    assert_eq!(ha_deploy["spec"]["strategy"]["type"], "RollingUpdate");
    assert!(find(&ha, "PodDisruptionBudget", "bulkhead").is_some());
    let ha_rules = find(&ha, "ClusterRole", "bulkhead").expect("ClusterRole")["rules"].clone();
    let secret_rule = ha_rules
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["resources"] == json!(["secrets"]))
        .expect("cluster-wide secrets rule");
    assert_eq!(secret_rule["verbs"], json!(["get", "list", "watch"]));
}

#[tokio::test]
async fn rendered_chart_passes_a_server_side_dry_run() {
    let client = Testbed::get().kube().await;
    install_crds(&client).await;
    let ns = unique("bulkhead-dry");
    kubectl(&["create", "namespace", &ns]).ok();
    let dir = scratch("dry-run");
    let values = platform_values(&dir, &unique("dry-platform"));
    let release = unique("bulkhead-dry");
    let variants: [Vec<&str>; 3] = [
        vec!["--include-crds"],
        vec!["--set", "replicas=2", "-f", values.to_str().expect("utf-8")],
        vec![
            "--set",
            "rbac.watchSecretsClusterWide=true,rbac.manageCrds=true,rbac.bindingGuard.enabled=false,serviceAccount.name=ops",
        ],
    ];
    let mut results = Vec::new();
    for extra in &variants {
        let rendered = template(&release, &ns, extra).ok();
        let applied = kubectl_with(
            Path::new(Testbed::get().kubeconfig()),
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&rendered.stdout),
        );
        results.push((extra.join(" "), applied));
    }
    let _ = kubectl(&["delete", "namespace", &ns, "--wait=false"]);
    for (extra, applied) in results {
        let applied = applied.ok();
        assert!(
            applied.stdout.contains("(server dry run)"),
            "{extra}: {}",
            applied.stdout
        );
        assert!(
            applied.stdout.contains("deployment.apps/"),
            "{extra}: {}",
            applied.stdout
        );
    }
}

#[tokio::test]
async fn helm_install_and_upgrade_against_the_api_server() {
    let client = Testbed::get().kube().await;
    install_crds(&client).await;
    let release = Release::install("bulkhead-helm", &[]);
    let args = container_args(&release.deployment());
    assert!(
        args.windows(2).any(|w| w == ["--concurrency", "8"]),
        "{args:?}"
    );
    for kind in ["serviceaccount", "role", "rolebinding", "service"] {
        kubectl(&[
            "get",
            kind,
            "-n",
            &release.namespace,
            "-l",
            &format!("app.kubernetes.io/instance={}", release.name),
            "-o",
            "name",
        ])
        .ok();
    }
    kubectl(&[
        "get",
        "clusterrole",
        release.fullname(),
        &format!("{}-namespace", release.fullname()),
    ])
    .ok();

    let chart = chart();
    helm(&[
        "upgrade",
        &release.name,
        chart.to_str().expect("utf-8"),
        "-n",
        &release.namespace,
        "--set",
        "concurrency=3,replicas=2",
    ])
    .ok();
    let args = container_args(&release.deployment());
    assert!(
        args.windows(2).any(|w| w == ["--concurrency", "3"]),
        "{args:?}"
    );
    assert!(args.contains(&"--leader-elect".to_owned()), "{args:?}");
    kubectl(&[
        "get",
        "poddisruptionbudget",
        &release.name,
        "-n",
        &release.namespace,
    ])
    .ok();
    let history = helm(&[
        "history",
        &release.name,
        "-n",
        &release.namespace,
        "-o",
        "json",
    ])
    .ok();
    let history: Value = serde_json::from_str(&history.stdout).expect("history json");
    assert_eq!(history.as_array().map(Vec::len), Some(2), "{history}");

    helm(&["uninstall", &release.name, "-n", &release.namespace]).ok();
    let gone = kubectl(&[
        "get",
        "clusterrole",
        release.fullname(),
        "--ignore-not-found",
        "-o",
        "name",
    ])
    .ok();
    assert!(
        gone.stdout.trim().is_empty(),
        "the ClusterRole outlived the release"
    );
    kubectl(&["get", "crd", "organizations.bulkhead.dev"]).ok();
}

fn org_body(name: &str, org_id: &str, platform: &str) -> Organization {
    serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "Organization",
        "metadata": { "name": name },
        "spec": { "orgId": org_id, "platformRef": platform },
    }))
    .expect("organization")
}

#[tokio::test]
async fn the_service_account_has_least_privilege_and_runs_the_operator() {
    let tb = Testbed::get();
    let client = tb.kube().await;
    install_crds(&client).await;
    let release = Release::install("bulkhead-rbac", &[]);
    let dir = scratch("rbac");
    let sa_config = release.service_account_kubeconfig(&dir);
    let (ns, sa, ns_role) = (
        release.namespace.as_str(),
        release.fullname(),
        format!("{}-namespace", release.fullname()),
    );

    // No Secret outside the namespaces it manages.
    assert!(!can_i(&sa_config, &["get", "secrets", "-n", "kube-system"]));
    assert!(!can_i(&sa_config, &["list", "secrets", "--all-namespaces"]));
    kubectl_with(&sa_config, &["get", "secrets", "-n", "kube-system"], None).refused("forbidden");
    kubectl_with(&sa_config, &["get", "secrets", "-n", ns], None).ok();
    assert!(
        !can_i(&sa_config, &["create", "secrets", "-n", ns]),
        "platform Secrets are read-only to the operator"
    );
    // No CRD changes.
    try_patch_crd(&sa_config).refused("forbidden");
    // No escalation: it can bind exactly one role, and only as the guard allows.
    try_bind(&sa_config, ns, "cluster-admin", sa, ns).refused("forbidden");
    // RBAC allows the namespace role to be bound anywhere; the admission guard narrows it. The
    // API server loads a new policy within seconds: wait for it, then every check must hold.
    assert!(can_i(
        &sa_config,
        &["create", "rolebindings", "-n", "kube-system"]
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while try_bind(&sa_config, "kube-system", &ns_role, sa, ns).ok
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    try_bind(&sa_config, "kube-system", &ns_role, sa, ns)
        .refused("namespaces owned by an Organization");
    try_bind(&sa_config, ns, &ns_role, sa, ns).refused("namespaces owned by an Organization");
    // Binding a role it fully holds is no escalation to RBAC; the guard still allows only one.
    try_bind(&sa_config, ns, sa, sa, ns)
        .refused("may only create, change or delete RoleBindings of ClusterRole");
    // Namespaces it does not own: it can neither label (and so adopt) nor delete them.
    let foreign = unique("foreign");
    kubectl(&["create", "namespace", &foreign]).ok();
    let label = kubectl_with(
        &sa_config,
        &[
            "label",
            "namespace",
            &foreign,
            "app.kubernetes.io/managed-by=bulkhead",
            "--dry-run=server",
        ],
        None,
    );
    let delete = kubectl_with(
        &sa_config,
        &["delete", "namespace", &foreign, "--dry-run=server"],
        None,
    );
    kubectl(&["delete", "namespace", &foreign, "--wait=false"]).ok();
    label.refused("owned by an Organization");
    delete.refused("owned by an Organization");
    // Pods (network.trafficProbe): read anywhere, created only through the namespace role that
    // the operator binds in organizations' namespaces.
    assert!(can_i(&sa_config, &["list", "pods", "--all-namespaces"]));
    assert!(!can_i(&sa_config, &["create", "pods", "-n", "kube-system"]));
    assert!(!can_i(&sa_config, &["create", "pods", "-n", ns]));
    assert!(!can_i(&sa_config, &["delete", "pods", "-n", "kube-system"]));
    // The Lease of leader election, in its own namespace only.
    assert!(can_i(
        &sa_config,
        &["create", "leases.coordination.k8s.io", "-n", ns]
    ));
    assert!(!can_i(
        &sa_config,
        &["create", "leases.coordination.k8s.io", "-n", "kube-system"]
    ));

    // The operator, as this ServiceAccount, with the chart's own flags, provisions an organization.
    let chart_args = container_args(&release.deployment());
    let mut extra: Vec<&str> = Vec::new();
    let mut it = chart_args.iter().skip(1);
    while let Some(a) = it.next() {
        // start_with_kubeconfig sets these three for the test; the rest are the chart's.
        if matches!(a.as_str(), "--namespace" | "--metrics-addr" | "--platform") {
            it.next();
        } else {
            extra.push(a);
        }
    }
    assert!(
        extra.contains(&"--namespace-role") && extra.contains(&"--service-account"),
        "{extra:?}"
    );
    let platform = unique("rbac-platform");
    let org_id = unique("rbac");
    let template = format!("{org_id}-{{orgId}}");
    let platforms: Api<IsolationPlatform> = Api::all(client.clone());
    let p: IsolationPlatform = serde_json::from_value(json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform",
        "metadata": { "name": platform },
        "spec": { "network": { "namespaceTemplate": template } },
    }))
    .expect("platform");
    platforms
        .create(&PostParams::default(), &p)
        .await
        .expect("create platform");
    let mut operator = Operator::start_with_kubeconfig(&platform, ns, &extra, &sa_config);

    let orgs: Api<Organization> = Api::all(client.clone());
    orgs.create(
        &PostParams::default(),
        &org_body(&org_id, &org_id, &platform),
    )
    .await
    .expect("create organization");
    let ready = wait_for(
        "the Organization to be Ready under the ServiceAccount",
        Duration::from_secs(120),
        || {
            let orgs = orgs.clone();
            let org_id = org_id.clone();
            let alive = operator.alive();
            async move {
                assert!(alive, "the operator exited");
                let o = orgs.get(&org_id).await.ok()?;
                let ready = o
                    .status
                    .as_ref()?
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Ready")?
                    .clone();
                (ready.status == ConditionStatus::True).then_some(o)
            }
        },
    )
    .await;
    let org_ns = ready
        .status
        .as_ref()
        .and_then(|s| s.namespace.clone())
        .expect("status.namespace");
    assert_eq!(org_ns, format!("{org_id}-{org_id}"));
    let secret_name = ready
        .status
        .as_ref()
        .and_then(|s| s.credentials_secret.clone())
        .expect("status.credentialsSecret");
    Api::<Secret>::namespaced(client.clone(), &org_ns)
        .get(&secret_name)
        .await
        .expect("credentials Secret in the org namespace");
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &org_ns);
    let own = bindings
        .list(&Default::default())
        .await
        .expect("rolebindings");
    assert!(
        own.items.iter().any(|b| b.role_ref.name == ns_role),
        "the operator bound its namespace role in {org_ns}"
    );

    // Inside an organization's namespace: the namespace role to itself, and nothing else.
    try_bind(&sa_config, &org_ns, &ns_role, sa, ns).ok();
    try_bind(&sa_config, &org_ns, "cluster-admin", sa, ns).refused("forbidden");
    try_bind(&sa_config, &org_ns, &ns_role, "intruder", ns)
        .refused("only to its own ServiceAccount");
    assert!(can_i(&sa_config, &["get", "secrets", "-n", &org_ns]));

    orgs.delete(&org_id, &DeleteParams::default())
        .await
        .expect("delete organization");
    wait_for(
        "the Organization to be gone",
        Duration::from_secs(120),
        || {
            let (orgs, org_id) = (orgs.clone(), org_id.clone());
            async move { orgs.get_opt(&org_id).await.ok()?.is_none().then_some(()) }
        },
    )
    .await;
    operator.kill();
    let log = operator.log();
    assert!(!log.contains("panicked"), "operator log:\n{log}");
    let _ = platforms.delete(&platform, &DeleteParams::default()).await;
}

#[tokio::test]
async fn optional_permissions_follow_the_values() {
    let client = Testbed::get().kube().await;
    install_crds(&client).await;
    let dir = scratch("rbac-options");
    let release = Release::install(
        "bulkhead-opts",
        &[
            "--set",
            "rbac.manageCrds=true,rbac.watchSecretsClusterWide=true,rbac.bindingGuard.enabled=false",
        ],
    );
    let sa_config = release.service_account_kubeconfig(&dir);
    let (ns, sa, ns_role) = (
        release.namespace.as_str(),
        release.fullname(),
        format!("{}-namespace", release.fullname()),
    );

    // rbac.manageCrds: its own two CRDs, no other.
    try_patch_crd(&sa_config).ok();
    assert!(can_i(
        &sa_config,
        &[
            "patch",
            "customresourcedefinitions.apiextensions.k8s.io/isolationplatforms.bulkhead.dev"
        ]
    ));
    assert!(!can_i(
        &sa_config,
        &[
            "patch",
            "customresourcedefinitions.apiextensions.k8s.io/widgets.example.com"
        ]
    ));
    assert!(!can_i(
        &sa_config,
        &["create", "customresourcedefinitions.apiextensions.k8s.io"]
    ));
    // rbac.watchSecretsClusterWide: reads, never writes, and the flag that uses it.
    assert!(can_i(
        &sa_config,
        &["watch", "secrets", "-n", "kube-system"]
    ));
    assert!(!can_i(
        &sa_config,
        &["create", "secrets", "-n", "kube-system"]
    ));
    assert!(container_args(&release.deployment()).contains(&"--watch-secrets".to_owned()));
    // Without the guard, RBAC alone lets the namespace role be bound anywhere: the residual risk
    // that rbac.bindingGuard closes. cluster-admin stays out of reach either way.
    try_bind(&sa_config, "kube-system", &ns_role, sa, ns).ok();
    try_bind(&sa_config, "kube-system", "cluster-admin", sa, ns).refused("forbidden");
}
