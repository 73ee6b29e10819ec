//! Canonical JSON text, byte for byte what PostgreSQL's `jsonb` output function prints.
//!
//! Checksums are computed by the capture trigger in SQL as `sha256(jsonb::text)`, so any
//! implementation that verifies them must print JSON exactly as `jsonb_out` does: object keys
//! sorted by length and then bytewise, `", "` and `": "` separators, PostgreSQL's string escapes,
//! and numbers in the text they arrived in (numbers produced by PostgreSQL are already in
//! `numeric_out` form; serde_json's `arbitrary_precision` keeps that text unchanged).

use serde_json::Value;
use std::fmt::Write;

/// Print `v` the way PostgreSQL prints the same value as `jsonb`.
pub fn jsonb_text(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v);
    out
}

/// Append `v`'s canonical text to `out`.
pub fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(n.as_str()),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // jsonb orders keys by length first, then by bytes (lengthCompareJsonbString).
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.as_bytes().cmp(b.as_bytes())));
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(out, k);
                out.push_str(": ");
                write_value(out, &map[*k]);
            }
            out.push('}');
        }
    }
}

/// PostgreSQL's `escape_json`: a few named escapes, other control characters as `\u00xx`,
/// everything else (including non-ASCII) literally.
pub fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_sort_by_length_then_bytes() {
        let v = json!({"bb": 1, "a": 2, "ab": [true, null], "c": {"z": 1, "yy": "x"}});
        assert_eq!(jsonb_text(&v), r#"{"a": 2, "c": {"z": 1, "yy": "x"}, "ab": [true, null], "bb": 1}"#);
    }

    #[test]
    fn strings_escape_like_postgres() {
        let v = json!("q\"b\\n\nt\tc\u{1}é\u{7f}");
        assert_eq!(jsonb_text(&v), "\"q\\\"b\\\\n\\nt\\tc\\u0001é\u{7f}\"");
    }

    #[test]
    fn numbers_keep_their_text() {
        let v: Value = serde_json::from_str(r#"[1.10, -0.000, 123456789012345678901234567890]"#).unwrap();
        assert_eq!(jsonb_text(&v), "[1.10, -0.000, 123456789012345678901234567890]");
    }

    #[test]
    fn empty_containers() {
        assert_eq!(jsonb_text(&json!({"a": {}, "b": []})), r#"{"a": {}, "b": []}"#);
    }
}
