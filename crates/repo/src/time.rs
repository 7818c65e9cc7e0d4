//! Timestamps as restic stores them: RFC 3339 with nanoseconds
//! (`2015-01-02T18:10:50.895208559+01:00`). strata writes UTC (`...Z`) and reads
//! any offset.

use std::time::{SystemTime, UNIX_EPOCH};

/// A point in time, in seconds and nanoseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from_system(SystemTime::now())
    }

    pub fn from_system(t: SystemTime) -> Timestamp {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(_) => Timestamp { secs: 0, nanos: 0 },
        }
    }

    /// RFC 3339 with nine fraction digits, in UTC.
    pub fn rfc3339(&self) -> String {
        let (y, mo, d, h, mi, s) = self.civil();
        format!(
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:09}Z",
            self.nanos
        )
    }

    /// `YYYY-MM-DD HH:MM:SS` in UTC, for listings.
    pub fn display(&self) -> String {
        let (y, mo, d, h, mi, s) = self.civil();
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
    }

    /// Year, month, day, hour, minute and second of this instant in UTC.
    pub fn civil(&self) -> (i64, u32, u32, u32, u32, u32) {
        let days = self.secs.div_euclid(86_400);
        let rem = self.secs.rem_euclid(86_400) as u32;
        // Days to a proleptic Gregorian date (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let y = yoe + era * 400 + i64::from(m <= 2);
        (y, m, d, rem / 3600, rem / 60 % 60, rem % 60)
    }

    /// Parse RFC 3339 (`Z` or `±HH:MM`, optional fraction). `None` if malformed.
    pub fn parse(s: &str) -> Option<Timestamp> {
        Timestamp::parse_with_offset(s).map(|(t, _)| t)
    }

    /// Parse RFC 3339 and also return the zone offset it was written in, in
    /// seconds east of UTC.
    pub fn parse_with_offset(s: &str) -> Option<(Timestamp, i64)> {
        let b = s.as_bytes();
        let num = |r: std::ops::Range<usize>| -> Option<i64> {
            let t = s.get(r)?;
            t.bytes()
                .all(|c| c.is_ascii_digit())
                .then(|| t.parse().ok())?
        };
        if b.len() < 20
            || b[4] != b'-'
            || b[7] != b'-'
            || !matches!(b[10], b'T' | b't')
            || b[13] != b':'
            || b[16] != b':'
        {
            return None;
        }
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        let mut i = 19;
        let mut nanos = 0u32;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            i = start;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let frac = &s[start..i];
            if frac.is_empty() {
                return None;
            }
            for (k, c) in frac.bytes().take(9).enumerate() {
                nanos += u32::from(c - b'0') * 10u32.pow(8 - k as u32);
            }
        }
        let offset = match b.get(i)? {
            b'Z' | b'z' if i + 1 == b.len() => 0,
            sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
                let v = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
                if *sign == b'-' {
                    -v
                } else {
                    v
                }
            }
            _ => return None,
        };
        let days = days_from_civil(y, mo, d);
        Some((
            Timestamp {
                secs: days * 86_400 + h * 3600 + mi * 60 + sec - offset,
                nanos,
            },
            offset,
        ))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the inverse of
/// [`Timestamp::civil`]'s date part).
pub fn days_from_civil(y: i64, mo: i64, d: i64) -> i64 {
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_offsets_are_honoured() {
        let t = Timestamp {
            secs: 1_420_218_650,
            nanos: 895_208_559,
        };
        assert_eq!(t.rfc3339(), "2015-01-02T17:10:50.895208559Z");
        assert_eq!(Timestamp::parse(&t.rfc3339()), Some(t));
        assert_eq!(
            Timestamp::parse("2015-01-02T18:10:50.895208559+01:00"),
            Some(t)
        );
        assert_eq!(
            Timestamp::parse("2000-02-29T00:00:00Z").unwrap().display(),
            "2000-02-29 00:00:00"
        );
        assert_eq!(Timestamp::parse("2015-01-02 18:10:50Z"), None);
        assert_eq!(Timestamp::parse("2015-13-02T18:10:50Z"), None);
    }
}
