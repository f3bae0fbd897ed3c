//! Machine definitions: parsing, validation, normal form and checksum.
//!
//! A definition arrives as the JSON `definition` param of PUT_MACHINE. It is
//! checked once here (SEMANTICS §2.1–2.2) and turned into a [`MachineDef`]
//! that APPLY_EVENT can query in O(1), together with the normalized JSON that
//! GET_MACHINE returns (§2.3) and the CRC32C checksum that decides whether a
//! re-put of an existing version is identical (§2.4).
//!
//! The JSON-shape errors (`JSON error: …`) must match the reference byte for
//! byte, and they are serde's own messages; so the shape is read with serde
//! derive into private structs whose serde names (`MachineDefinitionRaw`,
//! `Transition`) appear in those messages. That also gives the positional
//! array forms (`[states, initial, transitions, meta?]`,
//! `[from, event, to, guard?]`) the reference accepts.
//!
//! The checksum must stay stable forever (stored checksums are compared with
//! recomputed ones on every re-put, also after upgrades), so the canonical
//! serialization is written here explicitly — key order, string escaping and
//! float layout (ryu digits) — instead of depending on a serializer's
//! defaults; property tests check it still agrees with serde_json.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;
use serde_json::{Map, Number, Value};

use crate::guard::{Guard, GuardError};

/// Why a definition was rejected. `Display` is the message the reference
/// sends after its `core error: ` prefix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DefinitionError {
    /// Wrong JSON shape: serde's message (missing field, invalid type, …).
    #[error("JSON error: {0}")]
    Json(String),
    #[error("invalid machine definition: initial state '{0}' not in states list")]
    InitialNotInStates(String),
    #[error("invalid machine definition: transition target '{0}' not in states list")]
    TargetNotInStates(String),
    #[error("invalid machine definition: transition source '{0}' not in states list")]
    SourceNotInStates(String),
    #[error("invalid machine definition: duplicate transition from '{from}' on event '{event}'")]
    DuplicateTransition { from: String, event: String },
    #[error("invalid guard expression: {0}")]
    Guard(#[from] GuardError),
}

/// One transition: from any state of `from` on `event` to `to`, if `guard`
/// (when present) holds.
#[derive(Debug, Clone)]
pub struct Transition {
    pub from: Vec<String>,
    pub event: String,
    pub to: String,
    pub guard: Option<Guard>,
}

/// A validated machine definition.
#[derive(Debug, Clone)]
pub struct MachineDef {
    states: Vec<String>,
    initial: String,
    transitions: Vec<Transition>,
    /// state → event → index into `transitions`; validation guarantees at
    /// most one transition per (state, event).
    index: HashMap<String, HashMap<String, usize>>,
    normalized: Value,
    checksum: String,
}

impl MachineDef {
    /// Parses and validates a definition (§2.1–2.2, including the positional
    /// array forms), then computes its normal form (§2.3) and checksum (§2.4).
    pub fn from_json(definition: &Value) -> Result<MachineDef, DefinitionError> {
        let raw = raw::MachineDefinitionRaw::deserialize(definition)
            .map_err(|e| DefinitionError::Json(e.to_string()))?;
        let states: HashSet<&str> = raw.states.iter().map(String::as_str).collect();
        if !states.contains(raw.initial.as_str()) {
            return Err(DefinitionError::InitialNotInStates(raw.initial));
        }
        let (transitions, index) = validate_transitions(&states, raw.transitions)?;
        let meta = raw.meta;
        let normalized = normalized_value(&raw.states, &raw.initial, &transitions, meta.as_ref());
        let canonical = canonical_json(&raw.states, &raw.initial, &transitions, meta.as_ref());
        let checksum = format!("{:08x}", crc32c::crc32c(canonical.as_bytes()));
        Ok(MachineDef {
            states: raw.states,
            initial: raw.initial,
            transitions,
            index,
            normalized,
            checksum,
        })
    }

    /// The state new instances start in.
    pub fn initial(&self) -> &str {
        &self.initial
    }

    /// The states as given (duplicates kept).
    pub fn states(&self) -> &[String] {
        &self.states
    }

