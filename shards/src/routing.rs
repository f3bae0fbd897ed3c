//! Stable routing of instance ids to shards, and ids derived from keys.
//!
//! The hash is FNV-1a 64, fixed forever: it decides which shard's WAL holds
//! an instance, so changing it would strand data (the shard count recorded
//! in the data directory guards the modulus; this guards the function).

/// FNV-1a 64-bit hash.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The shard that owns `instance_id` among `shards` shards.
pub fn shard_for(instance_id: &str, shards: usize) -> usize {
    assert!(shards > 0);
    (fnv1a64(instance_id.as_bytes()) % shards as u64) as usize
}

/// The instance id for a CREATE_INSTANCE that has an idempotency key but no
/// id (DECISIONS D7): derived from the key, so that a retry lands on the same
/// shard and finds the recorded result. Formatted as a UUID (version 8,
/// "custom") so it looks like the ids the server generates otherwise.
pub fn id_from_idempotency_key(key: &str) -> String {
    let a = fnv1a64(key.as_bytes());
    let mut salted = Vec::with_capacity(key.len() + 8);
    salted.extend_from_slice(b"rstmdb\0");
    salted.extend_from_slice(key.as_bytes());
    let b = fnv1a64(&salted);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a.to_be_bytes());
    bytes[8..].copy_from_slice(&b.to_be_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x80; // version 8
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    let h: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn routing_is_stable_and_in_range() {
        assert_eq!(shard_for("order-1", 1), 0);
        for n in 1..8 {
            for i in 0..100 {
                let id = format!("i-{i}");
                assert!(shard_for(&id, n) < n);
                assert_eq!(shard_for(&id, n), shard_for(&id, n));
            }
        }
    }

    #[test]
    fn derived_ids_are_deterministic_uuids() {
        let a = id_from_idempotency_key("k1");
        assert_eq!(a, id_from_idempotency_key("k1"));
        assert_ne!(a, id_from_idempotency_key("k2"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "8");
    }
}
