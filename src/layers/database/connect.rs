//! PostgreSQL connections with or without TLS (rustls), for the admin pool, the lock reaper and
//! the probes, and the TLS part of each tenant's `DATABASE_URL`.
//!
//! Modes follow libpq's `sslmode`:
//! - `disable`: plain TCP;
//! - `prefer` (admin URL only): TLS when the server offers it, without verification;
//! - `require`: TLS, but the certificate is **not** verified: it protects against eavesdropping,
//!   not against an active man in the middle;
//! - `verify-ca`: the certificate must chain to the CA bundle; the host name is not checked;
//! - `verify-full`: chain and host name (DNS name or IP address in the subjectAltName).
//!
//! The CA bundle comes from `caSecretRef`; without one, `verify-*` trust the public web roots.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode as PgWireMode;
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::LayerError;
use crate::api::platform::PgSslMode;

/// Secret key of the tenant's Secret holding the CA bundle (when the platform sets one).
pub const KEY_CA_CERT: &str = "DATABASE_CA_CERT";

/// The effective TLS mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// Parses libpq's `sslmode` values that bulkhead supports (`allow` is not).
    pub fn parse(s: &str) -> Result<Self, LayerError> {
        Ok(match s {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(LayerError::Config(format!(
                    "database: sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                )));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    fn verifies(self) -> bool {
        matches!(self, Self::VerifyCa | Self::VerifyFull)
    }
}

impl From<PgSslMode> for SslMode {
    fn from(m: PgSslMode) -> Self {
        match m {
            PgSslMode::Disable => Self::Disable,
            PgSslMode::Require => Self::Require,
            PgSslMode::VerifyCa => Self::VerifyCa,
            PgSslMode::VerifyFull => Self::VerifyFull,
        }
    }
}

/// A PEM CA bundle and where it came from (named in errors).
#[derive(Clone, Debug)]
pub struct CaBundle {
    pub pem: String,
    /// e.g. `Secret ns/name key ca.crt`.
    pub source: String,
}

/// The TLS parameters a `postgres://` URL carries in its query, taken out of it (tokio-postgres
/// knows neither `verify-*` nor `sslrootcert`).
#[derive(Debug, PartialEq, Eq)]
pub struct UrlTls {
    pub url: String,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
}

/// Removes `sslmode` and `sslrootcert` from a URL's query; other forms are returned unchanged.
pub fn split_url_tls(url: &str) -> UrlTls {
    let plain = UrlTls {
        url: url.to_owned(),
        sslmode: None,
        sslrootcert: None,
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return plain;
    }
    let Some((base, query)) = url.split_once('?') else {
        return plain;
    };
    let (mut sslmode, mut sslrootcert, mut kept) = (None, None, Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned();
        match k {
            "sslmode" => sslmode = Some(v),
            "sslrootcert" => sslrootcert = Some(v),
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    UrlTls {
        url,
        sslmode,
        sslrootcert,
    }
}

/// The query a tenant's `DATABASE_URL` ends with: empty for `disable` (today's URLs).
/// The CA is not a file the operator can name inside the tenant's pod: applications mount
/// `DATABASE_CA_CERT` and add `sslrootcert=<path>` themselves (see docs/database.md).
pub fn tenant_url_query(mode: SslMode) -> String {
    match mode {
        SslMode::Disable => String::new(),
        m => format!("?sslmode={}", m.as_str()),
    }
}

/// Drives `conn`, sending each notification's payload to `tx`, then the reason it ended.
async fn forward_notifications<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    tx: tokio::sync::mpsc::UnboundedSender<Result<String, String>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
    while let Some(m) = messages.next().await {
        match m {
            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                if tx.send(Ok(n.payload().to_owned())).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Err(super::describe(&e)));
                return;
            }
        }
    }
    let _ = tx.send(Err("connection closed".into()));
}

/// Connects with the platform's TLS settings.
#[derive(Clone)]
pub struct Connector {
    mode: SslMode,
    ca_source: Option<String>,
    ca_pem: Option<String>,
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("mode", &self.mode)
            .field("ca", &self.ca_source)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_config_error(e: impl std::fmt::Display) -> LayerError {
    LayerError::Config(format!("database: TLS setup: {e}"))
}

impl Connector {
    /// Builds the connector; a CA bundle that holds no certificate is refused.
    pub fn new(mode: SslMode, ca: Option<&CaBundle>) -> Result<Self, LayerError> {
        let provider = provider();
        let verifier: Arc<dyn ServerCertVerifier> = if mode.verifies() {
            let mut roots = RootCertStore::empty();
            match ca {
                Some(ca) => {
                    let certs: Vec<CertificateDer<'static>> =
                        CertificateDer::pem_slice_iter(ca.pem.as_bytes())
                            .collect::<Result<_, _>>()
                            .map_err(|e| {
                                LayerError::Config(format!(
                                    "database: the CA bundle in {} is not valid PEM: {e}",
                                    ca.source
                                ))
                            })?;
                    let (added, _) = roots.add_parsable_certificates(certs);
                    if added == 0 {
                        return Err(LayerError::Config(format!(
                            "database: the CA bundle in {} holds no usable certificate",
                            ca.source
                        )));
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(tls_config_error)?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        } else {
            Arc::new(NoVerification(provider.clone()))
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls_config_error)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Self {
            mode,
            ca_source: ca.map(|c| c.source.clone()),
            ca_pem: ca.map(|c| c.pem.clone()),
            tls: MakeRustlsConnect::new(config),
        })
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// The CA bundle to hand to tenants (only when a mode uses it).
    pub fn tenant_ca(&self) -> Option<&str> {
        if self.mode == SslMode::Disable {
            return None;
        }
        self.ca_pem.as_deref()
    }

    /// Opens one connection; its driver runs on a task of its own, whose handle is returned.
    /// Errors name the server and say what failed.
    pub async fn connect(
        &self,
        config: &Config,
    ) -> Result<(Client, tokio::task::JoinHandle<()>), String> {
        let config = self.wire_config(config);
        match config.connect(self.tls.clone()).await {
            Ok((client, conn)) => {
                let task = tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %super::describe(&e), "postgres connection ended");
                    }
                });
                Ok((client, task))
            }
            Err(e) => Err(self.explain(&config, &e)),
        }
    }

    /// Opens one connection whose driver forwards the payload of every notification (and
    /// then the error that ended the connection) to the returned receiver.
    pub async fn connect_notifying(
        &self,
        config: &Config,
    ) -> Result<
        (
            Client,
            tokio::sync::mpsc::UnboundedReceiver<Result<String, String>>,
            tokio::task::JoinHandle<()>,
        ),
        String,
    > {
        let config = self.wire_config(config);
        match config.connect(self.tls.clone()).await {
            Ok((client, conn)) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                Ok((client, rx, tokio::spawn(forward_notifications(conn, tx))))
            }
            Err(e) => Err(self.explain(&config, &e)),
        }
    }

    fn wire_config(&self, config: &Config) -> Config {
        let mut config = config.clone();
        config.ssl_mode(match self.mode {
            SslMode::Disable => PgWireMode::Disable,
            SslMode::Prefer => PgWireMode::Prefer,
            _ => PgWireMode::Require,
        });
        config
    }

    /// A connection error in words that name the server and the cause.
    pub fn explain(&self, config: &Config, e: &tokio_postgres::Error) -> String {
        let server = super::host_port(config).unwrap_or_else(|| "the database server".into());
        if e.as_db_error().is_some() {
            return format!("server {server}: {}", super::describe(e));
        }
        let mut text = e.to_string();
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        if text.contains("server does not support TLS") {
            return format!(
                "server {server} does not support TLS, and sslmode {} requires it",
                self.mode.as_str()
            );
        }
        let ca = || match &self.ca_source {
            Some(s) => format!("the CA in {s}"),
            None => "the public web roots (set caSecretRef)".into(),
        };
        if let Some(r) = rustls_error(e) {
            return match r {
                rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature,
                ) => format!("server {server}: certificate not trusted by {} ({r})", ca()),
                rustls::Error::InvalidCertificate(c) if name_mismatch(c) => format!(
                    "server {server}: certificate does not name the host connected to \
                     (sslmode verify-full checks it; {r})"
                ),
                rustls::Error::InvalidCertificate(_) => {
                    format!("server {server}: certificate refused: {r}")
                }
                _ => format!("server {server}: TLS handshake failed: {r}"),
            };
        }
        format!("server {server}: {text}")
    }
}

#[allow(unreachable_patterns)]
fn name_mismatch(c: &CertificateError) -> bool {
    matches!(
        c,
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
    )
}

/// The rustls error under a connection error, if any (rustls errors travel inside an
/// `io::Error`, whose `source()` skips them).
fn rustls_error(e: &tokio_postgres::Error) -> Option<&rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(r) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// `verify-ca`: the chain is checked, the host name is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(c)) if name_mismatch(&c) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` / `prefer`: any certificate; the handshake signatures are still checked, so the
/// session key belongs to whoever holds the certificate's key.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The effective mode: the platform's `sslMode`, else the admin URL's `sslmode`, else `disable`.
pub fn effective_mode(
    spec: Option<PgSslMode>,
    from_url: Option<&str>,
) -> Result<SslMode, LayerError> {
    match (spec, from_url) {
        (Some(m), _) => Ok(m.into()),
        (None, Some(u)) => SslMode::parse(u),
        (None, None) => Ok(SslMode::Disable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_values_parse() {
        for m in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            assert_eq!(SslMode::parse(m).unwrap().as_str(), m);
        }
        let err = SslMode::parse("allow").unwrap_err().to_string();
        assert!(err.contains("\"allow\""), "{err}");
    }

    #[test]
    fn the_platform_wins_over_the_url_and_disable_is_the_default() {
        assert_eq!(effective_mode(None, None).unwrap(), SslMode::Disable);
        assert_eq!(
            effective_mode(None, Some("verify-full")).unwrap(),
            SslMode::VerifyFull
        );
        assert_eq!(
            effective_mode(Some(PgSslMode::Require), Some("disable")).unwrap(),
            SslMode::Require
        );
        assert!(effective_mode(None, Some("bogus")).is_err());
    }

    #[test]
    fn tls_parameters_are_taken_out_of_the_url() {
        let u = split_url_tls(
            "postgres://a:b@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fca.pem",
        );
        assert_eq!(u.url, "postgres://a:b@h:5432/db?application_name=x");
        assert_eq!(u.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(u.sslrootcert.as_deref(), Some("/ca.pem"));
        let u = split_url_tls("postgresql://a@h/db?sslmode=require");
        assert_eq!(u.url, "postgresql://a@h/db");
        assert_eq!(u.sslmode.as_deref(), Some("require"));
        let u = split_url_tls("postgres://a@h/db");
        assert_eq!(u.url, "postgres://a@h/db");
        assert_eq!(u.sslmode, None);
        // key=value strings are left to tokio-postgres
        let u = split_url_tls("host=h sslmode=require");
        assert_eq!(u.url, "host=h sslmode=require");
        assert_eq!(u.sslmode, None);
    }

    #[test]
    fn tenant_urls_carry_the_mode() {
        assert_eq!(tenant_url_query(SslMode::Disable), "");
        assert_eq!(tenant_url_query(SslMode::Require), "?sslmode=require");
        assert_eq!(
            tenant_url_query(SslMode::VerifyFull),
            "?sslmode=verify-full"
        );
    }

    #[test]
    fn a_ca_without_certificates_is_refused_by_name() {
        let ca = CaBundle {
            pem: "not a certificate".into(),
            source: "Secret ops/pg-ca key ca.crt".into(),
        };
        let err = Connector::new(SslMode::VerifyFull, Some(&ca))
            .unwrap_err()
            .to_string();
        assert!(err.contains("Secret ops/pg-ca key ca.crt"), "{err}");
        // require does not read the CA
        assert!(Connector::new(SslMode::Require, Some(&ca)).is_ok());
        assert!(Connector::new(SslMode::VerifyCa, None).is_ok());
    }
}
