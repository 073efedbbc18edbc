//! Bearer API keys.
//!
//! A key reads `ork_<id>_<secret>`: the id finds the stored row, and the
//! secret's SHA-256 is compared with the stored hash in constant time. The
//! secret has 256 bits of entropy, so a plain hash is enough; the key itself
//! is never stored.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

const PREFIX: &str = "ork_";
const ID_LEN: usize = 16;

/// The organisation a request is made for.
#[derive(Debug, Clone)]
pub struct Org {
    pub id: String,
}

impl FromRequestParts<AppState> for Org {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token)
            .ok_or(ApiError::Unauthorized)?;
        let (id, secret) = ApiKeyParts::split(key).ok_or(ApiError::Unauthorized)?;
        let stored = state
            .store
            .api_key(id)
            .await?
            .ok_or(ApiError::Unauthorized)?;

        let presented = hash_key_secret(secret);
        if bool::from(presented.as_slice().ct_eq(&stored.key_hash)) {
            Ok(Org { id: stored.org_id })
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// SHA-256 of a key's secret part, as stored.
pub fn hash_key_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A freshly generated API key and what the store keeps of it.
#[derive(Debug, Clone)]
pub struct ApiKeyParts {
    pub id: String,
    pub key: String,
    pub hash: Vec<u8>,
}

impl ApiKeyParts {
    /// A new random key.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let mut id = [0u8; ID_LEN / 2];
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);

        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let secret = URL_SAFE_NO_PAD.encode(secret);
        Self {
            key: format!("{PREFIX}{id}_{secret}"),
            hash: hash_key_secret(&secret),
            id,
        }
    }

    /// Splits a presented key into its id and secret parts.
    fn split(key: &str) -> Option<(&str, &str)> {
        let rest = key.strip_prefix(PREFIX)?;
        let id = rest.get(..ID_LEN)?;
        let secret = rest.get(ID_LEN..)?.strip_prefix('_')?;
        (!secret.is_empty()).then_some((id, secret))
    }
}

/// A new random signing secret: `whsec_` and 32 random bytes in standard
/// base64, the form Standard Webhooks libraries decode.
pub fn generate_signing_secret() -> String {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    format!("whsec_{}", STANDARD.encode(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_splits_back_into_its_parts() {
        let parts = ApiKeyParts::generate();
        let (id, secret) = ApiKeyParts::split(&parts.key).expect("well-formed key");
        assert_eq!(id, parts.id);
        assert_eq!(hash_key_secret(secret), parts.hash);
    }

    #[test]
    fn malformed_keys_do_not_split() {
        for key in [
            "",
            "ork_",
            "ork_0123456789abcdef",
            "ork_0123456789abcdef_",
            "abc_x_y",
        ] {
            assert!(ApiKeyParts::split(key).is_none(), "{key:?}");
        }
    }
}
