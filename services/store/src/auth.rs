//! Authentication against the token table: `Authorization: Bearer <token>` → the
//! token's organisation, role, scopes and, for a workstation credential, its workstation.
//! Tokens are looked up by SHA-256 hash; answers (a principal, or "unknown") are
//! cached in a bounded `moka` cache for [`CACHE_TTL`], so a burst of requests
//! costs one query and a revoked token stops working within that time.

use futures::future::BoxFuture;
use moka::sync::Cache;
use sqlx::PgPool;
use std::time::Duration;
use tanjiren_bus::Authenticate;
use tanjiren_shared::WireError;
use tanjiren_shared::model::Role;
use tanjiren_shared::protocol::Principal;
use tanjiren_shared::secret::ApiToken;

/// How long a looked-up token is trusted without asking Postgres again.
pub const CACHE_TTL: Duration = Duration::from_secs(10);
/// Most tokens cached; beyond it the least recently used go first.
pub const CACHE_MAX: u64 = 10_000;

/// Tokens in Postgres, behind a cache. Clones share the cache.
#[derive(Clone)]
pub struct TokenStore {
    db: PgPool,
    /// token hash → the principal, or None for an unknown or revoked token.
    cache: Cache<String, Option<Principal>>,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStore")
            .field("cached", &self.cache.entry_count())
            .finish()
    }
}

impl TokenStore {
    pub fn new(db: PgPool) -> Self {
        Self {
            db,
            cache: Cache::builder().max_capacity(CACHE_MAX).time_to_live(CACHE_TTL).build(),
        }
    }

    /// Resolves the Authorization header value (if any).
    ///
    /// # Errors
    /// `unauthorized` for a missing, malformed, unknown or revoked token;
    /// `unavailable` when Postgres cannot be reached.
    pub async fn principal(&self, authorization: Option<&str>) -> Result<Principal, WireError> {
        let token = authorization.and_then(ApiToken::from_authorization).ok_or_else(|| {
            WireError::unauthorized("missing bearer token: send the header `Authorization: Bearer <token>`")
        })?;
        let hash = token.hash();
        if let Some(known) = self.cache.get(&hash) {
            return known.ok_or_else(bad_token);
        }
        type Row = (uuid::Uuid, uuid::Uuid, String, String, Option<uuid::Uuid>, Vec<String>);
        let row: Option<Row> = sqlx::query_as(
            "SELECT id, org_id, name, role, workstation_id, scopes FROM api_tokens
             WHERE token_hash = $1 AND revoked_at IS NULL",
        )
        .bind(&hash)
        .fetch_optional(&self.db)
        .await
        .map_err(crate::db_error)?;
        let principal = row.and_then(|(token_id, org_id, name, role, workstation, scopes)| {
            // A scope this version does not know: the token is refused outright, never
            // read as unscoped (which would give it its whole role).
            let parsed: Vec<_> = scopes.iter().map(|s| s.parse().ok()).collect::<Option<_>>()?;
            Some(Principal {
                org_id: org_id.into(),
                token_id,
                token_name: name,
                role: role.parse::<Role>().ok()?,
                workstation_id: workstation.map(Into::into),
                scopes: parsed,
            })
        });
        self.cache.insert(hash, principal.clone());
        principal.ok_or_else(bad_token)
    }
}

impl Authenticate for TokenStore {
    fn authenticate<'a>(&'a self, authorization: Option<&'a str>) -> BoxFuture<'a, Result<Principal, WireError>> {
        Box::pin(self.principal(authorization))
    }
}

fn bad_token() -> WireError {
    WireError::unauthorized("unknown or revoked token")
}
