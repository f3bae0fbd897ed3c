//! Guard expressions: the small boolean language attached to transitions.
//!
//! A guard is parsed exactly once, when its machine definition is stored
//! (PUT_MACHINE), into an [`Expr`] tree; APPLY_EVENT then only walks that tree
//! against the instance context. Parsing up front means a bad guard is reported
//! to the client that wrote it instead of failing every later event.
//!
//! The grammar is the strict one of the spec (vectors/README.md, decision D23):
//! the whole text must be one expression, so a typo such as `ctx.a = 1` is an
//! error rather than silently meaning `ctx.a`.
//!
//! ```text
//! guard      = WS* or_expr WS*
//! or_expr    = and_expr ( WS* "||" WS* and_expr )*
//! and_expr   = unary ( WS* "&&" WS* unary )*
//! unary      = "!" WS* unary | primary
//! primary    = "(" WS* or_expr WS* ")" | comparison
//! comparison = path [ WS* ("==" | "!=") WS* value | WS* (">=" | "<=" | ">" | "<") WS* number ]
//! path       = "ctx." [A-Za-z0-9_.]+
//! value      = "true" | "false" | "null" | string | number   ; keywords as whole words
//! string     = '"' ( "\" any-char | any char but '"' and "\" )* '"'
//! number     = -?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?
//! ```
//!
//! Because guard text comes from remote clients, the parser must never panic
//! and never recurse without bound (decision D3): the text is limited to
//! [`MAX_GUARD_BYTES`] and nesting (each `(` and each `!`) to
//! [`MAX_GUARD_DEPTH`], checked *before* descending.

use serde_json::Value;

/// Longest accepted guard text, in bytes of UTF-8 (D3).
pub const MAX_GUARD_BYTES: usize = 8192;

/// Deepest accepted nesting; each `(` and each `!` opens one level (D3).
pub const MAX_GUARD_DEPTH: usize = 64;

/// Why a guard text was rejected.
///
/// `Display` is the reason only; the caller adds `invalid guard expression: `.
/// Positions are byte offsets into the original guard text, so a user can find
/// the offending spot (D23).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuardError {
    /// The text is empty or only whitespace.
    #[error("empty guard expression")]
    Empty,
    /// The text exceeds [`MAX_GUARD_BYTES`].
    #[error("guard expression is {len} bytes long; the limit is {limit} bytes")]
    TooLong { len: usize, limit: usize },
    /// Parentheses and `!` nest deeper than [`MAX_GUARD_DEPTH`].
    #[error("nesting deeper than {limit} levels at byte {pos}")]
    TooDeep { pos: usize, limit: usize },
    /// An operand does not start with `ctx.`.
    #[error("field must start with 'ctx.' at byte {pos}")]
    ExpectedField { pos: usize },
    /// `ctx.` is not followed by any of `[A-Za-z0-9_.]`.
    #[error("empty field name at byte {pos}")]
    EmptyField { pos: usize },
    /// A parenthesised expression is not closed where it should be.
    #[error("expected ')' at byte {pos}")]
    ExpectedCloseParen { pos: usize },
    /// A string literal has no closing quote (a trailing lone `\` included).
    #[error("unterminated string starting at byte {pos}")]
    UnterminatedString { pos: usize },
    /// A number literal is malformed or not finite as an f64.
    #[error("invalid number: '{text}' at byte {pos}")]
    InvalidNumber { text: String, pos: usize },
    /// `==` / `!=` is not followed by a literal.
    #[error("expected a value (true, false, null, a string or a number) at byte {pos}")]
    ExpectedValue { pos: usize },
    /// An ordering operator is not followed by a number literal.
    #[error("expected a number at byte {pos}")]
    ExpectedNumber { pos: usize },
    /// A complete expression is followed by text that is not part of it.
    #[error("unexpected text at byte {pos}")]
    UnexpectedText { pos: usize },
}

/// A parsed guard expression, ready to be evaluated many times.
#[derive(Debug, Clone)]
pub struct Guard {
    source: String,
    expr: Expr,
}

