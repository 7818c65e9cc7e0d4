//! Listing: Glance's filters, sort keys and marker paging, as a pure function
//! of the records and the query.

use std::cmp::Ordering;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::record::ImageRecord;

/// Default and largest page size.
pub const DEFAULT_LIMIT: usize = 25;
pub const MAX_LIMIT: usize = 1000;

/// Attributes a list may be sorted by.
pub const SORT_KEYS: &[&str] = &[
    "name",
    "status",
    "container_format",
    "disk_format",
    "size",
    "virtual_size",
    "id",
    "created_at",
    "updated_at",
    "visibility",
    "min_disk",
    "min_ram",
];

/// A parsed list query.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListQuery {
    /// Attribute equals value (core attributes and custom properties).
    pub filters: Vec<(String, String)>,
    /// Tags every listed image must carry.
    pub tags: Vec<String>,
    /// Sort keys with `true` for ascending; `created_at` descending if empty.
    pub sort: Vec<(String, bool)>,
    pub limit: usize,
    pub marker: Option<String>,
}

impl ListQuery {
    /// Parse query parameters as Glance does: `limit`, `marker`, `sort_key` /
    /// `sort_dir` (repeatable, paired in order) or `sort=key:dir,...`, `tag`
    /// (repeatable), and any other parameter as an equality filter.
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<ListQuery> {
        let mut q = ListQuery {
            limit: DEFAULT_LIMIT,
            ..Default::default()
        };
        let mut keys = Vec::new();
        let mut dirs = Vec::new();
        for (k, v) in pairs {
            match k.as_str() {
                "limit" => {
                    let n: i64 = v.parse().map_err(|_| {
                        Error::Invalid(format!("limit param must be an integer: {v}"))
                    })?;
                    if n < 0 {
                        return Err(Error::Invalid("limit param must be positive".into()));
                    }
                    q.limit = (n as u64).min(MAX_LIMIT as u64) as usize;
                }
                "marker" => q.marker = Some(v.clone()),
                "sort_key" => keys.push(check_sort_key(v)?),
                "sort_dir" => dirs.push(parse_dir(v)?),
                "sort" => {
                    for part in v.split(',') {
                        let (key, dir) = match part.split_once(':') {
                            Some((k, d)) => (k, parse_dir(d)?),
                            None => (part, false),
                        };
                        q.sort.push((check_sort_key(key)?, dir));
                    }
                }
                "tag" => q.tags.push(v.clone()),
                "member_status" | "owner" => {}
                _ => q.filters.push((k.clone(), v.clone())),
            }
        }
        if !keys.is_empty() && !q.sort.is_empty() {
            return Err(Error::Invalid(
                "The 'sort' parameter cannot be combined with 'sort_key' or 'sort_dir'".into(),
            ));
        }
        if dirs.len() > keys.len().max(1) {
            return Err(Error::Invalid("More sort directions than sort keys".into()));
        }
        if keys.is_empty() && !dirs.is_empty() {
            keys.push("created_at".into());
        }
        for (i, k) in keys.into_iter().enumerate() {
            let asc = dirs.get(i).or(dirs.last()).copied().unwrap_or(false);
            q.sort.push((k, asc));
        }
        Ok(q)
    }
}

fn check_sort_key(k: &str) -> Result<String> {
    if SORT_KEYS.contains(&k) {
        Ok(k.to_string())
    } else {
        Err(Error::Invalid(format!(
            "Invalid sort key: {k}. It should be one of: {}",
            SORT_KEYS.join(", ")
        )))
    }
}

fn parse_dir(d: &str) -> Result<bool> {
    match d {
        "asc" => Ok(true),
        "desc" => Ok(false),
        _ => Err(Error::Invalid(format!(
            "Invalid sort direction: {d}; use asc or desc"
        ))),
    }
}

/// One page of a list: the images and whether more follow the last.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub images: Vec<ImageRecord>,
    pub more: bool,
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn cmp_values(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    let rank = |v: Option<&Value>| match v {
        None | Some(Value::Null) => 0,
        _ => 1,
    };
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .unwrap_or(Ordering::Equal),
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        _ => rank(a).cmp(&rank(b)),
    }
}

/// Select, order and page `all` by `q`. Hidden images are left out unless the
/// query filters on `os_hidden`. A marker that names no listed image is an error.
pub fn select(all: Vec<ImageRecord>, q: &ListQuery) -> Result<Page> {
    let show_hidden = q.filters.iter().any(|(k, _)| k == "os_hidden");
    let mut rows: Vec<(serde_json::Map<String, Value>, ImageRecord)> = all
        .into_iter()
        .filter(|r| show_hidden || !r.os_hidden)
        .filter(|r| q.tags.iter().all(|t| r.tags.contains(t)))
        .map(|r| (r.to_json(), r))
        .filter(|(j, _)| {
            q.filters
                .iter()
                .all(|(k, v)| text(j.get(k)).as_deref() == Some(v.as_str()))
        })
        .collect();
    let mut sort = q.sort.clone();
    if sort.is_empty() {
        sort.push(("created_at".into(), false));
    }
    let last_dir = sort.last().map(|s| s.1).unwrap_or(false);
    if !sort.iter().any(|(k, _)| k == "id") {
        sort.push(("id".into(), last_dir));
    }
    rows.sort_by(|(a, _), (b, _)| {
        for (k, asc) in &sort {
            let o = cmp_values(a.get(k), b.get(k));
            let o = if *asc { o } else { o.reverse() };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    });
    let start = match &q.marker {
        None => 0,
        Some(m) => {
            rows.iter().position(|(_, r)| &r.id == m).ok_or_else(|| {
                Error::Invalid(format!("Invalid marker. Image {m} could not be found."))
            })? + 1
        }
    };
    let rest = rows.len().saturating_sub(start);
    let take = rest.min(q.limit);
    let images = rows
        .into_iter()
        .skip(start)
        .take(take)
        .map(|(_, r)| r)
        .collect();
    Ok(Page {
        images,
        more: rest > take,
    })
}

impl crate::Registry {
    /// One page of the images `q` selects.
    pub fn list(&self, q: &ListQuery) -> Result<Page> {
        select(self.all()?, q)
    }
}
