//! The peer wire format of Raft messages: our own, fixed little-endian
//! layout, so that bytes from the network are never handed to the
//! protobuf 2 parser (it has an advisory for hostile input). Every length
//! and count is checked against the bytes actually present and against a
//! limit before anything is allocated.
//!
//! A frame is one message of one group: version, group (the shard), the
//! message fields, its entries, and its snapshot if it has one.

use raft::prelude::{ConfState, Entry, EntryType, Message, MessageType, Snapshot};

/// Format version written first in every frame.
pub const VERSION: u8 = 1;
/// Most entries in one message (raft-rs bounds appends by bytes; this is
/// the decoder's own bound).
pub const MAX_ENTRIES: usize = 1 << 16;
/// Most node ids in one list of a configuration.
pub const MAX_NODES: usize = 1 << 10;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame ends early (needed {needed} more bytes at byte {at})")]
    Truncated { at: usize, needed: usize },
    #[error("unsupported frame version {0}")]
    Version(u8),
    #[error("unknown message type {0}")]
    MessageType(u8),
    #[error("unknown entry type {0}")]
    EntryType(u8),
    #[error("{what} count {count} over the limit {limit}")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("{0} bytes left over after the message")]
    Trailing(usize),
    #[error("flag byte {value} at byte {at} is neither 0 nor 1")]
    Flag { at: usize, value: u8 },
}

/// Encodes `msg` of group `group` as one frame.
pub fn encode(group: u32, msg: &Message, out: &mut Vec<u8>) {
    out.push(VERSION);
    out.extend_from_slice(&group.to_le_bytes());
    out.push(msg.get_msg_type() as u8);
    for v in [
        msg.to,
        msg.from,
        msg.term,
        msg.log_term,
        msg.index,
        msg.commit,
        msg.commit_term,
        msg.request_snapshot,
        msg.reject_hint,
        msg.deprecated_priority,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&msg.priority.to_le_bytes());
    out.push(msg.reject as u8);
    put_bytes(out, &msg.context);
    out.extend_from_slice(&(msg.get_entries().len() as u32).to_le_bytes());
    for e in msg.get_entries() {
        encode_entry(e, out);
    }
    out.push(msg.has_snapshot() as u8);
    if msg.has_snapshot() {
        encode_snapshot(msg.get_snapshot(), out);
    }
}

/// Decodes one whole frame: (group, message).
pub fn decode(frame: &[u8]) -> Result<(u32, Message), WireError> {
    let mut r = Reader { buf: frame, at: 0 };
    let version = r.u8()?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let group = r.u32()?;
    let mut m = Message::default();
    m.set_msg_type(message_type(r.u8()?)?);
    m.to = r.u64()?;
    m.from = r.u64()?;
    m.term = r.u64()?;
    m.log_term = r.u64()?;
    m.index = r.u64()?;
    m.commit = r.u64()?;
    m.commit_term = r.u64()?;
    m.request_snapshot = r.u64()?;
    m.reject_hint = r.u64()?;
    m.deprecated_priority = r.u64()?;
    m.priority = r.u64()? as i64;
    m.reject = r.flag()?;
    m.context = r.bytes()?.to_vec().into();
    let entries = r.count("entry", MAX_ENTRIES)?;
    for _ in 0..entries {
        m.mut_entries().push(decode_entry(&mut r)?);
    }
    if r.flag()? {
        m.set_snapshot(decode_snapshot(&mut r)?);
    }
    if r.at != frame.len() {
        return Err(WireError::Trailing(frame.len() - r.at));
    }
    Ok((group, m))
}

fn encode_entry(e: &Entry, out: &mut Vec<u8>) {
    out.push(e.get_entry_type() as u8);
    out.extend_from_slice(&e.term.to_le_bytes());
    out.extend_from_slice(&e.index.to_le_bytes());
    put_bytes(out, &e.data);
    put_bytes(out, &e.context);
    out.push(e.sync_log as u8);
}

fn decode_entry(r: &mut Reader<'_>) -> Result<Entry, WireError> {
    let mut e = Entry::default();
    e.set_entry_type(entry_type(r.u8()?)?);
    e.term = r.u64()?;
    e.index = r.u64()?;
    e.data = r.bytes()?.to_vec().into();
    e.context = r.bytes()?.to_vec().into();
    e.sync_log = r.flag()?;
    Ok(e)
}

