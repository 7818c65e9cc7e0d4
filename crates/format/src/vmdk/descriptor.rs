//! The text descriptor: what QEMU reads from it (create type, CIDs, the
//! parent hint, extent lines) with QEMU's lenient matching, and the text
//! `qemu-img create` writes.

use crate::{Error, Result};

/// The largest descriptor QEMU reads for the CID and the parent hint (20 sectors).
pub const DESC_SIZE: usize = 20 * 512;

/// The text up to its first NUL (QEMU handles the descriptor as a C string).
pub fn c_str(buf: &[u8]) -> &[u8] {
    match buf.iter().position(|&b| b == 0) {
        Some(n) => &buf[..n],
        None => buf,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The value of `name="value"`: the text two bytes after the first
/// occurrence of `name`, up to the next double quote (QEMU's lookup, which
/// neither checks the `="` nor the line).
pub fn quoted_value(desc: &[u8], name: &str) -> Option<String> {
    let at = find(desc, name.as_bytes())? + name.len() + 2;
    if at >= desc.len() {
        return None;
    }
    let len = desc[at..].iter().position(|&b| b == b'"')?;
    Some(String::from_utf8_lossy(&desc[at..at + len]).into_owned())
}

/// The descriptor's CID (`parent`: its parentCID): the hexadecimal number
/// after the first occurrence of `CID=` (`parentCID=`), as QEMU reads it.
pub fn cid(desc: &[u8], parent: bool) -> Result<u32> {
    let name: &[u8] = if parent { b"parentCID" } else { b"CID" };
    let bad = || Error::invalid("Invalid argument");
    let at = find(desc, name).ok_or_else(bad)? + name.len() + 1;
    let mut s = desc.get(at..).ok_or_else(bad)?;
    while let [c, rest @ ..] = s {
        if c.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    let mut neg = false;
    if let [c @ (b'+' | b'-'), rest @ ..] = s {
        neg = *c == b'-';
        s = rest;
    }
    if let [b'0', b'x' | b'X', rest @ ..] = s {
        if rest.first().is_some_and(u8::is_ascii_hexdigit) {
            s = rest;
        }
    }
    let digits = s.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(bad());
    }
    // scanf's %x: the value wraps to 32 bits (saturating on overflow of a long).
    let mut v: u64 = 0;
    for &d in &s[..digits] {
        let n = u64::from(char::from(d).to_digit(16).unwrap_or(0));
        v = v.saturating_mul(16).saturating_add(n);
    }
    let v = if neg { v.wrapping_neg() } else { v };
    #[allow(clippy::cast_possible_truncation)] // scanf stores the low 32 bits
    Ok(v as u32)
}

/// The parent file name of `parentFileNameHint="..."`, if the descriptor has one.
pub fn parent_hint(desc: &[u8]) -> Result<Option<String>> {
    let name = b"parentFileNameHint";
    let Some(at) = find(desc, name) else {
        return Ok(None);
    };
    let start = at + name.len() + 2;
    let rest = desc.get(start..).unwrap_or(&[]);
    match rest.iter().position(|&b| b == b'"') {
        Some(n) if n <= 4095 => Ok(Some(String::from_utf8_lossy(&rest[..n]).into_owned())),
        _ => Err(Error::invalid("Invalid argument")),
    }
}

/// One extent line of a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Size in sectors.
    pub sectors: u64,
    /// FLAT, SPARSE, VMFS, VMFSSPARSE, SESPARSE.
    pub kind: String,
    pub file: String,
    /// FLAT: the sector in the file where the extent starts.
    pub offset: u64,
}

/// A reader of text with scanf's conversions, for the extent lines.
struct Scan<'a> {
    s: &'a [u8],
}

impl<'a> Scan<'a> {
    fn skip_ws(&mut self) {
        while let [c, rest @ ..] = self.s {
            if matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
                self.s = rest;
            } else {
                break;
            }
        }
    }
    /// `%Ns`
    fn word(&mut self, max: usize) -> Option<&'a [u8]> {
        self.skip_ws();
        let n = self
            .s
            .iter()
            .take(max)
            .take_while(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
            .count();
        if n == 0 {
            return None;
        }
        let (w, rest) = self.s.split_at(n);
        self.s = rest;
        Some(w)
    }
    /// `%ld`
    fn int(&mut self) -> Option<i64> {
        self.skip_ws();
        let mut i = 0;
        let neg = matches!(self.s.first(), Some(b'-'));
        if matches!(self.s.first(), Some(b'-' | b'+')) {
            i = 1;
        }
        let digits = self.s[i..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 {
            return None;
        }
        let mut v: i64 = 0;
        for &d in &self.s[i..i + digits] {
            v = v.saturating_mul(10).saturating_add(i64::from(d - b'0'));
        }
        self.s = &self.s[i + digits..];
        Some(if neg { v.saturating_neg() } else { v })
    }
    fn lit(&mut self, c: u8) -> bool {
        match self.s {
            [x, rest @ ..] if *x == c => {
                self.s = rest;
                true
            }
            _ => false,
        }
    }
}

