//! Instance contexts, kept as compact JSON text.
//!
//! Why text and not a `serde_json::Value`: a one-key object held as a
//! `Value` is a B-tree node of about 600 bytes, so a million small
//! instances cost most of their memory in tree nodes; as text the same
//! context costs its own bytes. Every answer that carries a context
//! (GET_INSTANCE, APPLY_EVENT, WATCH events, snapshots, WAL records) copies
//! the text verbatim instead of walking a tree, and clones are reference
//! counts. An apply parses the text once (guard and merge), then stores the
//! merged result as new text.
//!
//! The text is always the canonical form serde_json writes for a `Value`:
//! compact, object keys in sorted order (serde_json's `Map` is a B-tree),
//! the same bytes the server produced when it kept `Value`s, so answers
//! and snapshots are unchanged.

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

/// A context: the canonical JSON text of one value (an object for every
/// instance this server created, D1). Cheap to clone.
#[derive(Clone)]
pub struct Ctx(Arc<RawValue>);

impl Ctx {
    /// The canonical text of `v`.
    pub fn from_value(v: &Value) -> Ctx {
        let raw = serde_json::value::to_raw_value(v).expect("a Value always serializes");
        Ctx(Arc::from(raw))
    }

    /// `{}`.
    pub fn empty_object() -> Ctx {
        Ctx::from_value(&Value::Object(serde_json::Map::new()))
    }

    /// The value, parsed.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.0.get()).expect("a context's text is valid JSON")
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The shallow merge of `payload` into this context (SEMANTICS.md §5):
    /// payload keys replace context keys, only when both are objects;
    /// otherwise the context is unchanged (and shared, not copied).
    pub fn merged(&self, payload: &Value) -> Ctx {
        if Ctx::merge_changes(payload) {
            self.merged_from(self.to_value(), payload)
        } else {
            self.clone()
        }
    }

    /// Whether merging `payload` can change a context (a non-empty object).
    pub fn merge_changes(payload: &Value) -> bool {
        matches!(payload, Value::Object(p) if !p.is_empty())
    }

    /// [`Ctx::merged`] given this context already parsed (`current`), so
    /// an apply that evaluated a guard on it does not parse it again.
    pub fn merged_from(&self, current: Value, payload: &Value) -> Ctx {
        match (current, payload) {
            (Value::Object(mut c), Value::Object(p)) if !p.is_empty() => {
                for (k, v) in p {
                    c.insert(k.clone(), v.clone());
                }
                Ctx::from_value(&Value::Object(c))
            }
            _ => self.clone(),
        }
    }
}

impl PartialEq for Ctx {
    fn eq(&self, other: &Ctx) -> bool {
        self.as_str() == other.as_str()
    }
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Ctx {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Ctx {
    /// Reads a value and keeps its canonical text. Through a `Value`, not
    /// as raw text: WAL entries are internally tagged enums, which serde
    /// buffers before their fields are read, and raw text cannot pass
    /// through that buffer; it also makes any writer's text canonical.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ctx, D::Error> {
        Ok(Ctx::from_value(&Value::deserialize(d)?))
    }
}

impl From<&Value> for Ctx {
    fn from(v: &Value) -> Ctx {
        Ctx::from_value(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            "[a-c]{0,3}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-e]{1,2}", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// The merge against a model of SEMANTICS.md §5: when both are
        /// objects every payload key replaces the context's, the others
        /// stay; otherwise the context is unchanged. The result's text is
        /// canonical, and merging from an already parsed context agrees.
        #[test]
        fn merge_matches_the_shallow_merge_model(ctx in json(), payload in json()) {
            let c = Ctx::from_value(&ctx);
            let got = c.merged(&payload);
            let want = match (&ctx, &payload) {
                (Value::Object(c), Value::Object(p)) => {
                    let mut m = c.clone();
                    for (k, v) in p {
                        m.insert(k.clone(), v.clone());
                    }
                    Value::Object(m)
                }
                _ => ctx.clone(),
            };
            proptest::prop_assert_eq!(got.to_value(), want);
            let reencoded = Ctx::from_value(&got.to_value());
            proptest::prop_assert_eq!(reencoded.as_str(), got.as_str());
            let from_parsed = c.merged_from(c.to_value(), &payload);
            proptest::prop_assert_eq!(from_parsed.as_str(), got.as_str());
        }
    }

    #[test]
    fn text_is_canonical_and_round_trips() {
        let c = Ctx::from_value(
            &serde_json::from_str(r#"{ "b": 1, "a": [1, 2.5, "x"], "c": {"z":null,"y":true} }"#)
                .unwrap(),
        );
        assert_eq!(
            c.as_str(),
            r#"{"a":[1,2.5,"x"],"b":1,"c":{"y":true,"z":null}}"#
        );
        assert_eq!(serde_json::to_string(&c).unwrap(), c.as_str());
        assert_eq!(
            c.to_value(),
            json!({"a": [1, 2.5, "x"], "b": 1, "c": {"y": true, "z": null}})
        );
        // Inside a larger document the text is emitted verbatim.
        let doc = serde_json::to_string(&json!({"k": 1})).unwrap();
        assert_eq!(doc, r#"{"k":1}"#);
        #[derive(Serialize)]
        struct R<'a> {
            ctx: &'a Ctx,
            n: u32,
        }
        assert_eq!(
            serde_json::to_string(&R { ctx: &c, n: 3 }).unwrap(),
            r#"{"ctx":{"a":[1,2.5,"x"],"b":1,"c":{"y":true,"z":null}},"n":3}"#
        );
    }

    #[test]
    fn reads_through_an_internally_tagged_enum() {
        #[derive(Deserialize)]
        #[serde(tag = "kind")]
        enum E {
            A { ctx: Ctx },
        }
        let E::A { ctx } = serde_json::from_str(r#"{"kind":"A","ctx":{"b":1, "a":2}}"#).unwrap();
        assert_eq!(ctx.as_str(), r#"{"a":2,"b":1}"#);
    }

    #[test]
    fn merge_is_shallow_and_only_between_objects() {
        let c = Ctx::from_value(&json!({"a": 1, "n": {"x": 1}}));
        assert_eq!(
            c.merged(&json!({"n": {"y": 2}, "b": 2})).to_value(),
            json!({"a": 1, "b": 2, "n": {"y": 2}})
        );
        assert_eq!(c.merged(&json!(null)), c);
        assert_eq!(c.merged(&json!({})), c);
        assert_eq!(c.merged(&json!([1])), c);
        let s = Ctx::from_value(&json!("text"));
        assert_eq!(s.merged(&json!({"a": 1})), s);
    }

    #[test]
    fn floats_keep_their_text_through_a_round_trip() {
        for v in [
            json!(0.1),
            json!(1e300),
            json!(-2.5e-7),
            json!(12345678901234567u64),
        ] {
            let c = Ctx::from_value(&json!({ "v": v }));
            let again: Ctx = serde_json::from_str(c.as_str()).unwrap();
            assert_eq!(again, c);
        }
    }
}
