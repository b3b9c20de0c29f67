//! What every long-lived stream of the gateway obeys (server-sent events,
//! `subscriptions/listen`, `resources/subscribe`): at most
//! `gateway_max_streams_per_token` open per token ([`StreamSlots`]), and an end
//! once the token is revoked ([`revoked`]: checked every [`RECHECK`], so within
//! that plus the services' token cache lifetime, 20 s in all).

use crate::upstream::{Caller, Upstream};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tanjiren_shared::WireError;
use tanjiren_shared::error::ErrorCode;

/// How often an open stream asks again whether its token is still good.
pub const RECHECK: Duration = Duration::from_secs(10);

/// Open streams per token digest.
#[derive(Clone, Debug)]
pub struct StreamSlots {
    max: usize,
    open: Arc<Mutex<HashMap<[u8; 32], usize>>>,
}

/// One open stream; dropping it frees its slot.
#[derive(Debug)]
pub struct Slot {
    key: [u8; 32],
    open: Arc<Mutex<HashMap<[u8; 32], usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl StreamSlots {
    pub fn new(max_per_token: u64) -> Self {
        Self {
            max: max_per_token.max(1) as usize,
            open: Default::default(),
        }
    }

    /// A slot for one more stream of `caller`'s token.
    ///
    /// # Errors
    /// `too_many` when the token holds the most it may.
    pub fn acquire(&self, caller: &Caller) -> Result<Slot, WireError> {
        let key: [u8; 32] = Sha256::digest(caller.token.as_bytes()).into();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_default();
        if *n >= self.max {
            return Err(WireError::new(
                ErrorCode::TooMany,
                format!(
                    "this token already holds {} open streams and subscriptions (gateway_max_streams_per_token); \
                     close one first",
                    self.max
                ),
            ));
        }
        *n += 1;
        Ok(Slot {
            key,
            open: self.open.clone(),
        })
    }
}

/// Resolves once `caller`'s token is no longer accepted (revoked, or its
/// organisation's rights gone); never while the services are merely unreachable.
pub async fn revoked(upstream: &Upstream, caller: &Caller) {
    loop {
        tokio::time::sleep(RECHECK).await;
        match upstream.whoami(&caller.token).await {
            Err(e) if matches!(e.code, ErrorCode::Unauthorized | ErrorCode::Forbidden) => return,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tanjiren_shared::ids::OrgId;
    use tanjiren_shared::model::Role;
    use tanjiren_shared::protocol::Principal;

    fn caller(token: &str) -> Caller {
        Caller {
            token: token.into(),
            principal: Principal {
                org_id: OrgId::new(),
                token_id: uuid::Uuid::now_v7(),
                token_name: "t".into(),
                role: Role::Member,
                workstation_id: None,
                scopes: vec![],
            },
        }
    }

    #[test]
    fn a_token_holds_at_most_its_share_and_a_closed_stream_frees_its_slot() {
        let slots = StreamSlots::new(2);
        let (a, b) = (caller("a"), caller("b"));
        let first = slots.acquire(&a).unwrap();
        let _second = slots.acquire(&a).unwrap();
        assert_eq!(slots.acquire(&a).unwrap_err().code, ErrorCode::TooMany);
        let _other = slots.acquire(&b).expect("another token has its own share");
        drop(first);
        let _again = slots.acquire(&a).expect("a closed stream frees its slot");
    }
}
