//! Calendar arithmetic for the dates mailroom writes: RFC 5322 dates in
//! headers and ISO 8601 timestamps for operators. UTC only, no time zone
//! database, no I/O.

use crate::decimal::Decimal;

/// `Tue, 1 Jul 2003 10:52:37 +0000` (RFC 5322 §3.3), in UTC.
pub fn rfc5322_date(unix: i64) -> String {
    let mut out = String::with_capacity(32);
    push_rfc5322_date(&mut out, unix);
    out
}

/// Appends [`rfc5322_date`] to `out`. Digit by digit rather than through
/// `format!`: every message received gets a date in its trace header.
pub fn push_rfc5322_date(out: &mut String, unix: i64) {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    out.push_str(DAYS[days.rem_euclid(7) as usize]);
    out.push_str(", ");
    push_number(out, d.into(), 1);
    out.push(' ');
    out.push_str(MONTHS[(m - 1) as usize]);
    out.push(' ');
    push_number(out, y, 4);
    out.push(' ');
    push_number(out, secs / 3600, 2);
    out.push(':');
    push_number(out, secs / 60 % 60, 2);
    out.push(':');
    push_number(out, secs % 60, 2);
    out.push_str(" +0000");
}

/// `n` in decimal, zero-padded to `width` digits.
fn push_number(out: &mut String, n: i64, width: usize) {
    if n < 0 {
        out.push('-');
    }
    out.push_str(Decimal::new(n.unsigned_abs(), width).as_str());
}

/// `2003-07-01 10:52:37` in UTC: sortable and fixed-width for tables.
pub fn iso_datetime(unix: i64) -> String {
    let (y, m, d) = civil_from_days(unix.div_euclid(86_400));
    let secs = unix.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's
/// `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `2026-11-21T03:34:56.123Z`: RFC 3339 in UTC with milliseconds, as the
/// HTTP API writes times.
pub fn rfc3339_millis(unix_millis: i64) -> String {
    let secs = unix_millis.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let day = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        day / 3600,
        day / 60 % 60,
        day % 60,
        unix_millis.rem_euclid(1000)
    )
}

/// Parses an RFC 3339 date-time (`2026-11-21T03:34:56Z`, fractions and
/// `+01:00` offsets allowed) to unix milliseconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        (!part.is_empty() && part.bytes().all(|c| c.is_ascii_digit()))
            .then(|| part.parse().ok())
            .flatten()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        let ms = &fraction[..n.min(3)];
        millis = ms.parse::<i64>().ok()? * 10_i64.pow(3 - ms.len() as u32);
        rest = &fraction[n..];
    }
    let offset_minutes = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            let (h, m) = (digits_of(&rest[1..3])?, digits_of(&rest[4..6])?);
            if h > 23 || m > 59 {
                return None;
            }
            sign * (h * 60 + m)
        }
    };
    let days = days_from_civil(year, month as u32, day as u32);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_minutes * 60;
    Some(secs * 1000 + millis)
}

fn digits_of(part: &str) -> Option<i64> {
    (part.bytes().all(|c| c.is_ascii_digit()) && !part.is_empty())
        .then(|| part.parse().ok())
        .flatten()
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// (year, month, day) to days since 1970-01-01: the inverse of
/// `civil_from_days`.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix time in milliseconds now; 0 if the clock is before 1970.
pub fn now_unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_057_056_757),
            "Tue, 1 Jul 2003 10:52:37 +0000"
        );
        assert_eq!(
            rfc5322_date(1_709_208_000),
            "Thu, 29 Feb 2024 12:00:00 +0000"
        );
        assert_eq!(iso_datetime(1_057_056_757), "2003-07-01 10:52:37");
        assert_eq!(iso_datetime(-1), "1969-12-31 23:59:59");
    }

    #[test]
    fn rfc3339_round_trips() {
        for ms in [0, 1_057_056_757_123, 1_709_208_000_000, 4_102_444_799_999] {
            assert_eq!(parse_rfc3339(&rfc3339_millis(ms)), Some(ms), "{ms}");
        }
        assert_eq!(
            parse_rfc3339("2003-07-01T10:52:37Z"),
            Some(1_057_056_757_000)
        );
        assert_eq!(
            parse_rfc3339("2003-07-01T12:52:37.5+02:00"),
            Some(1_057_056_757_500)
        );
        for bad in [
            "",
            "2003-07-01",
            "2003-13-01T00:00:00Z",
            "2003-02-29T00:00:00Z",
            "2003-07-01T24:00:00Z",
            "2003-07-01T10:52:37",
            "2003-07-01T10:52:37+2:00",
            "2003-07-01T10:52:37.Z",
            "२००३-07-01T10:52:37Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
