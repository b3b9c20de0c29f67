//! The Redis side of a lease: the key `{prefix}:lease:{<step>}` (hash-tagged per
//! step for Redis Cluster) holding `owner:generation` with a TTL, and the three
//! atomic scripts that are the only writers of it.

use redis::Script;
use std::sync::LazyLock;
use tanjiren_shared::ids::StepId;

/// The liveness key of a step's lease.
pub fn lease_key(prefix: &str, step: StepId) -> String {
    format!("{prefix}:lease:{{{step}}}")
}

/// The value stored under the key.
pub fn lease_value(owner: &str, generation: i64) -> String {
    format!("{owner}:{generation}")
}

/// Sets the key unless it holds the same or a newer generation. 1 = set, 0 = refused.
pub static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local g = tonumber(string.match(cur, ':(%d+)$'))
  if g and g >= tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
return 1",
    )
});

/// Extends the TTL only for the matching owner and generation. 1 = renewed, 0 = held by another, -1 = missing.
pub static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('GET', KEYS[1])
if not cur then return -1 end
if cur ~= ARGV[1] .. ':' .. ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1",
    )
});

/// Deletes the key only if it holds this owner and generation. 1 = deleted, 0 = not ours.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] .. ':' .. ARGV[2] then return redis.call('DEL', KEYS[1]) end
return 0",
    )
});

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
