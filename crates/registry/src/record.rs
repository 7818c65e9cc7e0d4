//! One image's record: Glance v2's image attributes, stored as one JSON file
//! and shown by the API in the same shape (custom properties flattened beside
//! the core ones).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// An image's life: `queued` (no data), `saving` (data streaming in),
/// `active` (data stored and checksummed), `killed` (an upload failed in a way
/// that left the image unusable), `deleted` (never stored: a deleted image's
/// record is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Saving,
    Active,
    Killed,
    Deleted,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Saving => "saving",
            Status::Active => "active",
            Status::Killed => "killed",
            Status::Deleted => "deleted",
        }
    }
}

/// Who may see an image (strata has one project, so this is a label that
/// lists filter on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    Public,
    Private,
    Shared,
    Community,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Private => "private",
            Visibility::Shared => "shared",
            Visibility::Community => "community",
        }
    }

    pub fn parse(s: &str) -> Result<Visibility> {
        Ok(match s {
            "public" => Visibility::Public,
            "private" => Visibility::Private,
            "shared" => Visibility::Shared,
            "community" => Visibility::Community,
            _ => return Err(Error::Invalid(format!("Invalid visibility value: {s}"))),
        })
    }
}

/// The disk formats Glance accepts.
pub const DISK_FORMATS: &[&str] = &[
    "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop",
];
/// The container formats Glance accepts.
pub const CONTAINER_FORMATS: &[&str] = &[
    "ami",
    "ari",
    "aki",
    "bare",
    "ovf",
    "ova",
    "docker",
    "compressed",
];

/// The attributes a client may set (at creation or by a patch).
pub const WRITABLE: &[&str] = &[
    "name",
    "visibility",
    "protected",
    "os_hidden",
    "tags",
    "disk_format",
    "container_format",
    "min_disk",
    "min_ram",
];

/// The attributes only the registry sets.
pub const READ_ONLY: &[&str] = &[
    "id",
    "status",
    "size",
    "virtual_size",
    "checksum",
    "os_hash_algo",
    "os_hash_value",
    "owner",
    "created_at",
    "updated_at",
    "self",
    "file",
    "schema",
    "direct_url",
    "locations",
    "stores",
];

/// The hash algorithm of `os_hash_value`.
pub const HASH_ALGO: &str = "sha512";

/// Longest name, tag or custom property value (Glance's column limit).
pub const MAX_TEXT: usize = 255;
/// Most tags or custom properties on one image.
pub const MAX_ITEMS: usize = 128;

/// One image. Serialised as the stored record and, with its links added, as
/// the API's image object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: String,
    pub name: Option<String>,
    pub status: Status,
    pub visibility: Visibility,
    pub protected: bool,
    pub os_hidden: bool,
    pub tags: Vec<String>,
    pub disk_format: Option<String>,
    pub container_format: Option<String>,
    pub size: Option<u64>,
    pub virtual_size: Option<u64>,
    pub checksum: Option<String>,
    pub os_hash_algo: Option<String>,
    pub os_hash_value: Option<String>,
    pub min_disk: u64,
    pub min_ram: u64,
    pub owner: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// Custom properties: string values only, as in Glance's schema.
    #[serde(flatten)]
    pub properties: BTreeMap<String, Value>,
}

impl ImageRecord {
    /// A fresh `queued` record with Glance's defaults.
    pub fn new(id: String, now: String) -> ImageRecord {
        ImageRecord {
            id,
            name: None,
            status: Status::Queued,
            visibility: Visibility::Shared,
            protected: false,
            os_hidden: false,
            tags: Vec::new(),
            disk_format: None,
            container_format: None,
            size: None,
            virtual_size: None,
            checksum: None,
            os_hash_algo: None,
            os_hash_value: None,
            min_disk: 0,
            min_ram: 0,
            owner: None,
            created_at: now.clone(),
            updated_at: now,
            properties: BTreeMap::new(),
        }
    }

