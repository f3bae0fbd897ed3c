//! Re-sharding: the recovered states of every old shard redistributed into
//! a different number of shards, by the same placement rule the router uses
//! (`routing::shard_for`). Pure; the daemon writes the results as snapshots
//! of a new layout and switches to it atomically.

use crate::engine::{Engine, EngineLimits};
use crate::idempotency::Cached;
use crate::routing::shard_for;

/// Moves every instance (tombstones included) and its idempotency entries
/// to its shard among `to`; machine definitions and aborted batch ids go to
/// every shard. `next_offset` is the first offset not used by any old
/// shard: the new shards' snapshots cover everything below it.
///
/// Atomic-batch parts must already be resolved (recovery does that).
pub fn redistribute(
    old: Vec<Engine>,
    to: usize,
    limits: &EngineLimits,
    next_offset: u64,
) -> Vec<Engine> {
    assert!(to >= 1 && next_offset >= 1);
    let mut new: Vec<Engine> = (0..to).map(|_| Engine::new(limits)).collect();
    let mut keys: Vec<(String, String, Cached, i64)> = Vec::new();
    let before: usize = old.iter().map(|e| e.instances.len()).sum();
    for mut e in old {
        assert!(
            e.unresolved_parts().is_empty(),
            "batch parts are resolved before re-sharding"
        );
        for (name, versions) in &e.machines {
            for (v, def) in versions {
                for n in new.iter_mut() {
                    n.adopt_machine(name.clone(), *v, def.clone());
                }
            }
        }
        for n in new.iter_mut() {
            n.aborted.extend(e.aborted.iter().cloned());
        }
        e.idempotency
            .visit_from(0, u64::MAX, usize::MAX, |id, key, c, at| {
                keys.push((id.to_owned(), key.to_owned(), c.clone(), at))
            });
        for (id, inst) in std::mem::take(&mut e.instances) {
            let prev = new[shard_for(&id, to)].instances.insert(id, inst);
            assert!(prev.is_none(), "an instance id lives on one shard only");
        }
    }
    // Oldest first, so each new window keeps the newest entries if it is
    // smaller than the old ones together.
    keys.sort_by_key(|k| k.3);
    for (id, key, cached, at) in keys {
        let _ = new[shard_for(&id, to)]
            .idempotency
            .insert(&id, &key, cached, at);
    }
    for n in new.iter_mut() {
        n.max_offset = next_offset - 1;
    }
    debug_assert_eq!(new.iter().map(|e| e.instances.len()).sum::<usize>(), before);
    new
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal_entry::WalEntry;
    use serde_json::json;

    fn limits() -> EngineLimits {
        EngineLimits {
            idempotency_entries: 100,
            idempotency_max_age_ms: 0,
        }
    }

    #[test]
    fn every_instance_lands_where_the_router_looks_for_it() {
        let def = json!({"states": ["a"], "initial": "a", "transitions": []});
        let mut old: Vec<Engine> = (0..2).map(|_| Engine::new(&limits())).collect();
        let mut offset = 1;
        for (s, e) in old.iter_mut().enumerate() {
            e.replay(
                offset,
                WalEntry::PutMachine {
                    machine: "m".into(),
                    version: 1,
                    definition_hash: String::new(),
                    definition: def.clone(),
                },
            )
            .unwrap();
            offset += 1;
            for i in 0..50 {
                let id = format!("i{i}");
                if shard_for(&id, 2) != s {
                    continue;
                }
                e.replay(
                    offset,
                    WalEntry::CreateInstance {
                        instance_id: id.clone(),
                        machine: "m".into(),
                        version: 1,
                        initial_state: "a".into(),
                        initial_ctx: crate::ctx::Ctx::from_value(&json!({"i": i})),
                        idempotency_key: Some(format!("k{i}")),
                        ts: i,
                    },
                )
                .unwrap();
                offset += 1;
            }
        }
        let new = redistribute(old, 3, &limits(), offset);
        assert_eq!(new.len(), 3);
        for i in 0..50 {
            let id = format!("i{i}");
            let home = shard_for(&id, 3);
            for (s, e) in new.iter().enumerate() {
                assert_eq!(e.instances.contains_key(&id), s == home, "{id} on {s}");
            }
            assert!(new[home]
                .idempotency
                .get(&id, &format!("k{i}"), 0)
                .is_some());
        }
        for e in &new {
            assert_eq!(e.machine_defs().len(), 1);
            assert_eq!(e.max_offset(), offset - 1);
        }
    }
}
