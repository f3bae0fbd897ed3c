//! Turns the JSON lines of a matrix run (`bench/matrix.sh`) into the
//! markdown table of docs/PERFORMANCE.md: ours next to the reference and
//! the null server, with the ratios.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";

fn micros(us: &Value) -> String {
    us.as_f64()
        .map_or_else(|| "–".into(), |v| format!("{v:.0}"))
}

/// The glommio null server's p50 and CPU per operation: the floor of any
/// server on the design card's runtime, where it was measured.
fn floor(r: Option<&Value>) -> String {
    r.map_or_else(
        || "–".into(),
        |r| {
            let cpu = r["server_cpu_us_per_op"]
                .as_f64()
                .map_or_else(|| "–".into(), |v| format!("{v:.1}"));
            format!("{} / {cpu}", micros(&r["latency_us"]["p50"]))
        },
    )
}

fn ops(r: Option<&Value>) -> String {
    r.and_then(|r| r["ops_per_sec"].as_f64())
        .map_or_else(|| "–".into(), |v| format!("{v:.0}"))
}

/// Server CPU µs per operation, and the client's.
fn cpu(r: Option<&Value>) -> String {
    let us = |k: &str| r.and_then(|r| r[k].as_f64());
    match (us("server_cpu_us_per_op"), us("client_cpu_us_per_op")) {
        (Some(s), Some(c)) => format!("{s:.1} ({c:.1})"),
        (Some(s), None) => format!("{s:.1}"),
        _ => "–".into(),
    }
}

fn ratio(a: Option<&Value>, b: Option<&Value>) -> String {
    match (
        a.and_then(|r| r["ops_per_sec"].as_f64()),
        b.and_then(|r| r["ops_per_sec"].as_f64()),
    ) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
        _ => "–".into(),
    }
}

/// (workload, connections, pipeline, client).
type Key = (String, u64, u64, String);
/// (workload, cell, client) → fsync → server → report.
type Rows = BTreeMap<Key, BTreeMap<String, BTreeMap<String, Value>>>;

/// Writes the table for the runs in `input` between the bench markers of
/// `into` (appending the section if the markers are missing).
pub fn write(input: &Path, into: &Path, header: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let rows = parse_rows(&text)?;
    let md = section(&rows, header);
    let doc = std::fs::read_to_string(into).unwrap_or_default();
    let out = splice(&doc, &md);
    std::fs::write(into, out).map_err(|e| format!("{}: {e}", into.display()))
}

/// Groups the JSON lines by table row, fsync setting and server (the
/// `fsync` and `server` tags).
fn parse_rows(text: &str) -> Result<Rows, String> {
    let mut rows = Rows::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("{line}: {e}"))?;
        let tag = |k: &str| v["tags"][k].as_str().unwrap_or("").to_owned();
        let key = (
            v["workload"].as_str().unwrap_or("?").to_owned(),
            v["connections"].as_u64().unwrap_or(0),
            v["pipeline"].as_u64().unwrap_or(0),
            v["client"].as_str().unwrap_or("threads").to_owned(),
        );
        rows.entry(key)
            .or_default()
            .entry(tag("fsync"))
            .or_default()
            .insert(tag("server"), v);
    }
    Ok(rows)
}

/// The bench section: markers, header and table, one line per (row,
/// fsync); the null servers (fsync `-`) are columns of every line.
fn section(rows: &Rows, header: &str) -> String {
    let mut md = String::new();
    md.push_str(BEGIN);
    md.push('\n');
    md.push_str(header.trim_end());
    md.push_str("\n\n");
    md.push_str("| workload | fsync | conns × pipeline | client | null ops/s | glommio null p50 µs / CPU µs/op | reference ops/s | ours ops/s | ours / reference | ours / null | reference p50 / p99 µs | ours p50 / p99 µs | reference CPU µs/op (client) | ours CPU µs/op (client) | ours errors | consistency (ours) |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (key, by_fsync) in rows {
        let null = by_fsync.get("-").and_then(|m| m.get("null"));
        let null_glommio = by_fsync.get("-").and_then(|m| m.get("null-glommio"));
        for (fsync, servers) in by_fsync.iter().filter(|(f, _)| f.as_str() != "-") {
            md.push_str(&line(key, fsync, servers, null, null_glommio));
        }
    }
    md.push_str(END);
    md.push('\n');
    md
}

/// One table line: ours next to the reference and the null servers.
fn line(
    (workload, c, p, client): &Key,
    fsync: &str,
    servers: &BTreeMap<String, Value>,
    null: Option<&Value>,
    null_glommio: Option<&Value>,
) -> String {
    let reference = servers.get("reference");
    let ours = servers.get("ours");
    let errors = ours.map_or_else(|| "–".into(), errors);
    let consistency = ours.map_or_else(|| "–".into(), consistency);
    format!(
        "| {workload} | {fsync} | {c} × {p} | {client} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {errors} | {consistency} |\n",
        ops(null),
        floor(null_glommio),
        ops(reference),
        ops(ours),
        ratio(ours, reference),
        ratio(ours, null),
        latency(reference),
        latency(ours),
        cpu(reference),
        cpu(ours),
    )
}

/// p50 / p99 latency in µs.
fn latency(r: Option<&Value>) -> String {
    r.map_or_else(
        || "–".into(),
        |r| {
            format!(
                "{} / {}",
                micros(&r["latency_us"]["p50"]),
                micros(&r["latency_us"]["p99"])
            )
        },
    )
}

/// Errors of all codes plus transport errors.
fn errors(r: &Value) -> String {
    let e = r["errors"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum::<u64>())
        + r["transport_errors"].as_u64().unwrap_or(0);
    e.to_string()
}

/// The consistency check's outcome (`n/a` when nothing was checked).
fn consistency(r: &Value) -> String {
    let c = &r["consistency"];
    match (c["checked"].as_u64(), c["wrong"].as_u64()) {
        (Some(0), _) => "n/a".into(),
        (Some(n), Some(0)) => format!("{n} ok"),
        (Some(n), Some(w)) => format!("{w} of {n} WRONG"),
        _ => "–".into(),
    }
}

/// `doc` with `md` in place of its bench section, or appended when the
/// markers are missing.
fn splice(doc: &str, md: &str) -> String {
    match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{}{}",
            &doc[..b],
            md,
            &doc[e + END.len()..].trim_start_matches('\n')
        ),
        _ => format!("{}\n{}", doc.trim_end(), md),
    }
}