fn encode_snapshot(s: &Snapshot, out: &mut Vec<u8>) {
    put_bytes(out, &s.data);
    let meta = s.get_metadata();
    out.extend_from_slice(&meta.index.to_le_bytes());
    out.extend_from_slice(&meta.term.to_le_bytes());
    let cs = meta.get_conf_state();
    for ids in [
        &cs.voters,
        &cs.learners,
        &cs.voters_outgoing,
        &cs.learners_next,
    ] {
        out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        for id in ids {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    out.push(cs.auto_leave as u8);
}

fn decode_snapshot(r: &mut Reader<'_>) -> Result<Snapshot, WireError> {
    let mut s = Snapshot {
        data: r.bytes()?.to_vec().into(),
        ..Default::default()
    };
    let meta = s.mut_metadata();
    meta.index = r.u64()?;
    meta.term = r.u64()?;
    let mut cs = ConfState::default();
    for ids in [
        &mut cs.voters,
        &mut cs.learners,
        &mut cs.voters_outgoing,
        &mut cs.learners_next,
    ] {
        let n = r.count("node id", MAX_NODES)?;
        for _ in 0..n {
            ids.push(r.u64()?);
        }
    }
    cs.auto_leave = r.flag()?;
    meta.set_conf_state(cs);
    Ok(s)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn message_type(n: u8) -> Result<MessageType, WireError> {
    use MessageType::*;
    const ALL: [MessageType; 19] = [
        MsgHup,
        MsgBeat,
        MsgPropose,
        MsgAppend,
        MsgAppendResponse,
        MsgRequestVote,
        MsgRequestVoteResponse,
        MsgSnapshot,
        MsgHeartbeat,
        MsgHeartbeatResponse,
        MsgUnreachable,
        MsgSnapStatus,
        MsgCheckQuorum,
        MsgTransferLeader,
        MsgTimeoutNow,
        MsgReadIndex,
        MsgReadIndexResp,
        MsgRequestPreVote,
        MsgRequestPreVoteResponse,
    ];
    ALL.iter()
        .copied()
        .find(|t| *t as u8 == n)
        .ok_or(WireError::MessageType(n))
}

fn entry_type(n: u8) -> Result<EntryType, WireError> {
    match n {
        0 => Ok(EntryType::EntryNormal),
        1 => Ok(EntryType::EntryConfChange),
        2 => Ok(EntryType::EntryConfChangeV2),
        _ => Err(WireError::EntryType(n)),
    }
}

/// Reads fields off a frame, each checked against what is left.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let left = self.buf.len() - self.at;
        if n > left {
            return Err(WireError::Truncated {
                at: self.at,
                needed: n - left,
            });
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    /// A flag: exactly 0 or 1, so that every frame has one encoding.
    fn flag(&mut self) -> Result<bool, WireError> {
        let at = self.at;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(WireError::Flag { at, value }),
        }
    }

    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// A count, bounded by `limit` and by the bytes left (every item takes
    /// at least one byte), so no allocation follows a forged count.
    fn count(&mut self, what: &'static str, limit: usize) -> Result<usize, WireError> {
        let count = self.u32()? as usize;
        if count > limit {
            return Err(WireError::TooMany { what, count, limit });
        }
        let left = self.buf.len() - self.at;
        if count > left {
            return Err(WireError::Truncated {
                at: self.at,
                needed: count - left,
            });
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(entries: Vec<(u64, u64, Vec<u8>)>, snapshot: bool) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.to = 2;
        m.from = 1;
        m.term = 7;
        m.log_term = 6;
        m.index = 41;
        m.commit = 40;
        m.reject_hint = u64::MAX;
        m.priority = -3;
        m.context = b"ctx".to_vec().into();
        for (term, index, data) in entries {
            m.mut_entries().push(Entry {
                term,
                index,
                data: data.into(),
                ..Default::default()
            });
        }
        if snapshot {
            let mut s = Snapshot {
                data: b"snap".to_vec().into(),
                ..Default::default()
            };
            s.mut_metadata().index = 40;
            s.mut_metadata().term = 6;
            let cs = ConfState {
                voters: vec![1, 2, 3],
                learners: vec![4],
                ..Default::default()
            };
            s.mut_metadata().set_conf_state(cs);
            m.set_snapshot(s);
        }
        m
    }

    proptest! {
        #[test]
        fn frames_round_trip(
            group in any::<u32>(),
            entries in prop::collection::vec((any::<u64>(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..64)), 0..8),
            snapshot in any::<bool>(),
        ) {
            let m = sample(entries, snapshot);
            let mut buf = Vec::new();
            encode(group, &m, &mut buf);
            let (g, back) = decode(&buf).unwrap();
            prop_assert_eq!(g, group);
            prop_assert_eq!(back, m);
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn every_truncation_is_refused(cut in 0usize..200) {
            let m = sample(vec![(7, 42, b"data".to_vec())], true);
            let mut buf = Vec::new();
            encode(9, &m, &mut buf);
            let cut = cut % buf.len();
            prop_assert!(decode(&buf[..cut]).is_err());
        }
    }

    #[test]
    fn forged_counts_and_types_are_refused() {
        let m = sample(vec![], false);
        let mut buf = Vec::new();
        encode(1, &m, &mut buf);
        let mut bad = buf.clone();
        bad[0] = 2;
        assert_eq!(decode(&bad), Err(WireError::Version(2)));
        let mut bad = buf.clone();
        bad[5] = 200;
        assert_eq!(decode(&bad), Err(WireError::MessageType(200)));
        // The entry count sits just before the trailing snapshot flag.
        let mut bad = buf.clone();
        let at = buf.len() - 5;
        bad[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&bad), Err(WireError::TooMany { .. })));
        let mut bad = buf.clone();
        bad.push(0);
        assert_eq!(decode(&bad), Err(WireError::Trailing(1)));
    }
}
