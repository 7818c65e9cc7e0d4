//! Helpers for tests of `luks` images: names that carry the secret, and the
//! masking of the header fields that are random in every new image.

/// The `--object` of the secret the test images open with (id `s0`).
pub const SECRET: &str = "secret,id=s0,data=Pa55";

/// The `json:` name of the `luks` image `file` opened with secret `s0`.
pub fn json_name(file: &str) -> String {
    format!(
        r#"json:{{"driver":"luks","key-secret":"s0","file":{{"driver":"file","filename":"{file}"}}}}"#
    )
}

/// The `--image-opts` name of the `luks` image `file` opened with secret `s0`.
pub fn opts_name(file: &str) -> String {
    format!("driver=luks,key-secret=s0,file.filename={file}")
}

/// `text` (an `info`, human or JSON) with the header fields a new LUKS header
/// draws at random or measures on the machine (UUID, PBKDF2 iteration counts)
/// replaced by `*`, so two images made alike compare equal.
pub fn mask_random(text: &str) -> String {
    // The disk usage too: QEMU punches holes where strata may leave zeroes.
    const RANDOM: [&str; 5] = ["uuid", "iters", "actual-size", "disk size", "salt"];
    text.lines()
        .map(|l| match l.find(':') {
            Some(i) if RANDOM.iter().any(|k| l[..i].contains(k)) => format!("{}: *", &l[..i]),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
