//! Guard parser and evaluator: arbitrary text, evaluated against an
//! arbitrary context. Input: guard text, a 0 byte, context JSON (an empty
//! object when absent or invalid). Nothing may panic or overflow the stack
//! (deep parentheses, long operator chains); a guard that parses parses
//! again from its own source, and evaluates the same way twice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rstmdb_shards::guard::Guard;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let (text, ctx) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let ctx: Value = serde_json::from_slice(ctx).unwrap_or_else(|_| Value::Object(Default::default()));
    if let Ok(g) = Guard::parse(text) {
        let again = Guard::parse(g.source()).expect("a guard's own source parses");
        let v = g.eval(&ctx);
        assert_eq!(v, again.eval(&ctx));
        assert_eq!(v, g.eval(&ctx));
    }
});
