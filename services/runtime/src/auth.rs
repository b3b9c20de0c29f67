//! Authentication: `Authorization: Bearer <token>` → the token's organisation,
//! role and, for a workstation credential, its workstation. Tokens are looked up
//! by SHA-256 hash; results are cached briefly so a burst of requests costs one
//! query, and a revoked token stops working within the cache lifetime.

use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tanjiren_shared::WireError;
use tanjiren_shared::model::Role;
use tanjiren_shared::protocol::Principal;
use tanjiren_shared::secret::ApiToken;

const CACHE_TTL: Duration = Duration::from_secs(10);
const CACHE_MAX: usize = 10_000;

/// token hash → (the principal, or None for an unknown token; when it was looked up)
type Cache = HashMap<String, (Option<Principal>, Instant)>;

#[derive(Clone)]
pub struct Authenticator {
    db: PgPool,
    cache: Arc<RwLock<Cache>>,
}

impl Authenticator {
    pub fn new(db: PgPool) -> Self {
        Self {
            db,
            cache: Arc::default(),
        }
    }

    /// Resolves the Authorization header value (if any).
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, WireError> {
        let token = authorization.and_then(ApiToken::from_authorization).ok_or_else(|| {
            WireError::unauthorized("missing bearer token: send the header `Authorization: Bearer <token>`")
        })?;
        let hash = token.hash();
        if let Some((p, at)) = self.cache.read().expect("auth cache").get(&hash)
            && at.elapsed() < CACHE_TTL
        {
            return p.clone().ok_or_else(bad_token);
        }
        type Row = (uuid::Uuid, uuid::Uuid, String, String, Option<uuid::Uuid>);
        let row: Option<Row> = sqlx::query_as(
            "SELECT id, org_id, name, role, workstation_id FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
        )
        .bind(&hash)
        .fetch_optional(&self.db)
        .await
        .map_err(crate::db_error)?;
        let principal = row.and_then(|(token_id, org_id, name, role, workstation)| {
            Some(Principal {
                org_id: org_id.into(),
                token_id,
                token_name: name,
                role: role.parse::<Role>().ok()?,
                workstation_id: workstation.map(Into::into),
            })
        });
        let mut cache = self.cache.write().expect("auth cache");
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(hash, (principal.clone(), Instant::now()));
        principal.ok_or_else(bad_token)
    }
}

fn bad_token() -> WireError {
    WireError::unauthorized("unknown or revoked token")
}