impl Guard {
    /// Parses `text` with the strict grammar and the D3 limits.
    pub fn parse(text: &str) -> Result<Guard, GuardError> {
        if text.len() > MAX_GUARD_BYTES {
            return Err(GuardError::TooLong {
                len: text.len(),
                limit: MAX_GUARD_BYTES,
            });
        }
        if text.chars().all(is_guard_whitespace) {
            return Err(GuardError::Empty);
        }
        let expr = Parser::new(text).parse_guard()?;
        Ok(Guard {
            source: text.to_owned(),
            expr,
        })
    }

    /// Evaluates the guard against an instance context (SEMANTICS §6.2–6.3).
    pub fn eval(&self, ctx: &Value) -> bool {
        self.expr.eval(ctx)
    }

    /// The guard text exactly as the definition gave it.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// The Unicode `White_Space` set, spelled out rather than taken from
/// `char::is_whitespace` so that the accepted set cannot drift with the
/// Unicode version of the toolchain (the spec pins it; U+200B and
/// U+001C–U+001F are deliberately not whitespace).
fn is_guard_whitespace(c: char) -> bool {
    matches!(
        c,
        '\u{0009}'..='\u{000D}'
            | '\u{0020}'
            | '\u{0085}'
            | '\u{00A0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
    )
}

/// Characters allowed in a path after `ctx.` (ASCII only, D3).
fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

/// Characters that would continue a word, used to reject keyword prefixes
/// such as `truex` (D23).
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Expression tree. `&&` / `||` chains are n-ary so that a long flat chain
/// does not become a deep tree: evaluation and drop stay shallow, bounded by
/// the nesting limit.
#[derive(Debug, Clone)]
enum Expr {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    /// A bare path: true when the value is truthy.
    Truthy(Path),
    Compare(Path, Comparison),
}

impl Expr {
    fn eval(&self, ctx: &Value) -> bool {
        match self {
            Expr::Or(terms) => terms.iter().any(|e| e.eval(ctx)),
            Expr::And(terms) => terms.iter().all(|e| e.eval(ctx)),
            Expr::Not(inner) => !inner.eval(ctx),
            Expr::Truthy(path) => is_truthy(path.resolve(ctx)),
            Expr::Compare(path, cmp) => cmp.holds(path.resolve(ctx)),
        }
    }
}

/// `ctx.a.b` stored as its segments `["a", "b"]`.
#[derive(Debug, Clone)]
struct Path(Vec<String>);

/// Returned by reference for every path that resolves to nothing.
static NULL: Value = Value::Null;

impl Path {
    /// Walks objects by key; a missing key or any non-object on the way
    /// (arrays included: there is no indexing) yields `null` (§6.2).
    fn resolve<'v>(&self, ctx: &'v Value) -> &'v Value {
        let mut current = ctx;
        for segment in &self.0 {
            match current.as_object().and_then(|map| map.get(segment)) {
                Some(next) => current = next,
                None => return &NULL,
            }
        }
        current
    }
}

/// Literal on the right of `==` / `!=`.
#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Null,
    Bool(bool),
    /// The raw text between the quotes: no escape decoding (§6.1).
    Str(String),
    Num(f64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum OrderOp {
    Gt,
    Ge,
    Lt,
    Le,
}

#[derive(Debug, Clone, PartialEq)]
enum Comparison {
    Eq(Literal),
    Ne(Literal),
    Order(OrderOp, f64),
}

impl Comparison {
    fn holds(&self, value: &Value) -> bool {
        match self {
            Comparison::Eq(lit) => literal_equals(value, lit),
            Comparison::Ne(lit) => !literal_equals(value, lit),
            // Only JSON numbers compare (`as_f64` is `None` for anything
            // else); a non-number is simply false (§6.3).
            Comparison::Order(op, rhs) => match value.as_f64() {
                Some(lhs) => match op {
                    OrderOp::Gt => lhs > *rhs,
                    OrderOp::Ge => lhs >= *rhs,
                    OrderOp::Lt => lhs < *rhs,
                    OrderOp::Le => lhs <= *rhs,
                },
                None => false,
            },
        }
    }
}

/// §6.3 truthiness: null false, bool itself, number ≠ 0, string / array /
/// object non-empty.
fn is_truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                u != 0
            } else if let Some(i) = n.as_i64() {
                i != 0
            } else {
                n.as_f64().is_some_and(|f| f != 0.0)
            }
        }
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// §6.3 equality: same JSON type required (no coercion); numbers are equal
/// when their f64 values differ by less than `f64::EPSILON`.
fn literal_equals(value: &Value, lit: &Literal) -> bool {
    match (value, lit) {
        (Value::Null, Literal::Null) => true,
        (Value::Bool(a), Literal::Bool(b)) => a == b,
        (Value::String(a), Literal::Str(b)) => a == b,
        (Value::Number(n), Literal::Num(b)) => {
            n.as_f64().is_some_and(|a| (a - b).abs() < f64::EPSILON)
        }
        _ => false,
    }
}

