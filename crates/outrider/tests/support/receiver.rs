//! A real HTTPS server that stands in for a callback endpoint.
//!
//! It serves TLS with a certificate for `localhost` and `127.0.0.1` signed by a freshly
//! generated CA, records every request byte for byte and answers from a script.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use base64::Engine;
use hmac::{Hmac, Mac};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, LOCATION};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::Sha256;
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Answer with this status; the body is the status's canonical reason phrase.
    Status(u16),
    /// Answer with this status and these extra response headers.
    WithHeaders(u16, Vec<(&'static str, String)>),
    /// Answer `302 Found` with this `Location`.
    Redirect(String),
    /// Sleep for the duration, then answer with the status.
    Delay(Duration, u16),
    /// Send the status and headers at once, then the body one byte every
    /// 200 ms, never ending.
    Trickle(u16),
    /// Send the status, then 64 KiB body chunks as fast as they are read,
    /// never ending.
    Endless(u16),
}

/// One request exactly as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Request method, e.g. `POST`.
    pub method: String,
    /// Path plus query string, e.g. `/hook?x=1`.
    pub path: String,
    /// Header names in lowercase with their values, in the order received.
    pub headers: Vec<(String, String)>,
    /// The request body exactly as received (after any transfer decoding).
    pub body: Vec<u8>,
    /// When the request head arrived.
    pub at: SystemTime,
}

impl Recorded {
    /// The first value of the named header; the name is matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// A running HTTPS receiver; the server stops when this is dropped.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    ca_file: PathBuf,
    _dir: TempDir,
    task: JoinHandle<()>,
}

impl Receiver {
    /// Binds 127.0.0.1:0 with TLS. Replies are used in order, one per request; once
    /// exhausted every request gets 200 with body "ok".
    pub async fn start(replies: Vec<Reply>) -> Receiver {
        Self::start_with(Certificates::generate(), replies).await
    }

    /// Like [`Receiver::start`], but the server certificate is self-signed
    /// (no CA), and [`Receiver::ca_file`] holds that certificate itself, as
    /// `rcgen::generate_simple_self_signed` users would set it up.
    pub async fn start_self_signed(replies: Vec<Reply>) -> Receiver {
        Self::start_with(Certificates::self_signed(), replies).await
    }

    async fn start_with(certs: Certificates, replies: Vec<Reply>) -> Receiver {
        let dir = tempfile::tempdir().expect("create a temporary directory for the CA file");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &certs.ca_pem).expect("write the CA certificate file");
        let acceptor = TlsAcceptor::from(certs.server_config());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("read the bound address");
        let shared = Arc::new(Shared::new(replies));
        let task = tokio::spawn(accept_loop(listener, acceptor, shared.clone()));
        Receiver {
            addr,
            shared,
            ca_file,
            _dir: dir,
            task,
        }
    }

    /// `https://localhost:{port}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// `https://127.0.0.1:{port}{path}`.
    pub fn ip_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.addr.port())
    }

    /// PEM file holding the CA certificate that signed the server certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Every request recorded so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.state().recorded.clone()
    }

    /// Waits until at least `n` requests were recorded or panics after `within`.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Recorded> {
        let mut count = self.shared.count.subscribe();
        let reached = tokio::time::timeout(within, count.wait_for(|seen| *seen >= n)).await;
        if !matches!(reached, Ok(Ok(_))) {
            let seen: Vec<String> = self
                .requests()
                .iter()
                .map(|r| format!("{} {}", r.method, r.path))
                .collect();
            panic!("expected at least {n} requests within {within:?}, got {seen:?}");
        }
        self.requests()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// State shared between the test and the server task.
struct Shared {
    state: Mutex<State>,
    count: watch::Sender<usize>,
}

struct State {
    replies: VecDeque<Reply>,
    recorded: Vec<Recorded>,
}

