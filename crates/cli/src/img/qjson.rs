//! JSON printed the way qemu-img prints it, so `--output=json` is byte-identical.
//!
//! qemu-img builds its output in QEMU's hash dictionaries and prints them pretty,
//! four spaces per level. Keys therefore come out in the order of their hash bucket
//! (512 buckets; within a bucket, the key added last first), and empty arrays and
//! objects still take two lines. Values are the caller's (built in QEMU's schema
//! order); this module only reproduces the layout.

use serde_json::Value;

const BUCKETS: u32 = 512;

/// QEMU's dictionary bucket of `key`.
fn bucket(key: &str) -> u32 {
    let mut v: u32 = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, b) in key.bytes().enumerate() {
        v = v.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % BUCKETS
}

/// The keys of `map` in the order QEMU iterates them.
pub fn key_order(map: &serde_json::Map<String, Value>) -> Vec<&String> {
    let mut keys: Vec<(u32, usize, &String)> = map
        .keys()
        .enumerate()
        .map(|(i, k)| (bucket(k), i, k))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    keys.into_iter().map(|(_, _, k)| k).collect()
}

/// Pretty-print `v` as qemu-img does (no trailing newline).
pub fn to_string(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v, 0);
    out
}

fn indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn write_value(out: &mut String, v: &Value, level: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(a) => {
            out.push_str("[\n");
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(",\n");
                }
                indent(out, level + 1);
                write_value(out, item, level + 1);
            }
            if !a.is_empty() {
                out.push('\n');
            }
            indent(out, level);
            out.push(']');
        }
        Value::Object(m) => {
            out.push_str("{\n");
            for (i, k) in key_order(m).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(",\n");
                }
                indent(out, level + 1);
                write_string(out, k);
                out.push_str(": ");
                write_value(out, &m[k], level + 1);
            }
            if !m.is_empty() {
                out.push('\n');
            }
            indent(out, level);
            out.push('}');
        }
    }
}

/// `v` on one line as QEMU prints it in a `json:` name: `{"key": value, ...}`,
/// keys in QEMU's order.
pub fn to_compact(v: &Value) -> String {
    let mut out = String::new();
    write_compact(&mut out, v);
    out
}

fn write_compact(out: &mut String, v: &Value) {
    match v {
        Value::Array(a) => {
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_compact(out, item);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, k) in key_order(m).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(out, k);
                out.push_str(": ");
                write_compact(out, &m[k]);
            }
            out.push('}');
        }
        scalar => write_value(out, scalar, 0),
    }
}

/// QEMU's string escaping: printable ASCII as is, everything else as `\uXXXX`.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{:04X}", u));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn check_report_keys_come_out_in_qemu_order() {
        let v = json!({
            "filename": "a", "format": "qcow2", "check-errors": 0,
            "image-end-offset": 1, "total-clusters": 2, "allocated-clusters": 1
        });
        let s = to_string(&v);
        let order: Vec<_> = s
            .lines()
            .skip(1)
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        assert_eq!(
            order,
            [
                "image-end-offset",
                "total-clusters",
                "check-errors",
                "allocated-clusters",
                "filename",
                "format"
            ]
        );
    }

    #[test]
    fn later_key_of_a_shared_bucket_comes_first() {
        // "backing-filename-format" and "children" share a bucket; QEMU adds
        // children last and prints it first.
        let v = json!({"backing-filename-format": "raw", "children": []});
        assert!(to_string(&v).starts_with("{\n    \"children\": [\n    ],\n    \"backing"));
    }

    #[test]
    fn compact_form_is_one_line_in_qemu_key_order() {
        let v = json!({"driver": "qcow2", "encrypt.key-secret": "s0",
            "file": {"driver": "file", "filename": "a \"b\""}});
        assert_eq!(
            to_compact(&v),
            r#"{"encrypt.key-secret": "s0", "driver": "qcow2", "file": {"driver": "file", "filename": "a \"b\""}}"#
        );
    }

    #[test]
    fn empty_containers_take_two_lines() {
        assert_eq!(
            to_string(&json!({"data": {}})),
            "{\n    \"data\": {\n    }\n}"
        );
    }
}
