//! The list filters of Glance's image API that are more than "attribute
//! equals value": `size_min` / `size_max`, the `in:` operator on the core
//! attributes that take it, the comparison operators on `created_at` and
//! `updated_at`, and `visibility=all`.
//!
//! Contract: [`Condition::parse`] recognises exactly those parameters (any
//! other is an equality filter, decided by the caller) and refuses a
//! malformed value with [`Error::Invalid`], naming the parameter; a parsed
//! condition never fails when it is applied.

use std::cmp::Ordering;

use strata_repo::time::Timestamp;

use crate::error::{Error, Result};
use crate::record::ImageRecord;

/// Core attributes whose filter may name several values (`in:"a","b"`).
pub const IN_KEYS: &[&str] = &["id", "name", "status", "container_format", "disk_format"];
/// Attributes compared as times (`gte:2026-01-02T03:04:05Z`).
pub const TIME_KEYS: &[&str] = &["created_at", "updated_at"];

/// One parsed filter of a list query.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// No condition at all (`visibility=all`).
    Any,
    /// The attribute's value is one of these.
    In(String, Vec<String>),
    /// The data is at least this many bytes (an image without data never is).
    SizeMin(u64),
    /// The data is at most this many bytes (an image without data never is).
    SizeMax(u64),
    /// The attribute's time compares to this one as the operator says.
    Time(String, TimeOp, Timestamp),
}

/// A comparison of Glance's time filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeOp {
    Eq,
    Neq,
    Gt,
    Gte,
    Lt,
    Lte,
}

impl TimeOp {
    fn parse(s: &str) -> Option<TimeOp> {
        Some(match s {
            "eq" => TimeOp::Eq,
            "neq" => TimeOp::Neq,
            "gt" => TimeOp::Gt,
            "gte" => TimeOp::Gte,
            "lt" => TimeOp::Lt,
            "lte" => TimeOp::Lte,
            _ => return None,
        })
    }

    fn holds(self, o: Ordering) -> bool {
        match self {
            TimeOp::Eq => o == Ordering::Equal,
            TimeOp::Neq => o != Ordering::Equal,
            TimeOp::Gt => o == Ordering::Greater,
            TimeOp::Gte => o != Ordering::Less,
            TimeOp::Lt => o == Ordering::Less,
            TimeOp::Lte => o != Ordering::Greater,
        }
    }
}

impl Condition {
    /// The condition query parameter `key=value` states, `None` when it is an
    /// equality filter (any other key, or one of [`IN_KEYS`] without `in:`).
    pub fn parse(key: &str, value: &str) -> Result<Option<Condition>> {
        Ok(Some(match key {
            "visibility" if value == "all" => Condition::Any,
            "size_min" => Condition::SizeMin(size(key, value)?),
            "size_max" => Condition::SizeMax(size(key, value)?),
            k if TIME_KEYS.contains(&k) => {
                let (op, when) = value
                    .split_once(':')
                    .and_then(|(op, rest)| Some((TimeOp::parse(op)?, rest)))
                    .unwrap_or((TimeOp::Eq, value));
                let t = Timestamp::parse(when).ok_or_else(|| {
                    Error::Invalid(format!(
                        "Invalid {k} filter '{value}': use [OP:]TIME with OP one of eq, neq, gt, gte, lt, lte and TIME like 2026-01-02T03:04:05Z"
                    ))
                })?;
                Condition::Time(k.to_string(), op, t)
            }
            k if IN_KEYS.contains(&k) => match value.strip_prefix("in:") {
                Some(list) => Condition::In(k.to_string(), split_list(k, list)?),
                None => return Ok(None),
            },
            _ => return Ok(None),
        }))
    }

    /// Whether `rec` satisfies the condition.
    pub fn holds(
        &self,
        rec: &ImageRecord,
        json: &serde_json::Map<String, serde_json::Value>,
    ) -> bool {
        match self {
            Condition::Any => true,
            Condition::In(k, values) => json
                .get(k)
                .and_then(|v| v.as_str())
                .is_some_and(|v| values.iter().any(|w| w == v)),
            Condition::SizeMin(n) => rec.size.is_some_and(|s| s >= *n),
            Condition::SizeMax(n) => rec.size.is_some_and(|s| s <= *n),
            Condition::Time(k, op, t) => json
                .get(k)
                .and_then(|v| v.as_str())
                .and_then(Timestamp::parse)
                .is_some_and(|have| op.holds(have.cmp(t))),
        }
    }
}

fn size(key: &str, value: &str) -> Result<u64> {
    value
        .parse()
        .map_err(|_| Error::Invalid(format!("{key} must be a non-negative integer: {value}")))
}

/// The values of an `in:` list: separated by commas, each optionally in
/// double quotes (then it may hold commas; `\"` and `\\` escape).
fn split_list(key: &str, list: &str) -> Result<Vec<String>> {
    let bad = || Error::Invalid(format!("Invalid 'in' filter of {key}: in:{list}"));
    let mut out = Vec::new();
    let mut chars = list.chars().peekable();
    loop {
        let mut v = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next().ok_or_else(bad)? {
                    '"' => break,
                    '\\' => v.push(chars.next().ok_or_else(bad)?),
                    c => v.push(c),
                }
            }
            match chars.next() {
                None => {
                    out.push(v);
                    return Ok(out);
                }
                Some(',') => {}
                Some(_) => return Err(bad()),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        out.push(v);
                        return Ok(out);
                    }
                    Some(',') => break,
                    Some('"') => return Err(bad()),
                    Some(c) => v.push(c),
                }
            }
        }
        out.push(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_lists_split_on_commas_outside_quotes() {
        assert_eq!(split_list("name", "a,b").unwrap(), ["a", "b"]);
        assert_eq!(
            split_list("name", r#""a,1","b\"c",d"#).unwrap(),
            ["a,1", "b\"c", "d"]
        );
        assert_eq!(split_list("name", "").unwrap(), [""]);
        for bad in [r#""open"#, r#""a"x"#, r#"a"b"#] {
            assert!(split_list("name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn time_operators_compare_as_glance_names_them() {
        use Ordering::*;
        let table = [
            (TimeOp::Eq, [false, true, false]),
            (TimeOp::Neq, [true, false, true]),
            (TimeOp::Gt, [false, false, true]),
            (TimeOp::Gte, [false, true, true]),
            (TimeOp::Lt, [true, false, false]),
            (TimeOp::Lte, [true, true, false]),
        ];
        for (op, want) in table {
            let got = [Less, Equal, Greater].map(|o| op.holds(o));
            assert_eq!(got, want, "{op:?}");
        }
    }
}