    /// All transitions in definition order.
    pub fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    /// The transition taken on `event` in `state`, if any (O(1)).
    pub fn transition(&self, state: &str, event: &str) -> Option<&Transition> {
        let idx = *self.index.get(state)?.get(event)?;
        self.transitions.get(idx)
    }

    /// The normalized definition as GET_MACHINE returns it (a JSON object).
    pub fn normalized(&self) -> &Value {
        &self.normalized
    }

    /// 8 lowercase hex digits: CRC32C of the canonical serialization (§2.4).
    pub fn checksum(&self) -> &str {
        &self.checksum
    }
}

/// The input shape, read with serde derive. Serde names a struct by its Rust
/// identifier in shape errors (`expected struct MachineDefinitionRaw`,
/// `expected struct Transition`), so these carry the reference's names and
/// live in their own module to keep clear of the public [`Transition`].
mod raw {
    use std::fmt;

    use serde::de::{self, Deserializer, SeqAccess, Visitor};
    use serde::Deserialize;
    use serde_json::Value;

    #[derive(Deserialize)]
    pub(super) struct MachineDefinitionRaw {
        pub(super) states: Vec<String>,
        pub(super) initial: String,
        pub(super) transitions: Vec<Transition>,
        /// `null` and absent are the same; `default` also makes the
        /// 3-element positional form valid.
        #[serde(default)]
        pub(super) meta: Option<Value>,
    }

    #[derive(Deserialize)]
    pub(super) struct Transition {
        #[serde(deserialize_with = "string_or_list")]
        pub(super) from: Vec<String>,
        pub(super) event: String,
        pub(super) to: String,
        #[serde(default)]
        pub(super) guard: Option<String>,
    }

    /// `from` may be one string (a one-element list) or an array of strings.
    fn string_or_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
        deserializer.deserialize_any(StringOrList)
    }

    struct StringOrList;

    impl<'de> Visitor<'de> for StringOrList {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or array of strings")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_owned()])
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(vec![v])
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s);
            }
            Ok(out)
        }
    }
}

type TransitionIndex = HashMap<String, HashMap<String, usize>>;

/// §2.2 step 2, per transition in order: target, guard, then each source
/// element (membership, then duplicate) in turn — the first failure wins.
fn validate_transitions(
    states: &HashSet<&str>,
    raw: Vec<raw::Transition>,
) -> Result<(Vec<Transition>, TransitionIndex), DefinitionError> {
    let mut index: TransitionIndex = HashMap::new();
    let mut transitions = Vec::with_capacity(raw.len());
    for (idx, t) in raw.into_iter().enumerate() {
        if !states.contains(t.to.as_str()) {
            return Err(DefinitionError::TargetNotInStates(t.to));
        }
        let guard = t.guard.as_deref().map(Guard::parse).transpose()?;
        for from in &t.from {
            if !states.contains(from.as_str()) {
                return Err(DefinitionError::SourceNotInStates(from.clone()));
            }
            let events = index.entry(from.clone()).or_default();
            if events.contains_key(&t.event) {
                return Err(DefinitionError::DuplicateTransition {
                    from: from.clone(),
                    event: t.event,
                });
            }
            events.insert(t.event.clone(), idx);
        }
        transitions.push(Transition {
            from: t.from,
            event: t.event,
            to: t.to,
            guard,
        });
    }
    Ok((transitions, index))
}

fn string_array(items: &[String]) -> Value {
    Value::Array(items.iter().cloned().map(Value::String).collect())
}

/// §2.3: `from` always an array, `guard` / `meta` only when present, unknown
/// keys gone.
fn normalized_value(
    states: &[String],
    initial: &str,
    transitions: &[Transition],
    meta: Option<&Value>,
) -> Value {
    let transitions = transitions
        .iter()
        .map(|t| {
            let mut obj = Map::new();
            obj.insert("from".into(), string_array(&t.from));
            obj.insert("event".into(), Value::String(t.event.clone()));
            obj.insert("to".into(), Value::String(t.to.clone()));
            if let Some(g) = &t.guard {
                obj.insert("guard".into(), Value::String(g.source().to_owned()));
            }
            Value::Object(obj)
        })
        .collect();
    let mut obj = Map::new();
    obj.insert("states".into(), string_array(states));
    obj.insert("initial".into(), Value::String(initial.to_owned()));
    obj.insert("transitions".into(), Value::Array(transitions));
    if let Some(meta) = meta {
        obj.insert("meta".into(), meta.clone());
    }
    Value::Object(obj)
}

