//! One callback attempt: a signed POST through the URL guard.
//!
//! The client never uses a proxy and never follows a redirect. Its resolver
//! is the guard: a host name is resolved once per connection, and only the
//! addresses the guard permits are handed to the connector, so the address
//! checked is the address connected to. Literal IP hosts skip the resolver
//! and are checked before sending instead. One budget covers the whole
//! attempt, and at most 64 KiB of the response is read.

use anyhow::Context;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use rustls::pki_types::CertificateDer;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::guard::{Guard, GuardError};
use crate::store::Signing;
use outrider_signature::{standard, ALGORITHM, ALGORITHM_HEADER, SIGNATURE_HEADER};

/// The most of a receiver's response body that is ever read.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// What an attempt came to.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub status: Option<u16>,
    pub retry_after: Option<String>,
    /// A stable name for what went wrong (`timeout`, `connect`, ...).
    pub error_kind: Option<&'static str>,
    pub error_message: Option<String>,
    pub duration: Duration,
}

impl AttemptResult {
    /// Whether the guard refused the destination: retrying cannot help.
    pub fn refused(&self) -> bool {
        matches!(self.error_kind, Some(kind) if kind.starts_with("forbidden"))
    }
}

/// Sends callbacks.
#[derive(Clone)]
pub struct CallbackClient {
    client: reqwest::Client,
    guard: Guard,
    budget: Duration,
}

impl CallbackClient {
    pub fn new(guard: Guard, budget: Duration, tls: rustls::ClientConfig) -> reqwest::Result<Self> {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .dns_resolver(Arc::new(GuardedResolver(guard.clone())))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("Outrider/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            guard,
            budget,
        })
    }

    /// POSTs `body` to `url`, signed fresh with every active secret; `id`
    /// is the callback's `callback_event_id`.
    pub async fn send(&self, url: &str, id: &str, body: &[u8], signing: &Signing) -> AttemptResult {
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.budget, self.post(url, id, body, signing)).await;
        let duration = started.elapsed();
        match outcome {
            Ok(Ok((status, retry_after))) => AttemptResult {
                status: Some(status),
                retry_after,
                error_kind: None,
                error_message: None,
                duration,
            },
            Ok(Err((kind, message))) => failure(kind, message, duration),
            Err(_) => {
                let message = format!("no complete answer within {}s", self.budget.as_secs_f32());
                failure("timeout", message, duration)
            }
        }
    }

    async fn post(
        &self,
        url: &str,
        id: &str,
        body: &[u8],
        signing: &Signing,
    ) -> Result<(u16, Option<String>), (&'static str, String)> {
        // Checked again here: the allow-list may have changed since accept,
        // and literal IP hosts never reach the resolver.
        let url = self
            .guard
            .check_url(url)
            .map_err(|e| (e.kind(), e.to_string()))?;

        let timestamp = (crate::domain::now_ms() / 1000) as u64;
        let signature = outrider_signature::sign(&signing.secrets, timestamp, body);
        let mut request = self
            .client
            .post(url.as_str())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(ALGORITHM_HEADER, ALGORITHM)
            .header(SIGNATURE_HEADER, signature)
            .header(USER_AGENT, concat!("Outrider/", env!("CARGO_PKG_VERSION")));
        if signing.standard_webhooks {
            let signatures = standard::sign(&signing.secrets, id, timestamp, body);
            request = request
                .header(standard::ID_HEADER, id)
                .header(standard::TIMESTAMP_HEADER, timestamp.to_string())
                .header(standard::SIGNATURE_HEADER, signatures);
        }
        let response = request
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| classify(&e))?;

        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        drain_limited(response).await.map_err(|e| classify(&e))?;
        Ok((status, retry_after))
    }
}

fn failure(kind: &'static str, message: String, duration: Duration) -> AttemptResult {
    AttemptResult {
        status: None,
        retry_after: None,
        error_kind: Some(kind),
        error_message: Some(message),
        duration,
    }
}

/// Reads and discards the response body, stopping at the limit.
async fn drain_limited(mut response: reqwest::Response) -> reqwest::Result<()> {
    let mut read = 0;
    while let Some(chunk) = response.chunk().await? {
        read += chunk.len();
        if read >= MAX_RESPONSE_BYTES {
            break;
        }
    }
    Ok(())
}

/// Names a request failure; a guard refusal keeps its own kind.
fn classify(error: &reqwest::Error) -> (&'static str, String) {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(guard) = cause.downcast_ref::<GuardError>() {
            return (guard.kind(), guard.to_string());
        }
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    let kind = if error.is_connect() {
        "connect"
    } else if error.is_timeout() {
        "timeout"
    } else if error.is_body() || error.is_decode() {
        "body"
    } else {
        "request"
    };
    (kind, message)
}

/// The guard as reqwest's resolver.
struct GuardedResolver(Guard);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.0.clone();
        Box::pin(async move {
            let addresses = guard.resolve_host(name.as_str(), 0).await?;
            Ok(Box::new(addresses.into_iter()) as Addrs)
        })
    }
}

/// TLS settings for outbound requests: the bundled public roots, plus the
/// operator's extra CA certificates if given.
pub fn tls_config(extra_ca: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let context = || format!("--callback-ca-file {}", path.display());
        for cert in read_certificates(path).with_context(context)? {
            roots.add(cert).with_context(context)?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

fn read_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice()).collect::<Result<Vec<_>, _>>()?;
    anyhow::ensure!(!certs.is_empty(), "holds no PEM certificate");
    Ok(certs)
}
