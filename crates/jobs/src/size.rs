//! Sizes written as QEMU reads them (`qemu_strtosz`): a decimal number, or a
//! hexadecimal one after `0x`, with an optional suffix k, M, G, T, P or E
//! (powers of 1024, either case) or b/B (bytes). Leading white space and a `+`
//! are allowed, nothing may follow. A decimal fraction ("1.5G", ".5M", "5.M")
//! needs a suffix other than bytes unless it is zero; the bytes it names are
//! rounded down. Hexadecimal numbers take no fraction and no suffix (b, B, e
//! and E are hexadecimal digits there).

/// Why a string is not a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size at all.
    Invalid,
    /// A well-formed size that is negative or does not fit in 64 bits.
    OutOfRange,
}

fn multiplier(c: Option<u8>) -> Option<u64> {
    Some(match c? {
        b'b' | b'B' => 1,
        b'k' | b'K' => 1 << 10,
        b'm' | b'M' => 1 << 20,
        b'g' | b'G' => 1 << 30,
        b't' | b'T' => 1 << 40,
        b'p' | b'P' => 1 << 50,
        b'e' | b'E' => 1 << 60,
        _ => return None,
    })
}

/// Digits of `radix` from `at`: their value (`None` past 64 bits) and where they end.
fn digits(b: &[u8], at: usize, radix: u32) -> (Option<u64>, usize) {
    let mut v = Some(0u64);
    let mut i = at;
    while let Some(d) = b.get(i).and_then(|&c| (c as char).to_digit(radix)) {
        v = v
            .and_then(|v| v.checked_mul(u64::from(radix)))
            .and_then(|v| v.checked_add(u64::from(d)));
        i += 1;
    }
    (v, i)
}

/// A fraction `.DDD` at `at` (no exponent): its value and where it ends.
fn fraction(b: &[u8], at: usize) -> Option<(f64, usize)> {
    let (_, end) = digits(b, at + 1, 10);
    if b.get(at) != Some(&b'.') || end == at + 1 {
        return None;
    }
    let text = std::str::from_utf8(&b[at..end]).ok()?;
    Some((format!("0{text}").parse().ok()?, end))
}

/// Parse `s` as QEMU parses a size (see the module); any value below 2^64.
pub fn parse(s: &str) -> Result<u64, SizeError> {
    let b = s.as_bytes();
    let mut i = b
        .iter()
        .position(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r'))
        .unwrap_or(b.len());
    let negative = b.get(i) == Some(&b'-');
    if matches!(b.get(i), Some(b'+' | b'-')) {
        i += 1;
    }
    let (int, end) = digits(b, i, 10);
    let has_int = end > i;
    // Whatever the number, trailing text makes it no size at all.
    let finish = |r: Result<u64, SizeError>, end: usize| {
        if end < b.len() {
            Err(SizeError::Invalid)
        } else {
            r
        }
    };
    if has_int && (negative || int.is_none()) {
        return finish(Err(SizeError::OutOfRange), end);
    }
    let mut val = int.unwrap_or(0);
    let mut at = end;
    let mut frac = 0f64;
    if has_int && val == 0 && matches!(b.get(end), Some(b'x' | b'X')) {
        // Read again in base 16: only a lone 0 before the x makes a prefix.
        if end != i + 1 {
            return Err(SizeError::Invalid);
        }
        let (hex, hend) = digits(b, end + 1, 16);
        if hend == end + 1 {
            return Err(SizeError::Invalid);
        }
        let Some(hex) = hex else {
            return finish(Err(SizeError::OutOfRange), hend);
        };
        if b.get(hend) == Some(&b'.') || multiplier(b.get(hend).copied()).is_some() {
            return Err(SizeError::Invalid);
        }
        return finish(Ok(hex), hend);
    }
    if b.get(at) == Some(&b'.') || (!has_int && s.contains('.')) {
        if has_int && !b.get(at + 1).is_some_and(u8::is_ascii_digit) {
            at += 1;
        } else {
            if negative {
                return Err(SizeError::Invalid);
            }
            let Some((f, fend)) = fraction(b, at) else {
                return Err(SizeError::Invalid);
            };
            frac = f;
            at = fend;
        }
    } else if !has_int {
        return Err(SizeError::Invalid);
    }
    let mul = match multiplier(b.get(at).copied()) {
        Some(m) => {
            at += 1;
            m
        }
        None => 1,
    };
    if mul == 1 && frac != 0.0 {
        return Err(SizeError::Invalid);
    }
    if mul > 1 {
        let whole = val.checked_mul(mul);
        // The fraction's bytes, rounded down; a fraction that rounds to 1 is a whole unit.
        let part = (frac * mul as f64) as u64;
        match whole.and_then(|w| w.checked_add(part)) {
            Some(v) => val = v,
            None => return finish(Err(SizeError::OutOfRange), at),
        }
    }
    finish(Ok(val), at)
}

#[cfg(test)]
mod tests {
    use super::{parse, SizeError::*};

    #[test]
    fn sizes_parse_as_qemu_parses_them() {
        for (s, want) in [
            ("0x10000", Ok(65536)),
            ("0X10", Ok(16)),
            ("0x10000b", Ok(0x10000b)),
            (" +0x10", Ok(16)),
            ("1.5G", Ok(3 << 29)),
            ("1.3k", Ok(1331)),
            ("5.M", Ok(5 << 20)),
            (".5M", Ok(1 << 19)),
            ("1.", Ok(1)),
            ("1.0b", Ok(1)),
            ("2e", Ok(2 << 60)),
            ("\t1M", Ok(1 << 20)),
            ("0.9999999999999999999999E", Ok(1 << 60)),
            ("0x1k", Err(Invalid)),
            ("0x", Err(Invalid)),
            ("0x1.5", Err(Invalid)),
            ("1.5", Err(Invalid)),
            ("1.5b", Err(Invalid)),
            ("1M ", Err(Invalid)),
            ("", Err(Invalid)),
            ("1e3", Err(Invalid)),
            ("1.5e3", Err(Invalid)),
            ("-1k", Err(Invalid)),
            ("-1.5G", Err(Invalid)),
            ("k", Err(Invalid)),
            (".", Err(Invalid)),
            ("00x10", Err(Invalid)),
            ("99999999999999999999k", Err(Invalid)),
            ("-1", Err(OutOfRange)),
            ("-0", Err(OutOfRange)),
            ("18446744073709551616", Err(OutOfRange)),
            ("16384P", Err(OutOfRange)),
            ("0xffffffffffffffffff", Err(OutOfRange)),
        ] {
            assert_eq!(parse(s), want, "{s:?}");
        }
    }
}