/// Recursive-descent parser over the guard text. `pos` is always a byte
/// offset on a char boundary, so slicing `src[pos..]` cannot panic.
struct Parser<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
        Parser {
            src,
            pos: 0,
            depth: 0,
        }
    }

    fn rest(&self) -> &'a str {
        self.src.get(self.pos..).unwrap_or("")
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn skip_ws(&mut self) {
        while let Some(c) = self.peek().filter(|c| is_guard_whitespace(*c)) {
            self.pos += c.len_utf8();
        }
    }

    /// Consumes `token` (ASCII) if the remaining text starts with it.
    fn eat(&mut self, token: &str) -> bool {
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    /// Consumes characters while `pred` holds and returns them.
    fn take_while(&mut self, pred: impl Fn(char) -> bool) -> &'a str {
        let start = self.pos;
        while let Some(c) = self.peek().filter(|c| pred(*c)) {
            self.pos += c.len_utf8();
        }
        self.src.get(start..self.pos).unwrap_or("")
    }

    /// Opens one nesting level, refusing before the recursion happens.
    fn enter(&mut self) -> Result<(), GuardError> {
        if self.depth >= MAX_GUARD_DEPTH {
            return Err(GuardError::TooDeep {
                pos: self.pos,
                limit: MAX_GUARD_DEPTH,
            });
        }
        self.depth += 1;
        Ok(())
    }

    fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    /// `guard = WS* or_expr WS*` with nothing after it (D23).
    fn parse_guard(mut self) -> Result<Expr, GuardError> {
        self.skip_ws();
        let expr = self.parse_or()?;
        self.skip_ws();
        if self.pos < self.src.len() {
            return Err(GuardError::UnexpectedText { pos: self.pos });
        }
        Ok(expr)
    }

    fn parse_or(&mut self) -> Result<Expr, GuardError> {
        let mut terms = vec![self.parse_and()?];
        loop {
            self.skip_ws();
            if !self.eat("||") {
                break;
            }
            self.skip_ws();
            terms.push(self.parse_and()?);
        }
        Ok(collapse(terms, Expr::Or))
    }

    fn parse_and(&mut self) -> Result<Expr, GuardError> {
        let mut terms = vec![self.parse_unary()?];
        loop {
            self.skip_ws();
            if !self.eat("&&") {
                break;
            }
            self.skip_ws();
            terms.push(self.parse_unary()?);
        }
        Ok(collapse(terms, Expr::And))
    }

    fn parse_unary(&mut self) -> Result<Expr, GuardError> {
        if self.peek() != Some('!') {
            return self.parse_primary();
        }
        self.enter()?;
        self.pos += 1;
        self.skip_ws();
        let inner = self.parse_unary()?;
        self.leave();
        Ok(Expr::Not(Box::new(inner)))
    }

    fn parse_primary(&mut self) -> Result<Expr, GuardError> {
        if self.peek() != Some('(') {
            return self.parse_comparison();
        }
        self.enter()?;
        self.pos += 1;
        self.skip_ws();
        let inner = self.parse_or()?;
        self.skip_ws();
        if !self.eat(")") {
            return Err(GuardError::ExpectedCloseParen { pos: self.pos });
        }
        self.leave();
        Ok(inner)
    }

    fn parse_comparison(&mut self) -> Result<Expr, GuardError> {
        let path = self.parse_path()?;
        let after_path = self.pos;
        self.skip_ws();
        let cmp = if self.eat("==") {
            self.skip_ws();
            Comparison::Eq(self.parse_value()?)
        } else if self.eat("!=") {
            self.skip_ws();
            Comparison::Ne(self.parse_value()?)
        } else if let Some(op) = self.eat_order_op() {
            self.skip_ws();
            Comparison::Order(op, self.parse_number(true)?)
        } else {
            // No operator: a bare path. Whatever follows is the caller's.
            self.pos = after_path;
            return Ok(Expr::Truthy(path));
        };
        Ok(Expr::Compare(path, cmp))
    }

    /// Two-character operators are tried first so `>=` is not read as `>`.
    fn eat_order_op(&mut self) -> Option<OrderOp> {
        [
            (">=", OrderOp::Ge),
            ("<=", OrderOp::Le),
            (">", OrderOp::Gt),
            ("<", OrderOp::Lt),
        ]
        .into_iter()
        .find(|(token, _)| self.eat(token))
        .map(|(_, op)| op)
    }

    fn parse_path(&mut self) -> Result<Path, GuardError> {
        if !self.eat("ctx.") {
            return Err(GuardError::ExpectedField { pos: self.pos });
        }
        let name_pos = self.pos;
        let name = self.take_while(is_path_char);
        if name.is_empty() {
            return Err(GuardError::EmptyField { pos: name_pos });
        }
        Ok(Path(name.split('.').map(str::to_owned).collect()))
    }

    /// The right-hand side of `==` / `!=`.
    fn parse_value(&mut self) -> Result<Literal, GuardError> {
        if self.peek() == Some('"') {
            return self.parse_string().map(Literal::Str);
        }
        for (word, literal) in [
            ("true", Literal::Bool(true)),
            ("false", Literal::Bool(false)),
            ("null", Literal::Null),
        ] {
            if let Some(after) = self.rest().strip_prefix(word) {
                if after.chars().next().is_some_and(is_word_char) {
                    // `truex`: keywords are whole words only (D23).
                    return Err(GuardError::ExpectedValue { pos: self.pos });
                }
                self.pos += word.len();
                return Ok(literal);
            }
        }
        self.parse_number(false).map(Literal::Num)
    }

    /// A string literal; its value is the raw text between the quotes. A
    /// backslash makes the next character part of the string whatever it is.
    fn parse_string(&mut self) -> Result<String, GuardError> {
        let open = self.pos;
        self.pos += 1;
        let body_start = self.pos;
        let mut chars = self.rest().char_indices();
        while let Some((offset, c)) = chars.next() {
            match c {
                '"' => {
                    let body = self.src.get(body_start..body_start + offset).unwrap_or("");
                    self.pos = body_start + offset + 1;
                    return Ok(body.to_owned());
                }
                '\\' if chars.next().is_none() => break,
                _ => {}
            }
        }
        Err(GuardError::UnterminatedString { pos: open })
    }

    /// `-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?`, finite as an f64.
    /// `ordering` only selects the error reported when no number starts here.
    fn parse_number(&mut self, ordering: bool) -> Result<f64, GuardError> {
        let start = self.pos;
        self.eat("-");
        let int_digits = self.take_while(|c| c.is_ascii_digit()).len();
        let frac_digits = if self.eat(".") {
            self.take_while(|c| c.is_ascii_digit()).len()
        } else {
            0
        };
        let text = self.src.get(start..self.pos).unwrap_or("");
        if int_digits == 0 && frac_digits == 0 {
            return Err(if text.is_empty() {
                if ordering {
                    GuardError::ExpectedNumber { pos: start }
                } else {
                    GuardError::ExpectedValue { pos: start }
                }
            } else {
                GuardError::InvalidNumber {
                    text: text.to_owned(),
                    pos: start,
                }
            });
        }
        self.eat_exponent();
        let text = self.src.get(start..self.pos).unwrap_or("");
        match text.parse::<f64>() {
            Ok(value) if value.is_finite() => Ok(value),
            _ => Err(GuardError::InvalidNumber {
                text: text.to_owned(),
                pos: start,
            }),
        }
    }

    /// Consumes `[eE][+-]?[0-9]+` only when complete; a dangling `e` is left
    /// for the caller to reject as unexpected text.
    fn eat_exponent(&mut self) {
        let rest = self.rest().as_bytes();
        if !matches!(rest.first(), Some(b'e' | b'E')) {
            return;
        }
        let sign = usize::from(matches!(rest.get(1), Some(b'+' | b'-')));
        let digits = rest
            .iter()
            .skip(1 + sign)
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits > 0 {
            self.pos += 1 + sign + digits;
        }
    }
}