/// §2.4: compact JSON with the fixed key order
/// `states, initial, transitions[from, event, to, guard?], meta?`.
fn canonical_json(
    states: &[String],
    initial: &str,
    transitions: &[Transition],
    meta: Option<&Value>,
) -> String {
    let mut out = String::with_capacity(128);
    out.push_str("{\"states\":");
    write_str_array(&mut out, states);
    out.push_str(",\"initial\":");
    write_json_str(&mut out, initial);
    out.push_str(",\"transitions\":[");
    for (i, t) in transitions.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"from\":");
        write_str_array(&mut out, &t.from);
        out.push_str(",\"event\":");
        write_json_str(&mut out, &t.event);
        out.push_str(",\"to\":");
        write_json_str(&mut out, &t.to);
        if let Some(g) = &t.guard {
            out.push_str(",\"guard\":");
            write_json_str(&mut out, g.source());
        }
        out.push('}');
    }
    out.push(']');
    if let Some(meta) = meta {
        out.push_str(",\"meta\":");
        write_canonical_value(&mut out, meta);
    }
    out.push('}');
    out
}

fn write_str_array(out: &mut String, items: &[String]) {
    out.push('[');
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_json_str(out, s);
    }
    out.push(']');
}

/// Any JSON value, objects with keys sorted by bytes at every level (sorted
/// explicitly so the result does not depend on serde_json's map type).
fn write_canonical_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_json_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_str(out, key);
                out.push(':');
                write_canonical_value(out, item);
            }
            out.push('}');
        }
    }
}

/// serde_json string escaping: `"`, `\` and control characters only;
/// everything else (non-ASCII, `/`, DEL) raw.
fn write_json_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                let b = u32::from(c) as usize;
                out.push_str("\\u00");
                out.push(char::from(HEX[b >> 4]));
                out.push(char::from(HEX[b & 0xF]));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Integers verbatim; floats in the reference's format (see [`write_f64`]).
fn write_number(out: &mut String, n: &Number) {
    if let Some(u) = n.as_u64() {
        out.push_str(&u.to_string());
    } else if let Some(i) = n.as_i64() {
        out.push_str(&i.to_string());
    } else if let Some(f) = n.as_f64() {
        write_f64(out, f);
    } else {
        // Only reachable with serde_json's arbitrary_precision: its text.
        out.push_str(&n.to_string());
    }
}

