//! Listing: Glance's filters, sort keys and marker paging, as a pure function
//! of the records and the query.

use std::cmp::Ordering;
use std::sync::Arc;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::filter::Condition;
use crate::index::Row;
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
    /// The other filters: sizes, `in:` lists, time comparisons.
    pub conditions: Vec<Condition>,
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
    /// (repeatable), the filters of [`Condition::parse`], and any other
    /// parameter (`owner` too: no image here has one, so asking for an
    /// owner's images lists none) as an equality filter.
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
                // Membership of shared images: this registry has no members,
                // so every status selects the images it would list anyway.
                "member_status" => {}
                _ => match Condition::parse(k, v)? {
                    Some(c) => q.conditions.push(c),
                    None => q.filters.push((k.clone(), v.clone())),
                },
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

/// Whether an attribute's value, shown as text, is `want` (an absent or null
/// value matches nothing).
fn matches(v: Option<&Value>, want: &str) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => s == want,
        Some(other) => {
            // A number or boolean, as the query would spell it.
            let shown = other.to_string();
            shown == want
        }
    }
}

/// A sort key's value in one record, ordered as the key's JSON value would
/// be: absent (null) first, then numbers by value or text by bytes.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key<'a> {
    Null,
    Num(u64),
    Text(&'a str),
}

type Getter = fn(&ImageRecord) -> Key<'_>;

fn opt_text(v: &Option<String>) -> Key<'_> {
    v.as_deref().map_or(Key::Null, Key::Text)
}

fn opt_num(v: Option<u64>) -> Key<'static> {
    v.map_or(Key::Null, Key::Num)
}

/// How to read sort key `k` (one of [`SORT_KEYS`]) from a record.
fn getter(k: &str) -> Getter {
    match k {
        "name" => |r| opt_text(&r.name),
        "status" => |r| Key::Text(r.status.as_str()),
        "container_format" => |r| opt_text(&r.container_format),
        "disk_format" => |r| opt_text(&r.disk_format),
        "size" => |r| opt_num(r.size),
        "virtual_size" => |r| opt_num(r.virtual_size),
        "created_at" => |r| Key::Text(&r.created_at),
        "updated_at" => |r| Key::Text(&r.updated_at),
        "visibility" => |r| Key::Text(r.visibility.as_str()),
        "min_disk" => |r| Key::Num(r.min_disk),
        "min_ram" => |r| Key::Num(r.min_ram),
        "id" => |r| Key::Text(&r.id),
        // Parsing refuses other keys; one would sort as absent everywhere.
        _ => |_| Key::Null,
    }
}

/// Select, order and page `all` by `q`. Hidden images are left out unless the
/// query filters on `os_hidden`. A marker that names no listed image is an error.
pub fn select(all: Vec<ImageRecord>, q: &ListQuery) -> Result<Page> {
    let rows: Vec<Arc<Row>> = all.into_iter().map(|r| Arc::new(Row::new(r))).collect();
    select_rows(&rows, q)
}

/// [`select`] over indexed rows: only the records of the page are copied.
pub fn select_rows(rows: &[Arc<Row>], q: &ListQuery) -> Result<Page> {
    let show_hidden = q.filters.iter().any(|(k, _)| k == "os_hidden");
    let mut sort = q.sort.clone();
    if sort.is_empty() {
        sort.push(("created_at".into(), false));
    }
    let last_dir = sort.last().map(|s| s.1).unwrap_or(false);
    if !sort.iter().any(|(k, _)| k == "id") {
        sort.push(("id".into(), last_dir));
    }
    let sort: Vec<(Getter, bool)> = sort.iter().map(|(k, a)| (getter(k), *a)).collect();
    let mut keyed: Vec<&Row> = rows
        .iter()
        .map(|r| &**r)
        .filter(|r| show_hidden || !r.rec.os_hidden)
        .filter(|r| q.tags.iter().all(|t| r.rec.tags.contains(t)))
        .filter(|r| q.filters.iter().all(|(k, v)| matches(r.json.get(k), v)))
        .filter(|r| q.conditions.iter().all(|c| c.holds(&r.rec, &r.json)))
        .collect();
    let order = |a: &&Row, b: &&Row| {
        for (get, asc) in &sort {
            let o = get(&a.rec).cmp(&get(&b.rec));
            let o = if *asc { o } else { o.reverse() };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    };
    // The order is total (the ID decides last), so the page is the `limit`
    // rows after the marker: picked in linear time, then only they are sorted.
    if let Some(m) = &q.marker {
        let at = keyed.iter().position(|r| &r.rec.id == m).ok_or_else(|| {
            Error::Invalid(format!("Invalid marker. Image {m} could not be found."))
        })?;
        let mark = keyed.swap_remove(at);
        keyed.retain(|r| order(r, &mark) == Ordering::Greater);
    }
    let rest = keyed.len();
    let take = rest.min(q.limit);
    if take > 0 && take < rest {
        keyed.select_nth_unstable_by(take - 1, order);
    }
    keyed.truncate(take);
    keyed.sort_unstable_by(order);
    let images = keyed.iter().map(|r| r.rec.clone()).collect();
    Ok(Page {
        images,
        more: rest > take,
    })
}

impl crate::Registry {
    /// One page of the images `q` selects.
    pub fn list(&self, q: &ListQuery) -> Result<Page> {
        select_rows(&self.rows()?, q)
    }
}
