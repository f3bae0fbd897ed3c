//! The payload of a drain's entry: its staged records, each with the
//! offset the leader assigned, its kind byte and its bytes. Leader and
//! followers, the daemon and the simulation, all read and write it here.

use crate::engine::Staged;

/// Bytes of a record's header inside an entry: offset, kind, length.
const RECORD_HEADER: usize = 13;

/// One record of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub offset: u64,
    pub kind: u8,
    pub bytes: &'a [u8],
}

/// Appends `staged` to `out` as an entry's payload.
pub fn encode(staged: &[Staged], out: &mut Vec<u8>) {
    for s in staged {
        out.extend_from_slice(&s.offset.to_le_bytes());
        out.push(s.kind);
        out.extend_from_slice(&(s.bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&s.bytes);
    }
}

/// The records of entry `index`'s payload, in order. Offsets must grow.
pub fn decode(index: u64, payload: &[u8]) -> Result<Vec<Record<'_>>, String> {
    let mut rest = payload;
    let mut records = Vec::new();
    while !rest.is_empty() {
        if rest.len() < RECORD_HEADER {
            return Err(format!("entry {index}: truncated record header"));
        }
        let offset = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(rest[9..13].try_into().expect("4 bytes")) as usize;
        let bytes = rest
            .get(RECORD_HEADER..RECORD_HEADER + len)
            .ok_or_else(|| format!("entry {index}: truncated record"))?;
        if records.last().is_some_and(|r: &Record| r.offset >= offset) {
            return Err(format!("entry {index}: offsets do not grow at {offset}"));
        }
        records.push(Record {
            offset,
            kind: rest[8],
            bytes,
        });
        rest = &rest[RECORD_HEADER + len..];
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let staged = vec![
            Staged {
                offset: 7,
                kind: 1,
                bytes: b"{}".to_vec(),
            },
            Staged {
                offset: 9,
                kind: 2,
                bytes: Vec::new(),
            },
        ];
        let mut buf = Vec::new();
        encode(&staged, &mut buf);
        let got = decode(1, &buf).unwrap();
        assert_eq!(
            got.iter()
                .map(|r| (r.offset, r.kind, r.bytes))
                .collect::<Vec<_>>(),
            [(7, 1, &b"{}"[..]), (9, 2, &b""[..])]
        );
        assert!(decode(1, &buf[..buf.len() - 1]).is_err());
        assert!(decode(1, &buf[..5]).is_err());
        let mut swapped = Vec::new();
        encode(&[staged[1].clone(), staged[0].clone()], &mut swapped);
        assert!(decode(1, &swapped).is_err());
    }
}