/// A one-element chain is just its element.
fn collapse(mut terms: Vec<Expr>, make: fn(Vec<Expr>) -> Expr) -> Expr {
    if terms.len() == 1 {
        if let Some(only) = terms.pop() {
            return only;
        }
    }
    make(terms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GUARD_VECTORS: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/vectors/guards.jsonl");

    /// What a vector case expects from PUT_MACHINE + APPLY_EVENT, reduced to
    /// the logic level.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        Invalid,
        Applied,
        GuardFailed,
    }

    fn expected_outcome(case: &Value) -> Result<Outcome, String> {
        let expected = &case["expected"];
        match (&expected["put"], &expected["apply"]) {
            (Value::String(p), Value::String(a)) if p == "ok" && a == "ok" => Ok(Outcome::Applied),
            (Value::String(p), Value::String(a)) if p == "ok" && a == "GUARD_FAILED" => {
                Ok(Outcome::GuardFailed)
            }
            (Value::Object(err), Value::Null) => {
                let prefix = err.get("message_prefix").and_then(Value::as_str);
                if prefix == Some("invalid guard expression") {
                    Ok(Outcome::Invalid)
                } else {
                    Err(format!("unexpected error shape {err:?}"))
                }
            }
            other => Err(format!("unexpected expectation {other:?}")),
        }
    }

    fn actual_outcome(guard: &Value, ctx: &Value) -> Outcome {
        let Some(text) = guard.as_str() else {
            // No guard: the transition always applies.
            return Outcome::Applied;
        };
        match Guard::parse(text) {
            Err(_) => Outcome::Invalid,
            Ok(g) if g.eval(ctx) => Outcome::Applied,
            Ok(_) => Outcome::GuardFailed,
        }
    }

    #[test]
    fn guard_vectors() {
        let text = std::fs::read_to_string(GUARD_VECTORS).expect("read guards.jsonl");
        let mut failures = Vec::new();
        let mut count = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let case: Value = serde_json::from_str(line).expect("vector line is JSON");
            count += 1;
            let id = case["id"].as_str().unwrap_or("?").to_owned();
            match expected_outcome(&case) {
                Ok(want) => {
                    let got = actual_outcome(&case["guard"], &case["ctx"]);
                    if got != want {
                        failures.push(format!("{id}: want {want:?}, got {got:?}"));
                    }
                }
                Err(e) => failures.push(format!("{id}: {e}")),
            }
        }
        assert!(count >= 271, "only {count} guard cases read");
        assert!(
            failures.is_empty(),
            "failing guard cases:\n{}",
            failures.join("\n")
        );
    }

    #[test]
    fn deep_parentheses_are_rejected_without_overflow() {
        let text = format!("{}ctx.a{}", "(".repeat(100_000), ")".repeat(100_000));
        // Longer than the byte limit: rejected before parsing.
        assert!(matches!(
            Guard::parse(&text),
            Err(GuardError::TooLong { .. })
        ));
        // The depth check alone (byte limit bypassed) stops the descent.
        assert!(matches!(
            Parser::new(&text).parse_guard(),
            Err(GuardError::TooDeep { pos: 64, .. })
        ));
        // Within the byte limit, the depth check must fire instead.
        let text = format!("{}ctx.a{}", "(".repeat(4000), ")".repeat(4000));
        assert!(matches!(
            Guard::parse(&text),
            Err(GuardError::TooDeep { pos: 64, .. })
        ));
    }

    #[test]
    fn deep_negation_is_rejected_without_overflow() {
        let text = format!("{}ctx.a", "!".repeat(100_000));
        assert!(Guard::parse(&text).is_err());
        assert!(matches!(
            Parser::new(&text).parse_guard(),
            Err(GuardError::TooDeep { pos: 64, .. })
        ));
        let text = format!("{}ctx.a", "!".repeat(8000));
        assert!(matches!(
            Guard::parse(&text),
            Err(GuardError::TooDeep { .. })
        ));
        let text = format!("{}ctx.a", "! ".repeat(4000));
        assert!(matches!(
            Guard::parse(&text),
            Err(GuardError::TooDeep { .. })
        ));
    }

    #[test]
    fn depth_limit_is_exactly_64_and_siblings_do_not_add() {
        let nest = |n: usize| format!("{}ctx.a{}", "(".repeat(n), ")".repeat(n));
        assert!(Guard::parse(&nest(64)).is_ok());
        assert!(Guard::parse(&nest(65)).is_err());
        assert!(Guard::parse(&format!("{} && {}", nest(64), nest(64))).is_ok());
        assert!(Guard::parse(&format!("{}{}", "!(".repeat(32), "ctx.a")).is_err());
        let not_paren = format!("{}ctx.a{}", "!(".repeat(32), ")".repeat(32));
        assert!(Guard::parse(&not_paren).is_ok());
        let too_deep = format!("!{not_paren}");
        assert!(Guard::parse(&too_deep).is_err());
    }

    #[test]
    fn length_limit_counts_bytes() {
        let pad = |n: usize| format!("ctx.a == \"{}\"", "x".repeat(n));
        let at_limit = pad(MAX_GUARD_BYTES - 11);
        assert_eq!(at_limit.len(), MAX_GUARD_BYTES);
        assert!(Guard::parse(&at_limit).is_ok());
        let over = format!("ctx.a == \"{}\"", "x".repeat(9000 - 11));
        assert_eq!(over.len(), 9000);
        assert_eq!(
            Guard::parse(&over).unwrap_err(),
            GuardError::TooLong {
                len: 9000,
                limit: MAX_GUARD_BYTES
            }
        );
    }

    #[test]
    fn error_messages_carry_positions() {
        let err = |t: &str| Guard::parse(t).unwrap_err().to_string();
        assert_eq!(err(""), "empty guard expression");
        assert_eq!(err(" \u{3000}"), "empty guard expression");
        assert_eq!(err("a"), "field must start with 'ctx.' at byte 0");
        assert_eq!(err("ctx.$a"), "empty field name at byte 4");
        assert_eq!(err("ctx.a = 1"), "unexpected text at byte 6");
        assert_eq!(err("(ctx.a"), "expected ')' at byte 6");
        assert_eq!(
            err("ctx.a == \"x\\"),
            "unterminated string starting at byte 9"
        );
        assert_eq!(err("ctx.a == -."), "invalid number: '-.' at byte 9");
        assert_eq!(err("ctx.a == 1e400"), "invalid number: '1e400' at byte 9");
        assert_eq!(
            err("ctx.a == truex"),
            "expected a value (true, false, null, a string or a number) at byte 9"
        );
        assert_eq!(err("ctx.a > true"), "expected a number at byte 8");
    }

    #[test]
    fn strings_are_raw_and_paths_resolve_by_segment() {
        let g = Guard::parse(r#"ctx.a.b == "x\"y""#).unwrap();
        assert!(g.eval(&json!({"a": {"b": "x\\\"y"}})));
        assert!(!g.eval(&json!({"a": {"b": "x\"y"}})));
        assert_eq!(g.source(), r#"ctx.a.b == "x\"y""#);
        // A non-object ctx makes every path null.
        assert!(Guard::parse("ctx.a == null").unwrap().eval(&json!([1])));
        assert!(!Guard::parse("ctx.a").unwrap().eval(&Value::Null));
    }

    #[test]
    fn whitespace_set_is_exactly_unicode_white_space() {
        for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
            assert_eq!(
                is_guard_whitespace(c),
                c.is_whitespace(),
                "U+{:04X}",
                c as u32
            );
        }
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn parser_never_panics(text in any::<String>()) {
                let _ = Guard::parse(&text);
            }

            #[test]
            fn parser_never_panics_on_guard_like_text(
                text in r#"[ !()ctx.ab&|=<>"\\0-9eE+\-\u{3000}\u{e9}]{0,64}"#
            ) {
                if let Ok(g) = Guard::parse(&text) {
                    let _ = g.eval(&serde_json::json!({"a": 1, "b": {"a": "x"}}));
                }
            }

        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            /// Any expression of the grammar, printed with minimal
            /// parentheses and random spacing, evaluates as a model written
            /// straight from SEMANTICS §6.2-6.3 says.
            #[test]
            fn evaluation_matches_the_model(
                e in super::model::expr(),
                ctx in super::model::ctx(),
                spacing in proptest::collection::vec(0u8..4, 64),
            ) {
                let mut ws = spacing.into_iter().cycle();
                // Every sub-expression on its own too: a wrong leaf hidden
                // by `||` or `&&` above it is still seen.
                for sub in super::model::parts(&e) {
                    let text = super::model::print(sub, 0, &mut ws);
                    let g = Guard::parse(&text)
                        .map_err(|err| TestCaseError::fail(format!("{text:?}: {err}")))?;
                    prop_assert_eq!(g.eval(&ctx), super::model::eval(sub, &ctx), "{} on {}", text, ctx);
                }
            }
        }
    }

    /// A reference model of the guard language: its own AST, printer and
    /// evaluator, sharing nothing with the parser under test.
    mod model {
        use proptest::prelude::*;
        use serde_json::{json, Value};

        #[derive(Debug, Clone)]
        pub enum Lit {
            Null,
            Bool(bool),
            Num(String, f64),
            Str(String),
        }

        #[derive(Debug, Clone)]
        pub enum E {
            Or(Box<E>, Box<E>),
            And(Box<E>, Box<E>),
            Not(Box<E>),
            Path(Vec<String>),
            Eq(Vec<String>, bool, Lit),
            Ord(Vec<String>, &'static str, String, f64),
        }

        fn path() -> impl Strategy<Value = Vec<String>> {
            prop_oneof![
                3 => prop_oneof!["a", "b", "_x1"].prop_map(|k| vec![k]),
                1 => proptest::collection::vec(prop_oneof!["a", "b", "c", "_x1"], 1..3),
            ]
        }

        fn number() -> impl Strategy<Value = (String, f64)> {
            // Few distinct values, each in several spellings, so that
            // comparisons meet their boundaries (equal values) often.
            proptest::sample::select(vec![
                "0", "-0", "1", "1.0", "1e0", "-1", "0.5", ".5", "5e-1", "10", "1e1", "-0.25",
            ])
            .prop_map(str::to_string)
            .prop_map(|t| {
                let v = t.parse().expect("a number");
                (t, v)
            })
        }

        fn lit() -> impl Strategy<Value = Lit> {
            prop_oneof![
                Just(Lit::Null),
                any::<bool>().prop_map(Lit::Bool),
                number().prop_map(|(t, v)| Lit::Num(t, v)),
                prop_oneof!["", "x", "yes", "1"].prop_map(Lit::Str),
            ]
        }

        pub fn expr() -> impl Strategy<Value = E> {
            let leaf = prop_oneof![
                path().prop_map(E::Path),
                (path(), any::<bool>(), lit()).prop_map(|(p, eq, l)| E::Eq(p, eq, l)),
                (
                    path(),
                    prop_oneof![Just(">"), Just(">="), Just("<"), Just("<=")],
                    number()
                )
                    .prop_map(|(p, op, (t, v))| E::Ord(p, op, t, v)),
            ];
            leaf.prop_recursive(4, 24, 2, |inner| {
                prop_oneof![
                    (inner.clone(), inner.clone()).prop_map(|(a, b)| E::Or(a.into(), b.into())),
                    (inner.clone(), inner.clone()).prop_map(|(a, b)| E::And(a.into(), b.into())),
                    inner.prop_map(|a| E::Not(a.into())),
                ]
            })
        }

        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                1 => Just(Value::Null),
                1 => any::<bool>().prop_map(Value::from),
                // The literals' own numbers, so that comparisons often meet
                // their boundaries (equal values).
                4 => number().prop_map(|(_, v)| {
                    if v.fract() == 0.0 {
                        Value::from(v as i64)
                    } else {
                        Value::from(v)
                    }
                }),
                1 => prop_oneof!["", "x", "yes", "1"].prop_map(Value::from),
            ];
            leaf.prop_recursive(2, 12, 3, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..2).prop_map(Value::Array),
                    proptest::collection::btree_map(prop_oneof!["a", "b", "c", "_x1"], inner, 0..3)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        pub fn ctx() -> impl Strategy<Value = Value> {
            prop_oneof![
                9 => proptest::collection::btree_map(prop_oneof!["a", "b", "c", "_x1"], value(), 1..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                1 => value(),
            ]
        }

        fn space(ws: &mut impl Iterator<Item = u8>) -> &'static str {
            match ws.next().unwrap_or(0) {
                0 => "",
                1 => " ",
                2 => "  ",
                _ => "\t",
            }
        }

        /// Prints `e` inside an operator of precedence `outer` (0 top,
        /// 1 `||`, 2 `&&`, 3 `!`), with parentheses only where needed.
        pub fn print(e: &E, outer: u8, ws: &mut impl Iterator<Item = u8>) -> String {
            let (prec, text) = match e {
                E::Or(a, b) => (
                    1,
                    format!(
                        "{}{}||{}{}",
                        print(a, 1, ws),
                        space(ws),
                        space(ws),
                        print(b, 2, ws)
                    ),
                ),
                E::And(a, b) => (
                    2,
                    format!(
                        "{}{}&&{}{}",
                        print(a, 2, ws),
                        space(ws),
                        space(ws),
                        print(b, 3, ws)
                    ),
                ),
                E::Not(a) => (3, format!("!{}{}", space(ws), print(a, 3, ws))),
                E::Path(p) => (4, format!("ctx.{}", p.join("."))),
                E::Eq(p, eq, l) => {
                    let l = match l {
                        Lit::Null => "null".to_string(),
                        Lit::Bool(b) => b.to_string(),
                        Lit::Num(t, _) => t.clone(),
                        Lit::Str(s) => format!("\"{s}\""),
                    };
                    let op = if *eq { "==" } else { "!=" };
                    (
                        4,
                        format!("ctx.{}{}{op}{}{l}", p.join("."), space(ws), space(ws)),
                    )
                }
                E::Ord(p, op, t, _) => (
                    4,
                    format!("ctx.{}{}{op}{}{t}", p.join("."), space(ws), space(ws)),
                ),
            };
            if prec < outer {
                format!("({}{text}{})", space(ws), space(ws))
            } else {
                text
            }
        }

        fn resolve<'v>(ctx: &'v Value, p: &[String]) -> &'v Value {
            static NULL: Value = Value::Null;
            let mut v = ctx;
            for k in p {
                match v {
                    Value::Object(m) => v = m.get(k).unwrap_or(&NULL),
                    _ => return &NULL,
                }
            }
            v
        }

        fn truthy(v: &Value) -> bool {
            match v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
            }
        }

        fn equal(v: &Value, l: &Lit) -> bool {
            match (v, l) {
                (Value::Null, Lit::Null) => true,
                (Value::Bool(a), Lit::Bool(b)) => a == b,
                (Value::Number(a), Lit::Num(_, b)) => {
                    (a.as_f64().unwrap() - b).abs() < f64::EPSILON
                }
                (Value::String(a), Lit::Str(b)) => a == b,
                _ => false,
            }
        }

        /// `e` and every expression inside it.
        pub fn parts(e: &E) -> Vec<&E> {
            let mut out = vec![e];
            match e {
                E::Or(a, b) | E::And(a, b) => {
                    out.extend(parts(a));
                    out.extend(parts(b));
                }
                E::Not(a) => out.extend(parts(a)),
                _ => {}
            }
            out
        }

        pub fn eval(e: &E, ctx: &Value) -> bool {
            match e {
                E::Or(a, b) => eval(a, ctx) || eval(b, ctx),
                E::And(a, b) => eval(a, ctx) && eval(b, ctx),
                E::Not(a) => !eval(a, ctx),
                E::Path(p) => truthy(resolve(ctx, p)),
                E::Eq(p, eq, l) => equal(resolve(ctx, p), l) == *eq,
                E::Ord(p, op, _, n) => match resolve(ctx, p).as_f64() {
                    Some(v) => match *op {
                        ">" => v > *n,
                        ">=" => v >= *n,
                        "<" => v < *n,
                        _ => v <= *n,
                    },
                    None => false,
                },
            }
        }

        #[test]
        fn the_model_reads_the_spec_examples() {
            let ctx = json!({"amount": 5, "s": "5"});
            let p = |k: &str| vec![k.to_string()];
            assert!(!eval(&E::Eq(p("amount"), true, Lit::Str("5".into())), &ctx));
            assert!(eval(&E::Eq(p("missing"), true, Lit::Null), &ctx));
            assert!(eval(
                &E::Eq(p("missing"), false, Lit::Num("1".into(), 1.0)),
                &ctx
            ));
            assert!(!eval(&E::Ord(p("s"), ">", "1".into(), 1.0), &ctx));
        }
    }
}