impl Shared {
    fn new(replies: Vec<Reply>) -> Shared {
        let state = State {
            replies: replies.into(),
            recorded: Vec::new(),
        };
        Shared {
            state: Mutex::new(state),
            count: watch::Sender::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores the request and hands out the reply scripted for it.
    fn record(&self, request: Recorded) -> Option<Reply> {
        let mut state = self.state();
        state.recorded.push(request);
        let reply = state.replies.pop_front();
        let total = state.recorded.len();
        drop(state);
        self.count.send_replace(total);
        reply
    }
}

/// The CA certificate and the server's certificate and key.
struct Certificates {
    ca_pem: String,
    server_cert: CertificateDer<'static>,
    server_key: PrivateKeyDer<'static>,
}

impl Certificates {
    fn generate() -> Certificates {
        let (ca_pem, issuer) = certificate_authority();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let mut params = CertificateParams::new(names).expect("server certificate names");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate the server key");
        let cert = params
            .signed_by(&key, &issuer)
            .expect("sign the server certificate");
        Certificates {
            ca_pem,
            server_cert: cert.der().clone(),
            server_key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        }
    }

    fn self_signed() -> Certificates {
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let certified = rcgen::generate_simple_self_signed(names).expect("self-signed certificate");
        Certificates {
            ca_pem: certified.cert.pem(),
            server_cert: certified.cert.der().clone(),
            server_key: PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()).into(),
        }
    }

    fn server_config(self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert], self.server_key)
            .expect("server certificate matches its key");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// A fresh CA: its certificate as PEM and the issuer that signs with its key.
fn certificate_authority() -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::new()).expect("CA parameters");
    params
        .distinguished_name
        .push(DnType::CommonName, "outrider test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("generate the CA key");
    let cert = params
        .self_signed(&key)
        .expect("self-sign the CA certificate");
    (cert.pem(), Issuer::new(params, key))
}

/// Accepts connections until aborted; aborting also ends every open connection.
async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while connections.try_join_next().is_some() {}
        connections.spawn(serve_connection(tcp, acceptor.clone(), shared.clone()));
    }
}

async fn serve_connection(tcp: TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let service = service_fn(move |request| handle(request, shared.clone()));
    // Clients that hang up mid-request are expected in tests; nothing to report.
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    let at = SystemTime::now();
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(Body::new(body), usize::MAX).await else {
        return Ok(text(StatusCode::BAD_REQUEST, "unreadable body"));
    };
    let headers = parts.headers.iter().map(header_pair).collect();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let path = path.to_string();
    let method = parts.method.to_string();
    let recorded = Recorded {
        method,
        path,
        headers,
        body: body.to_vec(),
        at,
    };
    Ok(answer(shared.record(recorded)).await)
}

fn header_pair((name, value): (&HeaderName, &HeaderValue)) -> (String, String) {
    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
    (name.as_str().to_string(), value)
}

async fn answer(reply: Option<Reply>) -> Response<Body> {
    match reply {
        None => text(StatusCode::OK, "ok"),
        Some(Reply::Status(code)) => reason(code),
        Some(Reply::WithHeaders(code, headers)) => with_headers(reason(code), headers),
        Some(Reply::Redirect(location)) => {
            let response = reason(StatusCode::FOUND.as_u16());
            with_headers(response, vec![(LOCATION.as_str(), location)])
        }
        Some(Reply::Delay(pause, code)) => {
            tokio::time::sleep(pause).await;
            reason(code)
        }
        Some(Reply::Trickle(code)) => {
            let bytes = futures_util::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Some((
                    Ok::<_, Infallible>(axum::body::Bytes::from_static(b"x")),
                    (),
                ))
            });
            streaming(code, Body::from_stream(bytes))
        }
        Some(Reply::Endless(code)) => {
            let chunk = axum::body::Bytes::from(vec![b'x'; 64 * 1024]);
            let chunks =
                futures_util::stream::repeat_with(move || Ok::<_, Infallible>(chunk.clone()));
            streaming(code, Body::from_stream(chunks))
        }
    }
}

fn streaming(code: u16, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(code).expect("valid status");
    response
}

fn reason(code: u16) -> Response<Body> {
    let status = StatusCode::from_u16(code).expect("scripted reply uses a valid status code");
    text(status, status.canonical_reason().unwrap_or(""))
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let plain = HeaderValue::from_static("text/plain; charset=utf-8");
    response.headers_mut().insert(CONTENT_TYPE, plain);
    response
}

fn with_headers(
    mut response: Response<Body>,
    headers: Vec<(&'static str, String)>,
) -> Response<Body> {
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("scripted header name is valid");
        let value = HeaderValue::try_from(value).expect("scripted header value is valid");
        response.headers_mut().append(name, value);
    }
    response
}

/// Checks the signature header with an HMAC computed here, not by the
/// server's own crate, and returns `t`.
pub fn assert_signed(request: &Recorded, secret: &str) -> u64 {
    assert_eq!(request.header("x-scout-signature-alg"), Some("HMAC-SHA256"));
    let header = request
        .header("x-scout-signature")
        .expect("signature header");
    let (t, sig) = header
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",sig="))
        .unwrap_or_else(|| panic!("unexpected header {header}"));
    assert_eq!(
        sig,
        hmac_b64(secret, t, &request.body),
        "signature over the raw body bytes"
    );

    let t: u64 = t.parse().expect("t is unix seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(now.abs_diff(t) < 60, "t={t} is near now={now}");
    t
}

/// `base64(HMAC-SHA256(secret, "{t}.{body}"))`, computed here.
pub fn hmac_b64(secret: &str, t: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}
