//! PostgreSQL over TLS against the testbed: its PostgreSQL serves TLS with a certificate from
//! the testbed's CA (`BULKHEAD_PG_CA`). `verify-full` connects and every probe passes over TLS;
//! a CA that did not sign the server's certificate is refused by name; and a real PostgreSQL
//! without TLS (a second, throwaway cluster) is refused when TLS is required.

mod common;

use common::{TestDb, Testbed};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bulkhead::api::DeletionPolicy;
use bulkhead::api::platform::DatabasePlatform;
use bulkhead::layers::database::connect::{CaBundle, Connector, KEY_CA_CERT, SslMode};
use bulkhead::layers::database::{self, DatabaseLayer, KEY_URL};
use bulkhead::layers::{Credentials, Layer, Verification};
use serde_json::json;

const SEED: &str = r#"
CREATE TABLE projects (id bigserial PRIMARY KEY, org_id text NOT NULL, name text);
CREATE INDEX ON projects (org_id);
CREATE TABLE files (id bigserial PRIMARY KEY, org_id text NOT NULL, key text);
CREATE INDEX ON files (org_id);
"#;

fn spec(db: &TestDb, extra: serde_json::Value) -> DatabasePlatform {
    let mut base = json!({
        "adminUrlSecretRef": {"name": "pg", "key": "url"},
        "rolePrefix": db.role_prefix,
        "groupRole": db.group,
    });
    for (k, v) in extra.as_object().expect("object") {
        base[k] = v.clone();
    }
    serde_json::from_value(base).expect("spec")
}