/// The reference's float format: shortest round-trip digits (ties to even);
/// plain notation when the decimal exponent is in -5..=15 (`0.00001`,
/// `1000000000000000.0`, `.0` kept on integral values, `-0.0` kept),
/// otherwise `d[.ddd]e±N` (`1e-6`, `1e+16`, `5e-324`).
///
/// `ryu` produces exactly that layout except for the `+` of positive
/// exponents. Its digit choice on exact ties differs from std's `{:e}`
/// (`2065881979800817.2`, not `.3`), which is why std is not used here.
fn write_f64(out: &mut String, f: f64) {
    if !f.is_finite() {
        // JSON cannot carry these; serde_json writes null for them too.
        out.push_str("null");
        return;
    }
    let mut buffer = ryu::Buffer::new();
    let text = buffer.format_finite(f);
    match text.split_once('e') {
        Some((mantissa, exp)) if !exp.starts_with('-') => {
            out.push_str(mantissa);
            out.push_str("e+");
            out.push_str(exp);
        }
        _ => out.push_str(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    const DEFINITION_VECTORS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/vectors/definitions.jsonl"
    );

    /// JSON equality that also tells `1` from `1.0` and `0.0` from `-0.0`,
    /// as the vectors' comparison rules require.
    fn strict_eq(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => {
                (x.as_u64(), x.as_i64()) == (y.as_u64(), y.as_i64())
                    && x.is_f64() == y.is_f64()
                    && x.as_f64().map(f64::to_bits) == y.as_f64().map(f64::to_bits)
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| strict_eq(x, y))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(k, v)| y.get(k).is_some_and(|w| strict_eq(v, w)))
            }
            _ => a == b,
        }
    }

    /// The definition a vector entry sends: `definition_raw` verbatim when
    /// present (parsed by us, with correct rounding), else `definition`.
    fn input_of(entry: &Value) -> Value {
        match entry.get("definition_raw").and_then(Value::as_str) {
            Some(raw) => serde_json::from_str(raw).expect("definition_raw is JSON"),
            None => entry["definition"].clone(),
        }
    }

    fn version_of(entry: &Value, default: u64) -> u64 {
        entry
            .get("version")
            .and_then(Value::as_u64)
            .unwrap_or(default)
    }

    /// Replays one definitions.jsonl case at the logic level; `Err` describes
    /// the mismatch.
    fn check_definition_case(case: &Value) -> Result<(), String> {
        let version = version_of(case, 1);
        let mut stored: BTreeMap<u64, String> = BTreeMap::new();
        for setup in case
            .get("setup")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let def = MachineDef::from_json(&input_of(setup))
                .map_err(|e| format!("setup definition rejected: {e}"))?;
            stored.insert(version_of(setup, version), def.checksum().to_owned());
        }
        let result = MachineDef::from_json(&input_of(case));
        let expected = &case["expected"];
        let put = &expected["put"];
        match (put.get("stored_checksum"), put.get("code"), result) {
            (Some(want), _, Ok(def)) => {
                if want.as_str() != Some(def.checksum()) {
                    return Err(format!("checksum {} != {want}", def.checksum()));
                }
                let created = !stored.contains_key(&version);
                if let Some(prior) = stored.get(&version) {
                    if prior != def.checksum() {
                        return Err("re-put with a different checksum would be refused".into());
                    }
                }
                if put.get("created") != Some(&Value::Bool(created)) {
                    return Err(format!("created would be {created}"));
                }
                if !strict_eq(def.normalized(), &expected["get_definition"]) {
                    return Err(format!("normalized {}", def.normalized()));
                }
                Ok(())
            }
            (None, Some(code), Ok(def)) if code == "MACHINE_VERSION_EXISTS" => {
                match stored.get(&version) {
                    Some(prior) if prior != def.checksum() => Ok(()),
                    _ => Err("expected MACHINE_VERSION_EXISTS".into()),
                }
            }
            (None, Some(_), Err(err)) => check_error_message(put, &err),
            (_, _, Ok(def)) => Err(format!("accepted with checksum {}", def.checksum())),
            (_, _, Err(err)) => Err(format!("rejected: {err}")),
        }
    }

    fn check_error_message(put: &Value, err: &DefinitionError) -> Result<(), String> {
        let sent = format!("core error: {err}");
        if let Some(message) = put.get("message").and_then(Value::as_str) {
            if sent == message {
                return Ok(());
            }
            return Err(format!("message {sent:?} != {message:?}"));
        }
        if let Some(prefix) = put.get("message_prefix").and_then(Value::as_str) {
            if sent.starts_with(prefix) || err.to_string().starts_with(prefix) {
                return Ok(());
            }
            return Err(format!("message {sent:?} lacks prefix {prefix:?}"));
        }
        Err(format!("no message in expectation {put}"))
    }

    #[test]
    fn definition_vectors() {
        let text = std::fs::read_to_string(DEFINITION_VECTORS).expect("read definitions.jsonl");
        let mut failures = Vec::new();
        let mut count = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let case: Value = serde_json::from_str(line).expect("vector line is JSON");
            count += 1;
            if let Err(why) = check_definition_case(&case) {
                failures.push(format!("{}: {why}", case["id"].as_str().unwrap_or("?")));
            }
        }
        assert!(count >= 73, "only {count} definition cases read");
        assert!(
            failures.is_empty(),
            "failing definition cases:\n{}",
            failures.join("\n")
        );
    }

    #[test]
    fn checksum_examples_from_semantics() {
        let minimal = json!({"states": ["a"], "initial": "a", "transitions": []});
        assert_eq!(
            MachineDef::from_json(&minimal).unwrap().checksum(),
            "6b16bc3e"
        );
        let order = json!({
            "states": ["created", "paid", "shipped"],
            "initial": "created",
            "transitions": [
                {"from": "created", "event": "PAY", "to": "paid"},
                {"from": ["paid"], "event": "SHIP", "to": "shipped", "guard": "ctx.ok"}
            ],
            "meta": {"z": 1, "a": 2}
        });
        let def = MachineDef::from_json(&order).unwrap();
        assert_eq!(def.checksum(), "75d8c861");
        assert_eq!(def.initial(), "created");
        assert_eq!(def.states(), ["created", "paid", "shipped"]);
        let ship = def.transition("paid", "SHIP").unwrap();
        assert_eq!(ship.to, "shipped");
        assert!(ship.guard.as_ref().unwrap().eval(&json!({"ok": true})));
        assert!(def.transition("created", "SHIP").is_none());
        assert!(def.transition("nowhere", "PAY").is_none());
    }

    #[test]
    fn canonical_form_matches_the_spec_text() {
        let def = json!({
            "transitions": [{"guard": "ctx.ok", "to": "b", "event": "E", "from": "a"}],
            "meta": {"z": [1.0, -0.0, 1e16, 1e-6, 0.00001], "a": "\u{1}é/"},
            "initial": "a", "states": ["a", "b"], "extra": 1
        });
        let raw = raw::MachineDefinitionRaw::deserialize(&def).unwrap();
        let states: HashSet<&str> = raw.states.iter().map(String::as_str).collect();
        let (transitions, _) = validate_transitions(&states, raw.transitions).unwrap();
        let text = canonical_json(&raw.states, &raw.initial, &transitions, raw.meta.as_ref());
        assert_eq!(
            text,
            "{\"states\":[\"a\",\"b\"],\"initial\":\"a\",\"transitions\":[{\"from\":[\"a\"],\
             \"event\":\"E\",\"to\":\"b\",\"guard\":\"ctx.ok\"}],\"meta\":{\"a\":\"\\u0001é/\",\
             \"z\":[1.0,-0.0,1e+16,1e-6,0.00001]}}"
        );
    }

    #[test]
    fn float_format_edge_cases() {
        let fmt = |f: f64| {
            let mut out = String::new();
            write_f64(&mut out, f);
            out
        };
        // An exact tie between two 17-digit candidates: ties go to even.
        // 8263527919203269 / 4 = 2065881979800817.25 exactly.
        assert_eq!(fmt(8263527919203269.0 / 4.0), "2065881979800817.2");
        assert_eq!(fmt(1e15), "1000000000000000.0");
        assert_eq!(fmt(1e16), "1e+16");
        assert_eq!(fmt(1.5e300), "1.5e+300");
        assert_eq!(fmt(0.00001), "0.00001");
        assert_eq!(fmt(1e-6), "1e-6");
        assert_eq!(fmt(5e-324), "5e-324");
        assert_eq!(fmt(-0.0), "-0.0");
        assert_eq!(fmt(1.2345678901234568e16), "1.2345678901234568e+16");
    }

    #[test]
    fn duplicate_from_elements_inside_one_transition_are_duplicates() {
        let def = json!({"states": ["a"], "initial": "a",
                         "transitions": [{"from": ["a", "a"], "event": "E", "to": "a"}]});
        assert_eq!(
            MachineDef::from_json(&def).unwrap_err().to_string(),
            "invalid machine definition: duplicate transition from 'a' on event 'E'"
        );
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;
        use serde_json::{json, Value};

        /// Arbitrary JSON for `meta`: every scalar kind, floats over the
        /// whole f64 range, nested arrays and objects.
        fn arb_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Value::from),
                (-1e6f64..1e6).prop_map(Value::from),
                "\\PC{0,8}".prop_map(Value::String),
                "[\u{0}-\u{1f}\"\\\\/a]{0,4}".prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 32, 5, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                    prop::collection::btree_map("[a-zé\"]{0,3}", inner, 0..5)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// A valid definition: unique events per transition keep it free of
        /// duplicates; sources and targets are drawn from the states.
        fn arb_definition() -> impl Strategy<Value = Value> {
            let states = prop::collection::vec("[a-cé\n]{0,2}", 1..5);
            (
                states,
                any::<prop::sample::Index>(),
                prop::collection::vec(
                    (
                        prop::collection::vec(any::<prop::sample::Index>(), 0..3),
                        any::<prop::sample::Index>(),
                        any::<bool>(),
                        any::<bool>(),
                    ),
                    0..5,
                ),
                prop::option::of(arb_json()),
            )
                .prop_map(|(states, initial, transitions, meta)| {
                    let pick = |i: &prop::sample::Index| states[i.index(states.len())].clone();
                    let transitions: Vec<Value> = transitions
                        .iter()
                        .enumerate()
                        .map(|(n, (from, to, single, guarded))| {
                            let mut seen = std::collections::HashSet::new();
                            let mut from: Vec<String> = from.iter().map(pick).collect();
                            from.retain(|s| seen.insert(s.clone()));
                            let from = match (single, from.as_slice()) {
                                (true, [one]) => json!(one),
                                _ => json!(from),
                            };
                            let mut t =
                                json!({"from": from, "event": format!("E{n}"), "to": pick(to)});
                            if *guarded {
                                t["guard"] = json!("ctx.a == \"x\" || !ctx.b");
                            }
                            t
                        })
                        .collect();
                    let mut def = json!({"states": states, "initial": pick(&initial),
                                         "transitions": transitions, "ignored": 1});
                    if let Some(meta) = meta {
                        def["meta"] = meta;
                    }
                    def
                })
        }

        /// Tiny deterministic PRNG so one proptest seed drives key order,
        /// whitespace and number spelling.
        struct Rng(u64);

        impl Rng {
            fn next(&mut self) -> u64 {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0
            }

            fn ws(&mut self) -> &'static str {
                ["", " ", "\n", "\t", "\r\n  "][(self.next() % 5) as usize]
            }
        }

        /// Writes `value` as JSON text with shuffled object keys, random
        /// whitespace and floats sometimes in exponent spelling.
        fn write_shuffled(value: &Value, rng: &mut Rng, out: &mut String) {
            out.push_str(rng.ws());
            match value {
                Value::Array(items) => {
                    out.push('[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        write_shuffled(item, rng, out);
                    }
                    out.push_str(rng.ws());
                    out.push(']');
                }
                Value::Object(map) => {
                    let mut entries: Vec<_> = map.iter().collect();
                    for i in (1..entries.len()).rev() {
                        entries.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                    }
                    out.push('{');
                    for (i, (k, v)) in entries.into_iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(rng.ws());
                        out.push_str(&serde_json::to_string(k).unwrap());
                        out.push_str(rng.ws());
                        out.push(':');
                        write_shuffled(v, rng, out);
                    }
                    out.push_str(rng.ws());
                    out.push('}');
                }
                Value::Number(n) if n.is_f64() && rng.next().is_multiple_of(2) => {
                    out.push_str(&format!("{:e}", n.as_f64().unwrap()));
                }
                other => out.push_str(&other.to_string()),
            }
            out.push_str(rng.ws());
        }

        proptest! {
            #[test]
            fn checksum_ignores_key_order_and_whitespace(def in arb_definition(), seed in 1u64..) {
                let direct = MachineDef::from_json(&def).expect("generated definitions are valid");
                let mut text = String::new();
                write_shuffled(&def, &mut Rng(seed), &mut text);
                let reparsed: Value = serde_json::from_str(&text).expect("shuffled text is JSON");
                let again = MachineDef::from_json(&reparsed).expect("still valid");
                prop_assert_eq!(direct.checksum(), again.checksum());
                // The normal form is a fixed point with the same checksum.
                let normal = MachineDef::from_json(direct.normalized()).expect("normal form valid");
                prop_assert_eq!(direct.checksum(), normal.checksum());
            }

            #[test]
            fn float_format_matches_serde_json(f in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
                let mut ours = String::new();
                write_f64(&mut ours, f);
                prop_assert_eq!(&ours, &serde_json::to_string(&f).unwrap());
                prop_assert_eq!(ours.parse::<f64>().unwrap().to_bits(), f.to_bits());
            }

            #[test]
            fn string_escaping_matches_serde_json(s in any::<String>()) {
                let mut ours = String::new();
                write_json_str(&mut ours, &s);
                prop_assert_eq!(ours, serde_json::to_string(&s).unwrap());
            }
        }
    }
}
