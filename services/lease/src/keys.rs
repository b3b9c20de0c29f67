//! The Redis side of a lease: the key `{prefix}:lease:{<step>}` (hash-tagged per
//! step for Redis Cluster) holding `owner:generation` with the lease's TTL, and the
//! atomic scripts that are the only writers of it.
//!
//! The key is a *mirror* of the lease Postgres holds, written only after Postgres
//! granted or renewed it: it tells tools and operators who holds a step without a
//! database query, and it expires by itself when renewals stop. It never grants,
//! extends or revives anything — a key planted by hand, or left behind by a race,
//! changes no decision, and the scripts never move a key back to an older
//! generation.

use redis::Script;
use std::sync::LazyLock;
use tanjiren_ops::metrics::Count;
use tanjiren_shared::ids::StepId;
use tanjiren_store::Connections;

/// The liveness key of a step's lease.
pub fn lease_key(prefix: &str, step: StepId) -> String {
    format!("{prefix}:lease:{{{step}}}")
}

/// The value stored under the key.
pub fn lease_value(owner: &str, generation: i64) -> String {
    format!("{owner}:{generation}")
}

/// Mirrors a lease Postgres has just granted or renewed: sets `owner:generation`
/// with the TTL unless the key holds a newer generation. ARGV: owner, generation,
/// ttl_ms. 1 = set, 0 = a newer generation is there (left alone).
pub static MIRROR: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local g = tonumber(string.match(cur, ':(%d+)$'))
  if g and g > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
return 1",
    )
});

/// Deletes the key only if it holds this owner and generation. ARGV: owner,
/// generation. 1 = deleted, 0 = absent or another lease's.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] .. ':' .. ARGV[2] then return redis.call('DEL', KEYS[1]) end
return 0",
    )
});

/// Deletes the key if it holds generation ARGV[1] or an older one (whoever the
/// owner): what the reconciler does once Postgres has taken a lease back.
/// 1 = deleted, 0 = absent or newer.
pub static FORGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local g = tonumber(string.match(cur, ':(%d+)$'))
if g and g > tonumber(ARGV[1]) then return 0 end
return redis.call('DEL', KEYS[1])",
    )
});

/// One script call per lease, pipelined on the multiplexed connection.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KeyOp {
    /// [`MIRROR`] a granted or renewed lease.
    Mirror,
    /// [`RELEASE`] exactly this owner's key.
    Release,
    /// [`FORGET`] any key at this generation or older.
    Forget,
}

/// Applies `op` to each `(step, owner, generation)`. Failures are logged and
/// counted, never returned: the mirror takes part in no decision, and a key left
/// behind expires by its TTL.
pub(crate) async fn apply(conns: &Connections, op: KeyOp, leases: &[(StepId, &str, i64)]) {
    if leases.is_empty() {
        return;
    }
    let redis = conns.redis();
    let prefix = &conns.config.redis_key_prefix;
    let ttl_ms = conns.config.lease_ttl_ms;
    let calls = leases.iter().map(|(step, owner, generation)| {
        let mut c = redis.clone();
        let key = lease_key(prefix, *step);
        async move {
            let mut inv = match op {
                KeyOp::Mirror => MIRROR.key(key),
                KeyOp::Release => RELEASE.key(key),
                KeyOp::Forget => FORGET.key(key),
            };
            match op {
                KeyOp::Mirror => inv.arg(*owner).arg(*generation).arg(ttl_ms),
                KeyOp::Release => inv.arg(*owner).arg(*generation),
                KeyOp::Forget => inv.arg(*generation),
            };
            inv.invoke_async::<i64>(&mut c).await
        }
    });
    let failed = futures::future::join_all(calls)
        .await
        .into_iter()
        .filter_map(Result::err)
        .inspect(|e| tracing::debug!(error = %e, ?op, "lease mirror write failed"))
        .count();
    if failed > 0 {
        tracing::warn!(
            failed,
            ?op,
            "could not update the Redis mirror of some leases; they expire by their TTL"
        );
        conns.metrics.count(Count::LeaseMirrorErrors, failed as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hash_tagged_per_step() {
        let step = StepId::new();
        assert_eq!(lease_key("t1", step), format!("t1:lease:{{{step}}}"));
        assert_eq!(lease_value("ws-1:abc", 7), "ws-1:abc:7");
    }
}
