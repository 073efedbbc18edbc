//! Signing secrets at rest.
//!
//! With an operator key (`OUTRIDER_ENCRYPTION_KEY`: 32 bytes in base64),
//! every signing secret is stored sealed with AES-256-GCM as
//! `sealed:v1:<base64(nonce || ciphertext || tag)>`, the organisation's id
//! bound in as associated data so a sealed secret cannot be moved to another
//! organisation. Without a key, secrets are stored as they are. At start the
//! server seals any secret still stored in the clear, and refuses to start if
//! it holds sealed secrets it cannot open.

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::sync::Arc;

use crate::store::DynStore;

/// Environment variable holding the operator key.
pub const KEY_ENV: &str = "OUTRIDER_ENCRYPTION_KEY";

const PREFIX: &str = "sealed:v1:";

/// Seals and opens signing secrets; a no-op without a key.
#[derive(Clone, Default)]
pub struct SecretBox {
    key: Option<Arc<LessSafeKey>>,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox")
            .field("sealing", &self.key.is_some())
            .finish()
    }
}

impl SecretBox {
    /// A box for `key` (base64 of 32 bytes), or one that seals nothing.
    pub fn new(key: Option<&str>) -> anyhow::Result<Self> {
        let Some(encoded) = key else {
            return Ok(Self::default());
        };
        let bytes = STANDARD
            .decode(encoded.trim())
            .with_context(|| format!("{KEY_ENV} is not base64"))?;
        if bytes.len() != 32 {
            bail!(
                "{KEY_ENV} must be 32 bytes in base64 (it is {} bytes); \
                 make one with: openssl rand -base64 32",
                bytes.len()
            );
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes).expect("a 32-byte AES-256 key");
        Ok(Self {
            key: Some(Arc::new(LessSafeKey::new(key))),
        })
    }

    /// The form in which `secret` of `org_id` is stored.
    pub fn seal(&self, org_id: &str, secret: &str) -> String {
        let Some(key) = &self.key else {
            return secret.to_owned();
        };
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system random source works");
        let mut sealed = secret.as_bytes().to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(org_id.as_bytes()),
            &mut sealed,
        )
        .expect("sealing a short secret");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        format!("{PREFIX}{}", STANDARD.encode(out))
    }

    /// The secret a stored value stands for.
    pub fn open(&self, org_id: &str, stored: &str) -> anyhow::Result<String> {
        let Some(encoded) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_owned());
        };
        let Some(key) = &self.key else {
            bail!("signing secrets are sealed; set {KEY_ENV} to the key they were sealed with");
        };
        let bytes = STANDARD
            .decode(encoded)
            .context("a sealed secret is damaged")?;
        if bytes.len() < NONCE_LEN {
            bail!("a sealed secret is damaged");
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).expect("NONCE_LEN bytes");
        let mut sealed = sealed.to_vec();
        let opened = key
            .open_in_place(nonce, Aad::from(org_id.as_bytes()), &mut sealed)
            .map_err(|_| {
                anyhow::anyhow!("a sealed secret does not open with {KEY_ENV}: wrong key?")
            })?;
        String::from_utf8(opened.to_vec()).context("a sealed secret is damaged")
    }

    /// Checks that every stored secret opens, and with a key seals those
    /// still in the clear. Returns how many were sealed.
    pub async fn prepare(&self, store: &DynStore) -> anyhow::Result<u64> {
        let mut sealed = 0;
        for stored in store.stored_secrets().await? {
            self.open(&stored.org_id, &stored.secret)?;
            if self.key.is_some() && !stored.secret.starts_with(PREFIX) {
                let new = self.seal(&stored.org_id, &stored.secret);
                if store
                    .replace_stored_secret(&stored.org_id, &stored.secret, &new)
                    .await?
                {
                    sealed += 1;
                }
            }
        }
        Ok(sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

    #[test]
    fn a_sealed_secret_opens_only_for_its_org_and_key() {
        let secrets = SecretBox::new(Some(KEY)).expect("key");
        let sealed = secrets.seal("org-1", "whsec_abc");
        assert!(sealed.starts_with(PREFIX));
        assert!(!sealed.contains("whsec_abc"));
        assert_ne!(sealed, secrets.seal("org-1", "whsec_abc"), "fresh nonce");
        assert_eq!(secrets.open("org-1", &sealed).expect("opens"), "whsec_abc");
        assert!(secrets.open("org-2", &sealed).is_err(), "bound to its org");

        let other = SecretBox::new(Some(&STANDARD.encode([7u8; 32]))).expect("key");
        assert!(other.open("org-1", &sealed).is_err());
        assert!(SecretBox::default().open("org-1", &sealed).is_err());
    }

    #[test]
    fn without_a_key_secrets_pass_through() {
        let secrets = SecretBox::default();
        assert_eq!(secrets.seal("org-1", "whsec_abc"), "whsec_abc");
        assert_eq!(
            secrets.open("org-1", "whsec_abc").expect("plain"),
            "whsec_abc"
        );
    }

    #[test]
    fn a_bad_key_is_refused_with_the_variable_named() {
        for bad in ["not base64!", "c2hvcnQ="] {
            let error = SecretBox::new(Some(bad)).expect_err("refused").to_string();
            assert!(error.contains(KEY_ENV), "{error}");
        }
    }

    #[test]
    fn damaged_sealed_values_are_errors_not_panics() {
        let secrets = SecretBox::new(Some(KEY)).expect("key");
        for stored in ["sealed:v1:", "sealed:v1:!!", "sealed:v1:AAAA"] {
            assert!(secrets.open("org-1", stored).is_err(), "{stored}");
        }
    }
}
