//! Secrets of a region: the cluster key, sealed access-key secrets, and registry tokens.
//!
//! The cluster key (32 random bytes) is shared by every node of a region: it seals access-key
//! secrets before they enter the replicated state (SigV4 needs them back, so they are
//! encrypted, not hashed) and signs the tokens `GetAuthorizationToken` hands out.
//! Owns: the key file, sealing (ChaCha20-Poly1305, random nonce), token format and checks.
//! Never: logs a secret or a token.

use std::path::Path;

use base64::Engine as _;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hmac;
use serde::{Deserialize, Serialize};

/// Name of the key file (in the certificates directory of a region, or the data directory of
/// a single node).
pub const CLUSTER_KEY_FILE: &str = "cluster.key";
/// Registry tokens live 12 hours, as ECR's do.
pub const TOKEN_LIFETIME_MS: u64 = 12 * 3600 * 1000;
/// Longest token accepted (base64 of a small JSON claim and a MAC).
pub const TOKEN_CHARS_MAX: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cluster key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("sealed secret is corrupt or from another cluster")]
    Unseal,
    #[error("token is malformed")]
    TokenMalformed,
    #[error("token signature does not verify")]
    TokenSignature,
    #[error("token expired")]
    TokenExpired,
}

/// The region's shared key.
#[derive(Clone)]
pub struct ClusterKey {
    seal: std::sync::Arc<LessSafeKey>,
    mac: hmac::Key,
}

fn derive(raw: &[u8; 32], label: &[u8]) -> [u8; 32] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, raw);
    let tag = hmac::sign(&k, label);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

impl ClusterKey {
    pub fn from_bytes(raw: &[u8; 32]) -> ClusterKey {
        let seal_key = derive(raw, b"portolan seal v1");
        let mac_key = derive(raw, b"portolan token v1");
        ClusterKey {
            seal: std::sync::Arc::new(LessSafeKey::new(
                UnboundKey::new(&CHACHA20_POLY1305, &seal_key).expect("32-byte key"),
            )),
            mac: hmac::Key::new(hmac::HMAC_SHA256, &mac_key),
        }
    }

    /// Reads the key file, creating it (0600) with fresh random bytes when absent.
    pub fn load_or_create(path: &Path) -> Result<ClusterKey, AuthError> {
        let err = |reason: String| AuthError::Key {
            path: path.display().to_string(),
            reason,
        };
        let raw = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut b = [0u8; 32];
                crate::rt::with_rng(|r| rand::RngCore::fill_bytes(r, &mut b));
                match write_private(path, &b) {
                    Ok(()) => b.to_vec(),
                    // Another node of the region created it first: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        std::fs::read(path).map_err(|e| err(e.to_string()))?
                    }
                    Err(e) => return Err(err(e.to_string())),
                }
            }
            Err(e) => return Err(err(e.to_string())),
        };
        let raw: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| err(format!("is {} bytes, expected 32", raw.len())))?;
        Ok(ClusterKey::from_bytes(&raw))
    }

    /// Encrypts a secret for the replicated state: nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, secret: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        crate::rt::with_rng(|r| rand::RngCore::fill_bytes(r, &mut nonce));
        let mut buf = secret.to_vec();
        self.seal
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
            .expect("sealing a small buffer cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        out
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, AuthError> {
        if sealed.len() < NONCE_LEN + aead::CHACHA20_POLY1305.tag_len() {
            return Err(AuthError::Unseal);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| AuthError::Unseal)?;
        let mut buf = rest.to_vec();
        let plain = self
            .seal
            .open_in_place(nonce, Aad::empty(), &mut buf)
            .map_err(|_| AuthError::Unseal)?;
        Ok(plain.to_vec())
    }

    /// A registry token for `claims`: base64url(JSON claims) "." base64url(HMAC-SHA256).
    pub fn issue_token(&self, claims: &TokenClaims) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let body = b64.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let tag = hmac::sign(&self.mac, body.as_bytes());
        format!("{body}.{}", b64.encode(tag.as_ref()))
    }

    /// Checks a token's MAC (the only algorithm there is) and expiry; returns its claims.
    pub fn verify_token(&self, token: &str, now_ms: u64) -> Result<TokenClaims, AuthError> {
        if token.len() > TOKEN_CHARS_MAX {
            return Err(AuthError::TokenMalformed);
        }
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (body, tag) = token.split_once('.').ok_or(AuthError::TokenMalformed)?;
        let tag = b64.decode(tag).map_err(|_| AuthError::TokenMalformed)?;
        hmac::verify(&self.mac, body.as_bytes(), &tag).map_err(|_| AuthError::TokenSignature)?;
        let claims: TokenClaims =
            serde_json::from_slice(&b64.decode(body).map_err(|_| AuthError::TokenMalformed)?)
                .map_err(|_| AuthError::TokenMalformed)?;
        if claims.exp_ms <= now_ms {
            return Err(AuthError::TokenExpired);
        }
        Ok(claims)
    }
}

