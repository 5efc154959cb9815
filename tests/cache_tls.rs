//! Cache layer over TLS against the testbed's Redis TLS port (`BULKHEAD_REDIS_TLS_URL`, a
//! certificate signed by the testbed's CA in `BULKHEAD_REDIS_CA`): the layer provisions, the
//! organization's `REDIS_URL` is `rediss://` and carries the CA, every probe passes over TLS, and
//! a wrong CA or a plain port is refused with an error that names the server and no password.

mod common;

use std::process::Command;

use bulkhead::api::DeletionPolicy;
use bulkhead::api::platform::{CachePlatform, SecretKeySelector};
use bulkhead::layers::cache::{self, CacheLayer};
use bulkhead::layers::{Credentials, Layer, LayerError, Tenant};
use bulkhead::tenant::OrgId;
use common::{Testbed, unique};
use redis::{ConnectionAddr, IntoConnectionInfo, TlsCertificates};

fn spec() -> CachePlatform {
    CachePlatform {
        ca_secret_ref: Some(SecretKeySelector {
            name: "redis-ca".into(),
            namespace: None,
            key: "ca.crt".into(),
        }),
        ..common::cache_spec()
    }
}

fn tls_url() -> &'static str {
    Testbed::get().var("BULKHEAD_REDIS_TLS_URL")
}

