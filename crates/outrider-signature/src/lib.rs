//! Sign and verify Outrider callback signatures.
//!
//! Outrider signs every callback it sends the way Scout does, so receivers
//! written for Scout verify Outrider's callbacks unchanged:
//!
//! ```text
//! X-Scout-Signature-Alg: HMAC-SHA256
//! X-Scout-Signature: t=<unix seconds>,sig=<base64(HMAC-SHA256(secret, "{t}.{raw body}"))>
//! ```
//!
//! The secret is used as its UTF-8 bytes. During a secret rotation the header
//! carries one `sig=` per active secret; a receiver accepts the callback if any
//! of them matches. This crate does no I/O, so a receiver can embed it.
//! [`standard`] does the same for the Standard Webhooks headers.
//!
//! ```
//! use outrider_signature::{sign, verify};
//!
//! let body = br#"{"status":"succeeded"}"#;
//! let header = sign(&["whsec_example"], 1_700_000_000, body);
//! assert!(verify("whsec_example", &header, body, 1_700_000_030).is_ok());
//! ```

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub mod standard;

/// Value of the `X-Scout-Signature-Alg` header.
pub const ALGORITHM: &str = "HMAC-SHA256";

/// Name of the header carrying the signature.
pub const SIGNATURE_HEADER: &str = "X-Scout-Signature";

/// Name of the header naming the algorithm.
pub const ALGORITHM_HEADER: &str = "X-Scout-Signature-Alg";

/// How far `t` may be from the receiver's clock, in seconds, either way.
pub const DEFAULT_TOLERANCE_SECS: u64 = 300;

type HmacSha256 = Hmac<Sha256>;

/// Why a signature header did not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// The header is not `t=<seconds>,sig=<base64>[,sig=...]`.
    Malformed(&'static str),
    /// `t` is further than the tolerance from the receiver's clock.
    Expired { timestamp: u64, now: u64 },
    /// No `sig=` value matches the body under this secret.
    Mismatch,
}

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed signature header: {why}"),
            Self::Expired { timestamp, now } => {
                write!(
                    f,
                    "signature timestamp {timestamp} is outside tolerance of {now}"
                )
            }
            Self::Mismatch => f.write_str("no signature matches the body"),
        }
    }
}

impl std::error::Error for VerifyError {}

/// The raw HMAC-SHA256 of `"{timestamp}.{body}"` under `secret`, base64-encoded.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    STANDARD.encode(mac(secret, timestamp, body).finalize().into_bytes())
}

/// The full `X-Scout-Signature` header value, one `sig=` per secret.
pub fn sign<S: AsRef<str>>(secrets: &[S], timestamp: u64, body: &[u8]) -> String {
    let mut header = format!("t={timestamp}");
    for secret in secrets {
        header.push_str(",sig=");
        header.push_str(&signature(secret.as_ref(), timestamp, body));
    }
    header
}

/// A parsed `X-Scout-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader {
    /// Unix seconds the sender signed at.
    pub timestamp: u64,
    /// The decoded MACs, one per `sig=`.
    pub signatures: Vec<Vec<u8>>,
}

impl SignatureHeader {
    /// Parses `t=<seconds>,sig=<base64>[,sig=<base64>...]`.
    ///
    /// `t` must be whole seconds: a value of more than 10 digits (such as a
    /// millisecond timestamp) is malformed rather than silently misread.
    pub fn parse(header: &str) -> Result<Self, VerifyError> {
        let mut timestamp = None;
        let mut signatures = Vec::new();
        for part in header.split(',') {
            let (key, value) = part
                .trim()
                .split_once('=')
                .ok_or(VerifyError::Malformed("expected key=value pairs"))?;
            match key {
                "t" if timestamp.is_some() => return Err(VerifyError::Malformed("repeated t")),
                "t" => timestamp = Some(parse_seconds(value)?),
                "sig" => signatures.push(
                    STANDARD
                        .decode(value)
                        .map_err(|_| VerifyError::Malformed("sig is not base64"))?,
                ),
                _ => {}
            }
        }
        let timestamp = timestamp.ok_or(VerifyError::Malformed("missing t"))?;
        if signatures.is_empty() {
            return Err(VerifyError::Malformed("missing sig"));
        }
        Ok(Self {
            timestamp,
            signatures,
        })
    }
}

