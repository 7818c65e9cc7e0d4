//! Comparing the tools where qemu-img's messages name a node it opened by a
//! generated `#blockNRR` (the node's number, then two random digits each
//! run): the random digits are blinded before the outputs are compared, the
//! number is not; everything else must be the same.

use super::{differs, outcome, sh};
use std::path::Path;

/// `s` with the name after the first `key` (up to the next `'` or `:`)
/// blinded; `key` ends where the name starts, e.g. `node '` or `bitmaps to `.
/// A name QEMU makes up (`#block`, the node's number in the order nodes were
/// opened, two random digits) keeps its number: `#block<number>RR`. Any other
/// (a name the options gave, or strata's file name) becomes `NODE`.
pub fn blind(s: &str, key: &str) -> String {
    match s.find(key) {
        Some(i) => {
            let rest = &s[i + key.len()..];
            let end = rest.find(['\'', ':']).unwrap_or(rest.len());
            let name = &rest[..end];
            let shown = match name.strip_prefix("#block") {
                Some(digits) => {
                    assert!(
                        digits.len() >= 3 && digits.bytes().all(|b| b.is_ascii_digit()),
                        "not a generated node name: {name:?} in {s:?}"
                    );
                    format!("#block{}RR", &digits[..digits.len() - 2])
                }
                None => "NODE".to_string(),
            };
            format!("{}{key}{shown}{}", &s[..i], &rest[end..])
        }
        None => s.to_string(),
    }
}

/// Run `steps` (space-separated arguments) with both tools, each in its own
/// directory under `root` named after `n` that `setup` (bash) prepared; what
/// they print must be the same but for the node named after `key` in stderr
/// ([`blind`]), and every file qemu-img's side holds at the end the same
/// bytes on strata's side.
pub fn same_but_node(root: &Path, n: &str, setup: &str, steps: &[&str], key: &str) {
    let dirs = [root.join(format!("{n}-o")), root.join(format!("{n}-t"))];
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
        sh(d, "bash", &["-ec", setup]);
    }
    for step in steps {
        let args: Vec<&str> = step.split(' ').collect();
        let (c_o, o_o, e_o) = outcome(&dirs[0], "strata", &args);
        let (c_t, o_t, e_t) = outcome(&dirs[1], "qemu-img", &args);
        let ours = (c_o, o_o, blind(&e_o, key));
        let theirs = (c_t, o_t, blind(&e_t, key));
        if ours != theirs {
            differs(format!(
                "[{n}] `img {step}`\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
            ));
        }
    }
    for e in std::fs::read_dir(&dirs[1]).unwrap() {
        let f = e.unwrap().file_name();
        let read = |d: &Path| std::fs::read(d.join(&f)).ok();
        if read(&dirs[0]) != read(&dirs[1]) {
            differs(format!("[{n}] {steps:?}: {f:?} differs"));
        }
    }
}