fn ca_pem() -> String {
    let path = Testbed::get().var("BULKHEAD_REDIS_CA");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// `host:port` of a URL.
fn server_of(url: &str) -> String {
    match url.into_connection_info().unwrap().addr() {
        ConnectionAddr::Tcp(h, p)
        | ConnectionAddr::TcpTls {
            host: h, port: p, ..
        } => {
            format!("{h}:{p}")
        }
        other => panic!("not a TCP address: {other:?}"),
    }
}

fn password_of(url: &str) -> String {
    url.into_connection_info()
        .unwrap()
        .redis_settings()
        .password()
        .expect("the testbed's URL has a password")
        .to_owned()
}

fn tenant(org: &str, peers: &[&str]) -> Tenant {
    let peers: Vec<OrgId> = peers.iter().map(|p| OrgId::parse(p).unwrap()).collect();
    let peers: Vec<&OrgId> = peers.iter().collect();
    common::tenant_of(
        &OrgId::parse(org).unwrap(),
        "00000000-0000-0000-0000-000000000000",
        &peers,
        DeletionPolicy::Delete,
    )
}

/// A CA that signed nothing the testbed serves (made with openssl in a temporary directory).
fn foreign_ca() -> String {
    let dir = std::env::temp_dir().join(unique("bulkhead-foreign-ca"));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("ca.key");
    let crt = dir.join("ca.crt");
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:P-256")
        .args(["-nodes", "-subj", "/CN=not-the-testbed-ca", "-days", "1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("run openssl");
    assert!(
        ok.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let pem = std::fs::read_to_string(&crt).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    pem
}

fn assert_no_password(text: &str, url: &str) {
    let pw = password_of(url);
    assert!(!text.contains(&pw), "error reveals the password: {text}");
}

#[tokio::test]
async fn provisions_and_probes_pass_over_tls() {
    let ca = ca_pem();
    let layer = CacheLayer::connect_with_ca(&spec(), tls_url(), Some(&ca))
        .await
        .expect("connect over TLS");
    layer.prepare().await.expect("prepare over TLS");

    let a = unique("tls");
    let b = unique("tls");
    let (ta, tb) = (tenant(&a, &[&b]), tenant(&b, &[&a]));
    let mut creds_a = Credentials::default();
    let mut creds_b = Credentials::default();
    layer.ensure(&ta, &mut creds_a).await.expect("ensure a");
    layer.ensure(&tb, &mut creds_b).await.expect("ensure b");

    let url = creds_a.get(cache::KEY_URL).unwrap().to_owned();
    assert!(
        url.starts_with("rediss://"),
        "REDIS_URL is not TLS: rediss://…"
    );
    assert_eq!(server_of(&url), server_of(tls_url()));
    assert_eq!(creds_a.get(cache::KEY_CA_CERT), Some(ca.as_str()));

    // Every probe (own keys, cross-tenant NOPERM, keyspace-wide commands, pub/sub) over TLS.
    for (t, c) in [(&ta, &creds_a), (&tb, &creds_b)] {
        let v = layer.verify(t, c).await.expect("verify over TLS");
        assert!(v.findings.is_empty(), "findings: {:?}", v.findings);
        let failed: Vec<_> = v.probes.iter().filter(|p| !p.passed).collect();
        assert!(v.verified(), "failed probes: {failed:?}");
        assert!(
            v.probes
                .iter()
                .any(|p| p.name.contains(&b) || p.name.contains(&a)),
            "no cross-tenant probe ran: {:?}",
            v.probes
        );
    }

    // The organization connects the way its Secret says: rediss:// and the CA it was given.
    let client = redis::Client::build_with_tls(
        url.as_str(),
        TlsCertificates {
            client_tls: None,
            root_cert: Some(creds_a.get(cache::KEY_CA_CERT).unwrap().as_bytes().to_vec()),
        },
    )
    .unwrap();
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("tenant connects over TLS with REDIS_CA_CERT");
    let own = format!("org:{a}:hello");
    let _: () = redis::cmd("SET")
        .arg(&own)
        .arg("1")
        .query_async(&mut conn)
        .await
        .expect("SET own key over TLS");
    let err = redis::cmd("GET")
        .arg(format!("org:{b}:canary"))
        .query_async::<redis::Value>(&mut conn)
        .await
        .expect_err("a peer's key is refused");
    assert!(
        err.to_string().to_ascii_uppercase().contains("NOPERM"),
        "{err}"
    );

    for t in [&ta, &tb] {
        layer.cleanup(t).await.expect("cleanup");
    }
}

#[tokio::test]
async fn wrong_ca_is_refused_naming_the_server() {
    let err = match CacheLayer::connect_with_ca(&spec(), tls_url(), Some(&foreign_ca())).await {
        Ok(_) => panic!("a server signed by another CA was trusted"),
        Err(e) => e,
    };
    let text = err.to_string();
    eprintln!("wrong CA: {text}");
    assert!(matches!(err, LayerError::Unreachable(_)), "{err:?}");
    assert!(
        text.contains(&server_of(tls_url())),
        "names no server: {text}"
    );
    assert!(text.contains("certificate"), "does not say why: {text}");
    assert!(
        text.contains("caSecretRef"),
        "does not say what to fix: {text}"
    );
    assert_no_password(&text, tls_url());
    assert_no_password(&format!("{err:?}"), tls_url());
}

#[tokio::test]
async fn system_roots_do_not_trust_the_testbed_ca() {
    // Without caSecretRef the system's roots are used, and the testbed's CA is not among them.
    let err = match CacheLayer::connect(&common::cache_spec(), tls_url()).await {
        Ok(_) => panic!("the testbed's private CA was trusted without caSecretRef"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(text.contains(&server_of(tls_url())), "{text}");
    assert_no_password(&text, tls_url());
}

#[tokio::test]
async fn tls_against_the_plain_port_is_refused_naming_the_server() {
    let plain = Testbed::get().redis_admin_url();
    let url = plain.replacen("redis://", "rediss://", 1);
    let err = match CacheLayer::connect_with_ca(&spec(), &url, Some(&ca_pem())).await {
        Ok(_) => panic!("TLS against a plain port succeeded"),
        Err(e) => e,
    };
    let text = err.to_string();
    eprintln!("plain port: {text}");
    assert!(text.contains(&server_of(plain)), "names no server: {text}");
    assert!(text.contains("TLS"), "{text}");
    assert_no_password(&text, plain);
}

#[tokio::test]
async fn a_ca_needs_a_rediss_url_and_a_pem() {
    let plain = Testbed::get().redis_admin_url();
    let err = match CacheLayer::connect_with_ca(&spec(), plain, Some(&ca_pem())).await {
        Ok(_) => panic!("a CA with a redis:// URL was accepted"),
        Err(e) => e,
    };
    assert!(matches!(err, LayerError::Config(_)), "{err:?}");
    assert!(err.to_string().contains("rediss://"), "{err}");

    let err = match CacheLayer::connect_with_ca(&spec(), tls_url(), Some("not a pem")).await {
        Ok(_) => panic!("a CA without a certificate was accepted"),
        Err(e) => e,
    };
    assert!(matches!(err, LayerError::Config(_)), "{err:?}");
    assert_no_password(&err.to_string(), tls_url());
}
