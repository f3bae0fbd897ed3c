//! Which executor runs which shard and which frontend (`server.layout`).
//!
//! * `colocated` (the default, the seastar shape): executor *i* owns shard
//!   *i* and, for *i* below `server.frontends`, also accepts connections. A
//!   request whose shard lives on the executor that read it never leaves
//!   that core: frontend and shard are two tasks of one executor, and the
//!   channel between them wakes a task on the same thread instead of
//!   another core. With one shard nothing crosses cores at all.
//! * `dedicated`: frontends on executors of their own, shards on the
//!   following ones; every request crosses executors twice.
//!
//! The choice and its measurements are in docs/ARCHITECTURE.md and
//! docs/PERFORMANCE.md.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

/// `server.layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Every executor owns a shard; the first `frontends` also accept.
    #[default]
    Colocated,
    /// Frontend executors and shard executors apart.
    Dedicated,
}

impl FromStr for Layout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "colocated" => Ok(Layout::Colocated),
            "dedicated" => Ok(Layout::Dedicated),
            other => Err(format!("unknown layout {other:?}")),
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Colocated => "colocated",
            Layout::Dedicated => "dedicated",
        })
    }
}

/// What one executor runs, and on which CPU slot (index into the CPUs this
/// process may use, wrapping around when there are more executors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Role {
    /// The shard it owns, if any.
    pub shard: Option<usize>,
    /// The frontend it runs, if any.
    pub frontend: Option<usize>,
    /// CPU slot.
    pub slot: usize,
}

impl Role {
    /// The executor's thread name.
    pub fn name(&self) -> String {
        match (self.shard, self.frontend) {
            (Some(s), Some(f)) => format!("shard-{s}+frontend-{f}"),
            (Some(s), None) => format!("shard-{s}"),
            (None, Some(f)) => format!("frontend-{f}"),
            (None, None) => unreachable!("an executor runs something"),
        }
    }
}

/// The executors for `shards` shards and `frontends` frontends: every shard
/// and every frontend exactly once.
pub fn plan(layout: Layout, shards: usize, frontends: usize) -> Vec<Role> {
    assert!(shards >= 1 && frontends >= 1);
    let roles: Vec<Role> = match layout {
        Layout::Colocated => (0..shards.max(frontends))
            .map(|i| Role {
                shard: (i < shards).then_some(i),
                frontend: (i < frontends).then_some(i),
                slot: i,
            })
            .collect(),
        Layout::Dedicated => (0..frontends)
            .map(|f| Role {
                shard: None,
                frontend: Some(f),
                slot: f,
            })
            .chain((0..shards).map(|s| Role {
                shard: Some(s),
                frontend: None,
                slot: frontends + s,
            }))
            .collect(),
    };
    debug_assert_eq!(roles.iter().filter(|r| r.shard.is_some()).count(), shards);
    debug_assert_eq!(
        roles.iter().filter(|r| r.frontend.is_some()).count(),
        frontends
    );
    roles
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(roles: &[Role]) -> (usize, usize) {
        (
            roles.iter().filter(|r| r.shard.is_some()).count(),
            roles.iter().filter(|r| r.frontend.is_some()).count(),
        )
    }

    #[test]
    fn colocated_puts_frontends_on_shard_executors() {
        let p = plan(Layout::Colocated, 1, 1);
        assert_eq!(
            p,
            vec![Role {
                shard: Some(0),
                frontend: Some(0),
                slot: 0
            }]
        );
        let p = plan(Layout::Colocated, 4, 2);
        assert_eq!(p.len(), 4);
        assert_eq!(count(&p), (4, 2));
        assert_eq!(p[1].name(), "shard-1+frontend-1");
        assert_eq!(p[3].name(), "shard-3");
        // More frontends than shards: the extra ones run alone.
        let p = plan(Layout::Colocated, 1, 3);
        assert_eq!(count(&p), (1, 3));
        assert_eq!(p[2].name(), "frontend-2");
    }

    #[test]
    fn dedicated_keeps_them_apart() {
        let p = plan(Layout::Dedicated, 3, 2);
        assert_eq!(p.len(), 5);
        assert_eq!(count(&p), (3, 2));
        assert!(p.iter().all(|r| r.shard.is_none() || r.frontend.is_none()));
        let slots: Vec<usize> = p.iter().map(|r| r.slot).collect();
        assert_eq!(slots, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn parses_its_names() {
        assert_eq!("Colocated".parse::<Layout>(), Ok(Layout::Colocated));
        assert_eq!(" dedicated".parse::<Layout>(), Ok(Layout::Dedicated));
        assert!("both".parse::<Layout>().is_err());
        assert_eq!(Layout::Dedicated.to_string(), "dedicated");
    }
}
