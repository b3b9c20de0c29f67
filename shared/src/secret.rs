//! Secrets (API tokens): generated with enough randomness, shown once, stored
//! only as a SHA-256 hash, never printed by `Debug`.

use sha2::{Digest, Sha256};
use std::fmt;

/// Prefix that makes Tanjiren tokens recognisable in logs and secret scanners.
pub const TOKEN_PREFIX: &str = "tjr_";

/// A bearer token in clear text. `Debug` redacts it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl ApiToken {
    /// Wraps a token read from a header or file.
    pub fn new(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    /// Builds a token from 32 random bytes (256 bits) supplied by the caller's RNG.
    pub fn from_random(bytes: [u8; 32]) -> Self {
        Self(format!("{TOKEN_PREFIX}{}", hex::encode(bytes)))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The stored form: hex SHA-256 of the clear text.
    pub fn hash(&self) -> String {
        hash_secret(&self.0)
    }

    /// Parses `Bearer <token>` from an Authorization header value.
    pub fn from_authorization(header: &str) -> Option<Self> {
        let rest = header
            .trim()
            .strip_prefix("Bearer ")
            .or_else(|| header.trim().strip_prefix("bearer "))?;
        let t = rest.trim();
        (!t.is_empty()).then(|| Self(t.to_string()))
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_hash_and_redact() {
        let t = ApiToken::from_random([7u8; 32]);
        assert!(t.expose().starts_with(TOKEN_PREFIX));
        assert_eq!(t.expose().len(), 4 + 64);
        assert_eq!(t.hash().len(), 64);
        assert_ne!(t.hash(), t.expose());
        assert_eq!(format!("{t:?}"), "ApiToken(<redacted>)");
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(ApiToken::from_authorization("Bearer abc").unwrap().expose(), "abc");
        assert!(ApiToken::from_authorization("Basic abc").is_none());
        assert!(ApiToken::from_authorization("Bearer   ").is_none());
    }
}