/// What a registry token asserts: who, through which access key, until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// 12-digit account id.
    pub account: String,
    pub user: Option<String>,
    /// The access key the token was issued for (revoking the key revokes its tokens); empty
    /// for an anonymous token.
    pub key_id: String,
    pub exp_ms: u64,
    /// A bearer token's scopes; `None` for the password `GetAuthorizationToken` hands out.
    #[serde(default)]
    pub scopes: Option<Vec<registry_api::gate::Scope>>,
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// A new access key id (`AKPT` + 16 characters) and secret (40 characters), from the RNG.
pub fn new_access_key() -> (String, String) {
    const ID_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    const SECRET_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    crate::rt::with_rng(|r| {
        use rand::Rng;
        let id: String = std::iter::once("AKPT".to_string())
            .chain((0..16).map(|_| (ID_CHARS[r.gen_range(0..ID_CHARS.len())] as char).to_string()))
            .collect();
        let secret: String = (0..40)
            .map(|_| SECRET_CHARS[r.gen_range(0..SECRET_CHARS.len())] as char)
            .collect();
        (id, secret)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_tamper() {
        let k = ClusterKey::from_bytes(&[7u8; 32]);
        let sealed = k.seal(b"secret");
        assert_eq!(k.open(&sealed).unwrap(), b"secret");
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(k.open(&bad).is_err());
        let other = ClusterKey::from_bytes(&[8u8; 32]);
        assert!(other.open(&sealed).is_err());
        assert!(k.open(&sealed[..10]).is_err());
    }

    #[test]
    fn tokens_verify_expire_and_resist_forgery() {
        let k = ClusterKey::from_bytes(&[7u8; 32]);
        let claims = TokenClaims {
            account: "000000000000".into(),
            user: Some("alice".into()),
            key_id: "AKPTAAAAAAAAAAAAAAAA".into(),
            exp_ms: 1_000,
            scopes: None,
        };
        let t = k.issue_token(&claims);
        assert_eq!(k.verify_token(&t, 999).unwrap(), claims);
        assert!(matches!(
            k.verify_token(&t, 1_000),
            Err(AuthError::TokenExpired)
        ));
        // Another cluster's key, a changed claim, a missing or foreign MAC: all refused.
        let other = ClusterKey::from_bytes(&[8u8; 32]);
        assert!(matches!(
            other.verify_token(&t, 0),
            Err(AuthError::TokenSignature)
        ));
        let (body, _) = t.split_once('.').unwrap();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let forged_claims = TokenClaims {
            exp_ms: u64::MAX,
            ..claims.clone()
        };
        let forged_body = b64.encode(serde_json::to_vec(&forged_claims).unwrap());
        let forged = format!("{forged_body}.{}", t.split_once('.').unwrap().1);
        assert!(matches!(
            k.verify_token(&forged, 0),
            Err(AuthError::TokenSignature)
        ));
        assert!(k.verify_token(body, 0).is_err());
        assert!(k.verify_token(&format!("{body}.none"), 0).is_err());
        assert!(k.verify_token(&"x".repeat(5000), 0).is_err());
    }

    #[test]
    fn access_keys_are_well_formed() {
        crate::rt::seed_thread_rng(1);
        let (id, secret) = new_access_key();
        assert!(engine::iam::valid_access_key_id(&id), "{id}");
        assert_eq!(secret.len(), 40);
        assert_ne!(new_access_key().0, id);
    }
}