/// Verifies a header against the raw body with the default tolerance.
///
/// `now` is the receiver's clock in unix seconds.
pub fn verify(secret: &str, header: &str, body: &[u8], now: u64) -> Result<(), VerifyError> {
    verify_with_tolerance(secret, header, body, now, DEFAULT_TOLERANCE_SECS)
}

/// Verifies a header against the raw body, allowing `tolerance` seconds of skew.
pub fn verify_with_tolerance(
    secret: &str,
    header: &str,
    body: &[u8],
    now: u64,
    tolerance: u64,
) -> Result<(), VerifyError> {
    let parsed = SignatureHeader::parse(header)?;
    if parsed.timestamp.abs_diff(now) > tolerance {
        return Err(VerifyError::Expired {
            timestamp: parsed.timestamp,
            now,
        });
    }

    // `verify_slice` compares in constant time.
    let matches = parsed.signatures.iter().any(|sig| {
        mac(secret, parsed.timestamp, body)
            .verify_slice(sig)
            .is_ok()
    });
    if matches {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

fn mac(secret: &str, timestamp: u64, body: &[u8]) -> HmacSha256 {
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

pub(crate) fn parse_seconds(value: &str) -> Result<u64, VerifyError> {
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::Malformed("t must be unix seconds"));
    }
    value
        .parse()
        .map_err(|_| VerifyError::Malformed("t must be unix seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = "{\"text\":\"caf\u{e9} \u{2028} \u{1f600}\"}".as_bytes();

    #[test]
    fn a_signed_body_verifies() {
        let header = sign(&["secret"], 1_700_000_000, BODY);
        assert_eq!(verify("secret", &header, BODY, 1_700_000_000), Ok(()));
    }

    #[test]
    fn the_signature_is_hmac_of_timestamp_dot_body() {
        // Known answer computed independently:
        // printf '1700000000.hello' | openssl dgst -sha256 -hmac secret -binary | base64
        let header = sign(&["secret"], 1_700_000_000, b"hello");
        assert_eq!(
            header,
            "t=1700000000,sig=R7HfCrEjOLJoVHCw0rNwM63Xw7K8gXLzE+d0E/G7eMg="
        );
    }

    #[test]
    fn a_changed_byte_fails() {
        let header = sign(&["secret"], 1_700_000_000, BODY);
        let mut tampered = BODY.to_vec();
        tampered[3] ^= 1;
        assert_eq!(
            verify("secret", &header, &tampered, 1_700_000_000),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn any_of_several_signatures_may_match() {
        let header = sign(&["old", "new"], 1_700_000_000, BODY);
        assert_eq!(verify("new", &header, BODY, 1_700_000_000), Ok(()));
        assert_eq!(verify("old", &header, BODY, 1_700_000_000), Ok(()));
        assert!(verify("other", &header, BODY, 1_700_000_000).is_err());
    }

    #[test]
    fn timestamps_outside_tolerance_are_refused_both_ways() {
        let header = sign(&["s"], 1_700_000_000, BODY);
        assert!(verify("s", &header, BODY, 1_700_000_300).is_ok());
        assert!(verify("s", &header, BODY, 1_699_999_700).is_ok());
        assert!(matches!(
            verify("s", &header, BODY, 1_700_000_301),
            Err(VerifyError::Expired { .. })
        ));
        assert!(matches!(
            verify("s", &header, BODY, 1_699_999_699),
            Err(VerifyError::Expired { .. })
        ));
    }

    #[test]
    fn malformed_headers_are_refused() {
        for header in [
            "",
            "t=1700000000",
            "sig=abc",
            "t=abc,sig=AAAA",
            "t=1700000000000,sig=AAAA",
            "t=1700000000,sig=***",
            "t=1,t=2,sig=AAAA",
        ] {
            assert!(
                matches!(
                    SignatureHeader::parse(header),
                    Err(VerifyError::Malformed(_))
                ),
                "{header:?} should be malformed"
            );
        }
    }
}