fn testbed_ca() -> CaBundle {
    let path = Testbed::get().var("BULKHEAD_PG_CA");
    CaBundle {
        pem: std::fs::read_to_string(path).expect("read BULKHEAD_PG_CA"),
        source: "Secret bulkhead/pg-ca key ca.crt".into(),
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA of its own (made with openssl), which signed nothing the testbed serves.
fn wrong_ca(dir: &Path) -> CaBundle {
    run(Command::new("openssl")
        .args(["genpkey", "-algorithm", "EC", "-pkeyopt"])
        .args([
            "ec_paramgen_curve:P-256",
            "-out",
            dir.join("wrong.key").to_str().unwrap(),
        ]));
    run(Command::new("openssl").args([
        "req",
        "-x509",
        "-new",
        "-key",
        dir.join("wrong.key").to_str().unwrap(),
        "-subj",
        "/CN=not-the-testbed-ca",
        "-days",
        "1",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        dir.join("wrong.crt").to_str().unwrap(),
    ]));
    CaBundle {
        pem: std::fs::read_to_string(dir.join("wrong.crt")).expect("read"),
        source: "Secret bulkhead/wrong-ca key ca.crt".into(),
    }
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bh-pgtls-{}", common::unique(tag)));
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

/// `host:port` of the testbed's PostgreSQL.
fn server(url: &str) -> String {
    let after = url.split_once('@').expect("url has @").1;
    after.split_once('/').expect("url has a path").0.to_owned()
}

fn failures(v: &Verification) -> String {
    v.failures().join("\n")
}

#[tokio::test]
async fn verify_full_connects_and_every_probe_passes_over_tls() {
    let db = TestDb::create("tls", SEED).await;
    let ca = testbed_ca();
    let spec = spec(
        &db,
        json!({"sslMode": "verify-full", "caSecretRef": {"name": "pg-ca", "key": "ca.crt"}}),
    );
    let layer = DatabaseLayer::connect_with_ca(&spec, &db.url, Some(ca.clone()))
        .await
        .expect("verify-full against the testbed's certificate")
        .with_audit_ttl(Duration::ZERO);
    layer.prepare().await.expect("prepare");
    let (oa, ob) = (db.org("acme"), db.org("beta"));
    let a = common::tenant_of(&oa, "", &[&ob], DeletionPolicy::Delete);
    let b = common::tenant_of(&ob, "", &[&oa], DeletionPolicy::Delete);
    let (mut ca_a, mut ca_b) = (Credentials::default(), Credentials::default());
    layer.ensure(&a, &mut ca_a).await.expect("ensure a");
    layer.ensure(&b, &mut ca_b).await.expect("ensure b");

    // The tenant's Secret carries the same TLS settings.
    let url = ca_a.get(KEY_URL).expect("url");
    assert!(url.ends_with("?sslmode=verify-full"), "{url}");
    assert_eq!(ca_a.get(KEY_CA_CERT), Some(ca.pem.as_str()));

    for (t, c) in [(&a, &ca_a), (&b, &ca_b)] {
        let v = layer.verify(t, c).await.expect("verify");
        assert!(v.isolated() && v.verified(), "{}", failures(&v));
        let login = v
            .probes
            .iter()
            .find(|p| p.name.starts_with("log in as"))
            .expect("login probe");
        assert!(
            login.detail.contains("over TLS (verify-full)"),
            "{}",
            login.detail
        );
    }

    // The server agrees: every session of the operator in this database is encrypted.
    let admin = db.admin().await;
    let row = admin
        .query_one(
            "SELECT count(*), coalesce(bool_and(s.ssl), false)
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.datname = $1 AND a.application_name = 'bulkhead'",
            &[&db.name],
        )
        .await
        .expect("pg_stat_ssl");
    let (n, all_ssl): (i64, bool) = (row.get(0), row.get(1));
    assert!(n > 0, "no operator session found");
    assert!(all_ssl, "an operator session is not encrypted");

    // The tenant URL with the CA as sslrootcert is what `bulkhead audit` (and libpq) accept.
    let dir = scratch("root");
    let root = dir.join("ca.crt");
    std::fs::write(&root, &ca.pem).expect("write ca");
    let audit_url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url,
        root.display()
    );
    let plain = spec_plain(&db);
    database::run_audit_cli(&audit_url, &plain, false)
        .await
        .expect("audit over verify-full with sslrootcert");

    drop(layer);
    let _ = std::fs::remove_dir_all(dir);
    db.finish().await;
}

fn spec_plain(db: &TestDb) -> DatabasePlatform {
    spec(db, json!({}))
}

#[tokio::test]
async fn a_ca_that_did_not_sign_the_server_certificate_is_refused_by_name() {
    let db = TestDb::create("tlsca", SEED).await;
    let dir = scratch("wrong");
    let wrong = wrong_ca(&dir);
    let server = server(&db.url);
    for mode in ["verify-full", "verify-ca"] {
        let sp = spec(
            &db,
            json!({"sslMode": mode, "caSecretRef": {"name": "wrong-ca", "key": "ca.crt"}}),
        );
        let err = DatabaseLayer::connect_with_ca(&sp, &db.url, Some(wrong.clone()))
            .await
            .expect_err("a wrong CA must be refused")
            .to_string();
        assert!(
            err.contains(&format!(
                "server {server}: certificate not trusted by the CA in Secret bulkhead/wrong-ca key ca.crt"
            )),
            "{mode}: {err}"
        );
    }
    // The right CA in verify-ca mode connects.
    let sp = spec(&db, json!({"sslMode": "verify-ca"}));
    DatabaseLayer::connect_with_ca(&sp, &db.url, Some(testbed_ca()))
        .await
        .expect("verify-ca with the testbed's CA");
    // require does not verify: it encrypts against any certificate.
    let sp = spec(&db, json!({"sslMode": "require"}));
    DatabaseLayer::connect_with_ca(&sp, &db.url, Some(wrong))
        .await
        .expect("require ignores the CA");
    let _ = std::fs::remove_dir_all(dir);
    db.finish().await;
}

/// A second, throwaway PostgreSQL cluster with `ssl = off`, trusting local TCP logins.
struct PlainPostgres {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl PlainPostgres {
    fn start() -> PlainPostgres {
        let bin = Path::new("/usr/lib/postgresql/15/bin");
        let dir = scratch("plainpg");
        let root = nix_is_root();
        let as_pg = |prog: &Path| -> Command {
            if root {
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid=postgres",
                    "--regid=postgres",
                    "--init-groups",
                    "--",
                ])
                .arg(prog);
                c
            } else {
                Command::new(prog)
            }
        };
        if root {
            run(Command::new("chown").arg("postgres:").arg(&dir));
        }
        let data = dir.join("data");
        run(as_pg(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ])
            .stdout(Stdio::null()));
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let child = as_pg(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args([
                "-c",
                "ssl=off",
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ])
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        PlainPostgres { child, dir, port }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Drop for PlainPostgres {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_server_without_tls_is_refused_when_tls_is_required() {
    let pg = PlainPostgres::start();
    let config: tokio_postgres::Config = pg.url().parse().expect("config");
    let plain = Connector::new(SslMode::Disable, None).expect("connector");
    common::wait_for("the plain PostgreSQL", Duration::from_secs(30), || {
        let (plain, config) = (plain.clone(), config.clone());
        async move { plain.connect(&config).await.ok().map(|_| ()) }
    })
    .await;
    let server = format!("127.0.0.1:{}", pg.port);
    for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
        let c = Connector::new(mode, Some(&testbed_ca())).expect("connector");
        let err = c
            .connect(&config)
            .await
            .expect_err("TLS required against a server without TLS must fail");
        assert!(
            err.contains(&format!("server {server} does not support TLS")),
            "{}: {err}",
            mode.as_str()
        );
    }
    // The same through the layer, with the mode taken from the admin URL.
    let spec: DatabasePlatform =
        serde_json::from_value(json!({"adminUrlSecretRef": {"name": "pg", "key": "url"}}))
            .expect("spec");
    let err = DatabaseLayer::connect(&spec, &format!("{}?sslmode=require", pg.url()))
        .await
        .expect_err("sslmode=require against a plain server")
        .to_string();
    assert!(err.contains("does not support TLS"), "{err}");
}

/// The operator reads `caSecretRef`: a CA that did not sign the server's certificate shows in
/// the platform's `DatabaseReady` condition, named; the testbed's CA makes it reachable.
#[tokio::test]
async fn the_platform_condition_names_a_wrong_ca_and_the_right_one_connects() {
    use bulkhead::api::IsolationPlatform;
    use kube::api::{Api, DeleteParams, PostParams};

    let client = Testbed::get().kube().await;
    common::install_crds(&client).await;
    let db = TestDb::create("tlsop", SEED).await;
    let dir = scratch("opwrong");
    let wrong = wrong_ca(&dir);
    let right = testbed_ca();
    let platforms: Api<IsolationPlatform> = Api::all(client.clone());
    let server = server(&db.url);
    for (ca, want_ok) in [(&wrong, false), (&right, true)] {
        let name = common::unique("pgtls");
        let ns = format!("{name}-op");
        common::ensure_namespace(&client, &ns).await;
        common::put_secret(&client, &ns, "pg", &[("url", &db.url)]).await;
        common::put_secret(&client, &ns, "pg-ca", &[("ca.crt", &ca.pem)]).await;
        let p: IsolationPlatform = serde_json::from_value(json!({
            "apiVersion": "bulkhead.dev/v1alpha1", "kind": "IsolationPlatform",
            "metadata": { "name": name },
            "spec": {
                "database": {
                    "adminUrlSecretRef": { "name": "pg", "key": "url" },
                    "rolePrefix": db.role_prefix, "groupRole": db.group,
                    "sslMode": "verify-full",
                    "caSecretRef": { "name": "pg-ca", "key": "ca.crt" }
                },
                "verification": { "intervalSeconds": 20 }
            }
        }))
        .expect("platform");
        platforms
            .create(&PostParams::default(), &p)
            .await
            .expect("create platform");
        let operator = common::Operator::start(&name, &ns);
        let (status, message) = common::wait_for(
            "the DatabaseReady condition",
            Duration::from_secs(60),
            || {
                let platforms = platforms.clone();
                let name = name.clone();
                async move {
                    let p = platforms.get(&name).await.ok()?;
                    let c = p
                        .status?
                        .conditions
                        .into_iter()
                        .find(|c| c.type_ == "DatabaseReady")?;
                    Some((format!("{:?}", c.status), c.message))
                }
            },
        )
        .await;
        if want_ok {
            assert_eq!(status, "True", "{message}\n{}", operator.log());
        } else {
            assert_eq!(status, "False", "{message}");
            assert!(
                message.contains(&format!(
                    "server {server}: certificate not trusted by the CA in Secret {ns}/pg-ca key ca.crt"
                )),
                "{message}"
            );
        }
        drop(operator);
        let _ = platforms.delete(&name, &DeleteParams::default()).await;
    }
    let _ = std::fs::remove_dir_all(dir);
    db.finish().await;
}