    /// The record as a JSON object (core attributes and custom properties).
    pub fn to_json(&self) -> serde_json::Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        }
    }

    /// Set one writable attribute from a JSON value, checking its type and
    /// range; a custom property when `key` is not a core attribute.
    pub fn set(&mut self, key: &str, value: &Value) -> Result<()> {
        if READ_ONLY.contains(&key) {
            return Err(Error::Forbidden(format!("Attribute '{key}' is read-only.")));
        }
        let invalid = |want: &str| {
            Error::Invalid(format!(
                "Provided object does not match schema 'image': {value} is not of type {want} for '{key}'"
            ))
        };
        match key {
            "name" => {
                self.name = match value {
                    Value::Null => None,
                    Value::String(s) => Some(check_text(key, s)?.to_string()),
                    _ => return Err(invalid("'null', 'string'")),
                }
            }
            "visibility" => {
                self.visibility =
                    Visibility::parse(value.as_str().ok_or_else(|| invalid("'string'"))?)?
            }
            "protected" => self.protected = value.as_bool().ok_or_else(|| invalid("'boolean'"))?,
            "os_hidden" => self.os_hidden = value.as_bool().ok_or_else(|| invalid("'boolean'"))?,
            "tags" => {
                let arr = value.as_array().ok_or_else(|| invalid("'array'"))?;
                let mut tags: Vec<String> = Vec::new();
                for t in arr {
                    let t = t.as_str().ok_or_else(|| invalid("'array' of 'string'"))?;
                    check_tag(t)?;
                    if !tags.iter().any(|x| x == t) {
                        tags.push(t.to_string());
                    }
                }
                if tags.len() > MAX_ITEMS {
                    return Err(Error::TooLarge(format!(
                        "Maximum number of tags ({MAX_ITEMS}) exceeded"
                    )));
                }
                self.tags = tags;
            }
            "disk_format" | "container_format" => {
                if self.status != Status::Queued {
                    return Err(Error::Forbidden(format!(
                        "Attribute {key} can be only replaced for a queued image."
                    )));
                }
                let v = match value {
                    Value::Null => None,
                    Value::String(s) => {
                        let allowed = if key == "disk_format" {
                            DISK_FORMATS
                        } else {
                            CONTAINER_FORMATS
                        };
                        if !allowed.contains(&s.as_str()) {
                            return Err(Error::Invalid(format!(
                                "Invalid value '{s}' for {key}: expected one of {}",
                                allowed.join(", ")
                            )));
                        }
                        Some(s.clone())
                    }
                    _ => return Err(invalid("'null', 'string'")),
                };
                if key == "disk_format" {
                    self.disk_format = v;
                } else {
                    self.container_format = v;
                }
            }
            "min_disk" | "min_ram" => {
                if !value.is_i64() && !value.is_u64() {
                    return Err(invalid("'integer'"));
                }
                let v = value
                    .as_u64()
                    .filter(|v| *v <= i32::MAX as u64)
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "Provided object does not match schema 'image': {value} is out of range for '{key}' (0 to 2147483647)"
                        ))
                    })?;
                if key == "min_disk" {
                    self.min_disk = v;
                } else {
                    self.min_ram = v;
                }
            }
            _ => {
                check_property_name(key)?;
                let s = value.as_str().ok_or_else(|| invalid("'string'"))?;
                check_text(key, s)?;
                if !self.properties.contains_key(key) && self.properties.len() >= MAX_ITEMS {
                    return Err(Error::TooLarge(format!(
                        "Maximum number of properties ({MAX_ITEMS}) exceeded"
                    )));
                }
                self.properties
                    .insert(key.to_string(), Value::String(s.to_string()));
            }
        }
        Ok(())
    }

    /// Whether `key` currently has a value (core attributes always do).
    pub fn has(&self, key: &str) -> bool {
        WRITABLE.contains(&key) || READ_ONLY.contains(&key) || self.properties.contains_key(key)
    }

    /// Remove a custom property; core attributes cannot be removed.
    pub fn remove(&mut self, key: &str) -> Result<()> {
        if WRITABLE.contains(&key) || READ_ONLY.contains(&key) {
            return Err(Error::Forbidden(format!(
                "Properties {key} are reserved and cannot be removed."
            )));
        }
        match self.properties.remove(key) {
            Some(_) => Ok(()),
            None => Err(Error::Conflict(format!("Property {key} does not exist."))),
        }
    }
}

fn check_text<'a>(key: &str, s: &'a str) -> Result<&'a str> {
    if s.chars().count() > MAX_TEXT {
        return Err(Error::Invalid(format!(
            "'{key}' is too long: at most {MAX_TEXT} characters"
        )));
    }
    if s.chars().any(|c| c.is_control()) {
        return Err(Error::Invalid(format!(
            "'{key}' must not contain control characters"
        )));
    }
    Ok(s)
}

/// Check a tag: 1 to 255 characters, no control characters, no `/` (a tag is
/// a path segment of the tags API).
pub fn check_tag(t: &str) -> Result<()> {
    check_text("tag", t)?;
    if t.is_empty() || t.contains('/') {
        return Err(Error::Invalid(format!("Invalid tag '{t}'")));
    }
    Ok(())
}

fn check_property_name(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= MAX_TEXT
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "Invalid property name '{key}': use letters, digits, '_', '-', '.' or ':'"
        )))
    }
}

/// Check an image ID: a UUID in its canonical lower-case form. Anything else
/// (`..`, `/`, other text) names no image, so it never reaches a path.
pub fn is_valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
}

/// A new random (version 4) UUID.
pub fn new_id() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b)
        .map_err(|e| Error::io("read random bytes", std::io::Error::other(e.to_string())))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The current time as Glance shows it (`2026-01-02T03:04:05Z`).
pub fn now() -> String {
    strata_repo::time::Timestamp::now()
        .display()
        .replacen(' ', "T", 1)
        + "Z"
}

/// The current time with nanoseconds (`2026-01-02T03:04:05.123456789Z`), for
/// records that must order within a second.
pub fn now_precise() -> String {
    strata_repo::time::Timestamp::now().rfc3339()
}
