//! `outrider listen`: a local HTTPS callback receiver for development.
//!
//! It makes (once, then reuses) a certificate authority and a certificate
//! for `localhost`, `127.0.0.1` and `::1`, serves HTTPS, verifies each
//! callback's signature when given the secret, prints it, and answers with
//! the status and delay it was told. Point a server at it with
//! `--callback-allow 127.0.0.0/8,::1 --callback-ca-file <dir>/ca.pem`.

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Router;
use clap::Args;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Settings of `outrider listen`.
#[derive(Debug, Clone, Args)]
pub struct ListenConfig {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Signing secret to verify callbacks with; without it nothing is verified.
    #[arg(long, env = "OUTRIDER_LISTEN_SECRET")]
    pub secret: Option<String>,
    /// Status to answer every callback with.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(100..=599))]
    pub status: u16,
    /// How long to wait before answering.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub delay: Duration,
    /// Where the CA and certificate are kept (made on first use).
    #[arg(long, default_value = ".outrider-listen")]
    pub dir: PathBuf,
}

#[derive(Clone)]
struct Answer {
    secret: Option<String>,
    status: StatusCode,
    delay: Duration,
}

/// Runs the receiver until interrupted.
pub async fn run(config: ListenConfig) -> anyhow::Result<()> {
    let tls = tls_files(&config.dir)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let port = listener.local_addr()?.port();
    println!("outrider listen: https://localhost:{port}/ (any path)");
    println!("CA certificate: {}", config.dir.join("ca.pem").display());
    println!(
        "Start the server with: --callback-allow 127.0.0.0/8,::1 --callback-ca-file {}",
        config.dir.join("ca.pem").display()
    );

    let answer = Answer {
        secret: config.secret,
        status: StatusCode::from_u16(config.status)?,
        delay: config.delay,
    };
    let router = Router::new().fallback(receive).with_state(answer);
    accept(listener, TlsAcceptor::from(tls), router).await;
    Ok(())
}

async fn accept(listener: TcpListener, acceptor: TlsAcceptor, router: Router) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(stream).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Prints one callback and answers as configured.
async fn receive(
    State(answer): State<Answer>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let signature = header("x-scout-signature");
    let verdict = match &answer.secret {
        None => "not checked (no --secret)".to_owned(),
        Some(secret) => {
            let now = crate::domain::now_ms() as u64 / 1000;
            match outrider_signature::verify(secret, signature, &body, now) {
                Ok(()) => "signature ok".to_owned(),
                Err(error) => format!("SIGNATURE INVALID: {error}"),
            }
        }
    };
    let text = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(json) => serde_json::to_string_pretty(&json).unwrap_or_default(),
        Err(_) => String::from_utf8_lossy(&body).into_owned(),
    };
    println!("\n{method} {uri}  [{verdict}]\nX-Scout-Signature: {signature}\n{text}");

    tokio::time::sleep(answer.delay).await;
    answer.status
}

/// The server TLS settings, making the CA and certificate on first use.
fn tls_files(dir: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    if !cert_path.exists() || !key_path.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_certificates(dir, &LoopbackCertificates::generate()?)?;
    }
    let cert = std::fs::read(&cert_path)?;
    let key = std::fs::read(&key_path)?;
    server_tls(&cert, &key).with_context(|| format!("reading {}", dir.display()))
}

/// HTTP/1.1 server TLS settings from a PEM certificate chain and key.
pub fn server_tls(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut &cert_pem[..]).collect::<Result<_, _>>()?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut &key_pem[..])?.context("no private key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A new CA and a certificate it signed for `localhost`, `127.0.0.1` and
/// `::1`, all as PEM.
pub struct LoopbackCertificates {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl LoopbackCertificates {
    pub fn generate() -> anyhow::Result<Self> {
        let mut ca = CertificateParams::new(Vec::new())?;
        ca.distinguished_name
            .push(DnType::CommonName, "outrider listen CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let names = ["localhost", "127.0.0.1", "::1"]
            .map(str::to_owned)
            .to_vec();
        let mut leaf = CertificateParams::new(names)?;
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        let leaf_key = KeyPair::generate()?;
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
        Ok(Self {
            ca: ca_cert.pem(),
            cert: leaf_cert.pem(),
            key: leaf_key.serialize_pem(),
        })
    }
}

/// `ca.pem`, `cert.pem` and `key.pem` (readable by the owner only) in `dir`.
fn write_certificates(dir: &Path, certificates: &LoopbackCertificates) -> anyhow::Result<()> {
    std::fs::write(dir.join("ca.pem"), &certificates.ca)?;
    std::fs::write(dir.join("cert.pem"), &certificates.cert)?;
    let key_path = dir.join("key.pem");
    std::fs::write(&key_path, &certificates.key)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}
