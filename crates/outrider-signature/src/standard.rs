//! The [Standard Webhooks] headers, which an organisation may have sent
//! beside `X-Scout-Signature` so that receivers can use the existing
//! Standard Webhooks libraries:
//!
//! ```text
//! webhook-id: <callback_event_id>
//! webhook-timestamp: <unix seconds>
//! webhook-signature: v1,<base64(HMAC-SHA256(key, "{id}.{timestamp}.{raw body}"))>
//! ```
//!
//! The key is the secret's part after `whsec_`, base64-decoded (a secret
//! that does not decode is used as its UTF-8 bytes). During a rotation the
//! signature header carries one `v1,` value per active secret, separated by
//! spaces.
//!
//! ```
//! use outrider_signature::standard::{sign, verify};
//!
//! let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
//! let body = br#"{"test": 2432232314}"#;
//! let header = sign(&[secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
//! // The example from the Standard Webhooks specification.
//! assert_eq!(header, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
//! let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
//! assert!(verify(secret, id, "1614265330", &header, body, 1614265400).is_ok());
//! ```
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com/

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{VerifyError, DEFAULT_TOLERANCE_SECS};

/// Name of the header carrying the message id.
pub const ID_HEADER: &str = "webhook-id";

/// Name of the header carrying the signing time.
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";

/// Name of the header carrying the signatures.
pub const SIGNATURE_HEADER: &str = "webhook-signature";

const SECRET_PREFIX: &str = "whsec_";

/// The HMAC key a secret stands for.
pub fn key(secret: &str) -> Vec<u8> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    STANDARD
        .decode(encoded)
        .unwrap_or_else(|_| secret.as_bytes().to_vec())
}

/// The `webhook-signature` value: one `v1,<base64>` per secret.
pub fn sign<S: AsRef<str>>(secrets: &[S], id: &str, timestamp: u64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|secret| {
            let mac = mac(&key(secret.as_ref()), id, timestamp, body);
            format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Verifies the three headers against the raw body, allowing
/// [`DEFAULT_TOLERANCE_SECS`] of skew from `now` (unix seconds).
pub fn verify(
    secret: &str,
    id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now: u64,
) -> Result<(), VerifyError> {
    let timestamp = crate::parse_seconds(timestamp)?;
    if timestamp.abs_diff(now) > DEFAULT_TOLERANCE_SECS {
        return Err(VerifyError::Expired { timestamp, now });
    }
    let key = key(secret);
    let mut seen = false;
    for value in signatures.split(' ').filter(|value| !value.is_empty()) {
        let Some(encoded) = value.strip_prefix("v1,") else {
            // Other versions are allowed by the format and skipped.
            continue;
        };
        seen = true;
        let Ok(signature) = STANDARD.decode(encoded) else {
            return Err(VerifyError::Malformed("signature is not base64"));
        };
        // `verify_slice` compares in constant time.
        if mac(&key, id, timestamp, body)
            .verify_slice(&signature)
            .is_ok()
        {
            return Ok(());
        }
    }
    if seen {
        Err(VerifyError::Mismatch)
    } else {
        Err(VerifyError::Malformed("no v1 signature"))
    }
}

fn mac(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const BODY: &[u8] = br#"{"test": 2432232314}"#;

    #[test]
    fn every_active_secret_signs_and_any_one_verifies() {
        let header = sign(&["whsec_b2xk", SECRET], ID, 1614265330, BODY);
        assert_eq!(header.split(' ').count(), 2);
        assert_eq!(
            verify(SECRET, ID, "1614265330", &header, BODY, 1614265330),
            Ok(())
        );
        assert_eq!(
            verify("whsec_b2xk", ID, "1614265330", &header, BODY, 1614265330),
            Ok(())
        );
    }

    #[test]
    fn changes_to_id_body_time_or_secret_are_refused() {
        let header = sign(&[SECRET], ID, 1614265330, BODY);
        let check = |secret, id, body: &[u8], t, now| verify(secret, id, t, &header, body, now);
        assert_eq!(
            check(SECRET, "msg_other", BODY, "1614265330", 1614265330),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            check(SECRET, ID, b"{}", "1614265330", 1614265330),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            check("whsec_b2xk", ID, BODY, "1614265330", 1614265330),
            Err(VerifyError::Mismatch)
        );
        assert!(matches!(
            check(SECRET, ID, BODY, "1614265330", 1614265331 + 300),
            Err(VerifyError::Expired { .. })
        ));
        assert!(matches!(
            check(SECRET, ID, BODY, "1614265330000", 1614265330),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn a_secret_that_is_not_base64_is_used_as_its_bytes() {
        assert_eq!(key("whsec_not base64!"), b"whsec_not base64!".to_vec());
        assert_eq!(key("whsec_b2xk"), b"old".to_vec());
    }
}
