//! What of a `-o help` option listing must match qemu-img's: its layout. The
//! descriptions after " - " are strata's own words, so only the header lines,
//! the option names with their types, the padding and the order are compared.

/// A listing reduced to its layout: option lines (indented) cut before their
/// " - ", other lines whole; `None` when an option line has no description.
pub fn layout(stdout: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for line in stdout.split_inclusive('\n') {
        if line.starts_with("  ") {
            let (head, desc) = line.split_once(" - ")?;
            if desc.trim().is_empty() {
                return None;
            }
            out.push(format!("{head} - ..."));
        } else {
            out.push(line.to_string());
        }
    }
    Some(out)
}