/// The extent lines QEMU takes from `desc`: lines whose access is RW and
/// whose type it knows (others are skipped as QEMU skips them); a FLAT line
/// without its offset, or a line with an offset it does not expect, is
/// "Invalid extent line".
pub fn extents(desc: &[u8]) -> Result<Vec<ExtentLine>> {
    let mut out = Vec::new();
    let mut p = 0usize;
    while p < desc.len() {
        let line_end = desc[p..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(desc.len(), |n| p + n + 1);
        let mut sc = Scan { s: &desc[p..] };
        let mut matches = 0;
        let (mut access, mut sectors, mut kind, mut file, mut offset) =
            (&b""[..], 0i64, &b""[..], &b""[..], -1i64);
        'scan: {
            let Some(a) = sc.word(10) else { break 'scan };
            access = a;
            matches += 1;
            let Some(n) = sc.int() else { break 'scan };
            sectors = n;
            matches += 1;
            let Some(t) = sc.word(10) else { break 'scan };
            kind = t;
            matches += 1;
            sc.skip_ws();
            if !sc.lit(b'"') {
                break 'scan;
            }
            let n =
                sc.s.iter()
                    .take(511)
                    .take_while(|c| !matches!(c, b'\n' | b'\r' | b'"'))
                    .count();
            if n == 0 {
                break 'scan;
            }
            file = &sc.s[..n];
            sc.s = &sc.s[n..];
            matches += 1;
            if !sc.lit(b'"') {
                break 'scan;
            }
            if let Some(o) = sc.int() {
                offset = o;
                matches += 1;
            }
        }
        let line = p;
        p = line_end;
        if matches < 4 || access != b"RW" {
            continue;
        }
        let invalid = || {
            let mut l = &desc[line..line_end];
            if l.last() == Some(&b'\n') {
                l = &l[..l.len() - 1];
            }
            Error::invalid(format!(
                "Invalid extent line: {}",
                String::from_utf8_lossy(l)
            ))
        };
        let valid = match kind {
            b"FLAT" => matches == 5 && offset >= 0,
            b"VMFS" => {
                offset = 0;
                matches == 4
            }
            _ => matches == 4,
        };
        if !valid {
            return Err(invalid());
        }
        if sectors <= 0
            || !matches!(
                kind,
                b"FLAT" | b"SPARSE" | b"VMFS" | b"VMFSSPARSE" | b"SESPARSE"
            )
        {
            continue;
        }
        out.push(ExtentLine {
            sectors: sectors.unsigned_abs(),
            kind: String::from_utf8_lossy(kind).into_owned(),
            file: String::from_utf8_lossy(file).into_owned(),
            offset: offset.max(0).unsigned_abs(),
        });
    }
    Ok(out)
}

/// The descriptor text with its CID replaced by `cid`: the text up to the
/// first `CID=`, the new value and a newline, then the text from the first
/// `parentCID` on (QEMU's rewrite). `None` when there is no `parentCID`.
pub fn with_cid(desc: &[u8], cid: u32) -> Option<Vec<u8>> {
    let parent = find(desc, b"parentCID")?;
    let tail = desc[parent..].to_vec();
    let at = find(desc, b"CID")? + 4;
    let mut out = desc[..at.min(desc.len())].to_vec();
    out.extend_from_slice(format!("{cid:x}\n").as_bytes());
    out.extend_from_slice(&tail);
    Some(out)
}

/// What the descriptor of a new image says.
pub struct NewDescriptor<'a> {
    pub cid: u32,
    pub parent_cid: u32,
    pub create_type: &'a str,
    /// `parentFileNameHint`, when the image has a backing file.
    pub parent: Option<&'a str>,
    /// The extent lines, each ending in a newline.
    pub extent_lines: &'a str,
    pub hw_version: &'a str,
    pub size: u64,
    pub adapter_type: &'a str,
    pub tools_version: &'a str,
}

impl NewDescriptor<'_> {
    /// The descriptor text, laid out as `qemu-img create` writes it.
    pub fn render(&self) -> String {
        // VMware's geometry for non-IDE adapters uses 255 heads.
        let heads: u64 = if self.adapter_type == "ide" { 16 } else { 255 };
        let cylinders = self.size / (63 * heads * 512);
        let parent = match self.parent {
            Some(p) => format!("parentFileNameHint=\"{p}\""),
            None => String::new(),
        };
        format!(
            "# Disk DescriptorFile\nversion=1\nCID={:x}\nparentCID={:x}\ncreateType=\"{}\"\n{}\n\
             # Extent description\n{}\n# The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"{}\"\nddb.geometry.cylinders = \"{}\"\n\
             ddb.geometry.heads = \"{}\"\nddb.geometry.sectors = \"63\"\n\
             ddb.adapterType = \"{}\"\nddb.toolsVersion = \"{}\"\n",
            self.cid,
            self.parent_cid,
            self.create_type,
            parent,
            self.extent_lines,
            self.hw_version,
            cylinders,
            heads,
            self.adapter_type,
            self.tools_version
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_qemu_descriptor() {
        let d = b"# Disk DescriptorFile\nversion=1\nCID=1bd4c74c\nparentCID=ffffffff\n\
createType=\"twoGbMaxExtentFlat\"\n\n# Extent description\nRW 8192 FLAT \"a-f001.vmdk\" 0\n\
RDONLY 8 FLAT \"x\" 0\nRW 16 SPARSE \"b.vmdk\"\n";
        assert_eq!(cid(d, false).unwrap(), 0x1bd4c74c);
        assert_eq!(cid(d, true).unwrap(), 0xffffffff);
        assert_eq!(
            quoted_value(d, "createType").as_deref(),
            Some("twoGbMaxExtentFlat")
        );
        let e = extents(d).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].file, "a-f001.vmdk");
        assert_eq!(e[1].kind, "SPARSE");
        assert!(extents(b"RW 8 FLAT \"x\"\n").is_err());
        let n = with_cid(d, 0xabc).unwrap();
        assert_eq!(cid(&n, false).unwrap(), 0xabc);
        assert_eq!(cid(&n, true).unwrap(), 0xffffffff);
    }
}
