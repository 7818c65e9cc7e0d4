//! The JSON schemas Glance clients fetch (`/v2/schemas/image`, `/images`):
//! glanceclient builds its command-line options and its patches from them and
//! validates every image it receives against them.

use serde_json::{json, Value};
use strata_registry::record::{CONTAINER_FORMATS, DISK_FORMATS};

fn nullable_enum(values: &[&str]) -> Value {
    let mut v: Vec<Value> = values.iter().map(|s| json!(s)).collect();
    v.push(Value::Null);
    Value::Array(v)
}

/// The image schema: core attributes (read-only ones marked), custom
/// properties as strings.
pub fn image() -> Value {
    let ro_str = |d: &str| json!({"type": ["null", "string"], "readOnly": true, "description": d});
    json!({
        "name": "image",
        "additionalProperties": {"type": "string"},
        "links": [
            {"href": "{self}", "rel": "self"},
            {"href": "{file}", "rel": "enclosure"},
            {"href": "{schema}", "rel": "describedby"}
        ],
        "properties": {
            "id": {"type": "string", "description": "An identifier for the image", "pattern": "^([0-9a-fA-F]){8}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){12}$"},
            "name": {"type": ["null", "string"], "maxLength": 255, "description": "Descriptive name for the image"},
            "status": {"type": "string", "readOnly": true, "description": "Status of the image",
                       "enum": ["queued", "saving", "active", "killed", "deleted", "uploading", "importing", "pending_delete", "deactivated"]},
            "visibility": {"type": "string", "enum": ["community", "public", "private", "shared"], "description": "Scope of image accessibility"},
            "protected": {"type": "boolean", "description": "If true, image will not be deletable."},
            "os_hidden": {"type": "boolean", "description": "If true, image will not appear in default image list response."},
            "checksum": ro_str("md5 hash of image contents."),
            "os_hash_algo": ro_str("Algorithm to calculate the os_hash_value"),
            "os_hash_value": ro_str("Hexdigest of the image contents using the algorithm in os_hash_algo."),
            "owner": ro_str("Owner of the image"),
            "size": {"type": ["null", "integer"], "readOnly": true, "description": "Size of image file in bytes"},
            "virtual_size": {"type": ["null", "integer"], "readOnly": true, "description": "Virtual size of image in bytes"},
            "container_format": {"type": ["null", "string"], "enum": nullable_enum(CONTAINER_FORMATS), "description": "Format of the container"},
            "disk_format": {"type": ["null", "string"], "enum": nullable_enum(DISK_FORMATS), "description": "Format of the disk"},
            "created_at": {"type": "string", "readOnly": true, "description": "Date and time of image registration"},
            "updated_at": {"type": "string", "readOnly": true, "description": "Date and time of the last image modification"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 255}, "description": "List of strings related to the image"},
            "min_ram": {"type": "integer", "description": "Amount of ram (in MB) required to boot image."},
            "min_disk": {"type": "integer", "description": "Amount of disk space (in GB) required to boot image."},
            "self": {"type": "string", "readOnly": true, "description": "An image self url"},
            "file": {"type": "string", "readOnly": true, "description": "An image file url"},
            "schema": {"type": "string", "readOnly": true, "description": "An image schema url"},
            "stores": {"type": "string", "readOnly": true, "description": "Store in which image data resides."},
            "locations": {"type": "array", "readOnly": true, "items": {"type": "object"}, "description": "A set of URLs to access the image file kept in external store"}
        }
    })
}

/// The image list schema.
pub fn images() -> Value {
    json!({
        "name": "images",
        "properties": {
            "images": {"type": "array", "items": image()},
            "schema": {"type": "string"},
            "first": {"type": "string"},
            "next": {"type": "string"}
        },
        "links": [
            {"href": "{first}", "rel": "first"},
            {"href": "{next}", "rel": "next"},
            {"href": "{schema}", "rel": "describedby"}
        ]
    })
}
