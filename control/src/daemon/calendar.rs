//! Calendar events in systemd's syntax (systemd.time(7), the subset Proxmox Backup Server
//! documents for its job schedules), evaluated in UTC.
//!
//! ```text
//! [WEEKDAYS] [[YEAR-]MONTH-DAY] [HOUR:MINUTE[:SECOND]] [UTC]
//! ```
//!
//! - WEEKDAYS: names (`Mon`, `monday`, any case), lists `Mon,Wed`, ranges `Mon..Fri`.
//! - Every number component: `*`, a value, a list `1,15`, a range `1..7`, a repetition
//!   `0/6` (0, 6, 12, 18) or `1..20/5`. An omitted date is `*-*-*`, an omitted time
//!   `00:00:00`, omitted seconds `:00`. A weekday and a day of the month must both match.
//! - The shorthands, alone: `minutely`, `hourly`, `daily`, `weekly` (Monday), `monthly`,
//!   `yearly`/`annually`, `quarterly`, `semiannually`.
//!
//! Not supported, and refused with an error that says so: time zones other than UTC,
//! fractions of a second, the last days of a month (`~`), two-digit years. The times are UTC
//! (written `UTC` or not): a schedule fires at the same instant whatever the host's zone, and
//! no daylight-saving change skips or repeats a backup. `systemd-analyze calendar "EXPR UTC"`
//! gives the same next elapses (the tests check it).

use std::fmt;

/// Years a calendar event may name; systemd stops at the same bound.
const MIN_YEAR: u32 = 1970;
const MAX_YEAR: u32 = 2199;
/// An expression longer than this is refused (one never needs it).
const MAX_LEN: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a calendar event: {reason}")]
pub struct Error {
    text: String,
    reason: String,
}

/// One item of a component: `start..=end`, every `step`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Item {
    start: u32,
    end: u32,
    step: u32,
}

/// The values a component allows; an empty list is `*`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct Component(Vec<Item>);

impl Component {
    fn matches(&self, v: u32) -> bool {
        self.0.is_empty() || self.0.iter().any(|i| v >= i.start && v <= i.end && (v - i.start) % i.step == 0)
    }

    /// The smallest value `>= from` and `<= max` this component allows.
    fn next(&self, from: u32, max: u32) -> Option<u32> {
        (from..=max).find(|&v| self.matches(v))
    }
}

/// A parsed calendar event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calendar {
    text: String,
    /// Bit 0 Monday … bit 6 Sunday; 0: any day.
    weekdays: u8,
    year: Component,
    month: Component,
    day: Component,
    hour: Component,
    minute: Component,
    second: Component,
}

impl fmt::Display for Calendar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Calendar {
    type Err = Error;
    fn from_str(s: &str) -> Result<Calendar, Error> {
        Calendar::parse(s)
    }
}

const WEEKDAYS: [(&str, &str); 7] = [
    ("mon", "monday"),
    ("tue", "tuesday"),
    ("wed", "wednesday"),
    ("thu", "thursday"),
    ("fri", "friday"),
    ("sat", "saturday"),
    ("sun", "sunday"),
];

impl Calendar {
    /// Parses `text` (see the module's documentation).
    pub fn parse(text: &str) -> Result<Calendar, Error> {
        let fail = |reason: &str| Error { text: text.chars().take(80).collect(), reason: reason.to_owned() };
        if text.len() > MAX_LEN {
            return Err(fail("it is too long"));
        }
        let mut tokens: Vec<&str> = text.split_whitespace().collect();
        if tokens.last() == Some(&"UTC") {
            tokens.pop();
        }
        let shorthand = match tokens.as_slice() {
            [one] => match one.to_ascii_lowercase().as_str() {
                "minutely" => Some("*-*-* *:*:00"),
                "hourly" => Some("*-*-* *:00:00"),
                "daily" => Some("*-*-* 00:00:00"),
                "weekly" => Some("Mon *-*-* 00:00:00"),
                "monthly" => Some("*-*-01 00:00:00"),
                "yearly" | "annually" => Some("*-01-01 00:00:00"),
                "quarterly" => Some("*-01,04,07,10-01 00:00:00"),
                "semiannually" => Some("*-01,07-01 00:00:00"),
                _ => None,
            },
            _ => None,
        };
        if let Some(s) = shorthand {
            let mut c = Calendar::parse(s)?;
            c.text = text.trim().to_owned();
            return Ok(c);
        }
        if tokens.is_empty() {
            return Err(fail("it is empty"));
        }
        const SHORTHANDS: [&str; 9] =
            ["minutely", "hourly", "daily", "weekly", "monthly", "yearly", "annually", "quarterly", "semiannually"];
        if let Some(t) = tokens.iter().find(|t| SHORTHANDS.contains(&t.to_ascii_lowercase().as_str())) {
            return Err(fail(&format!("`{t}` stands alone (for every day at 02:00, write `02:00` or `*-*-* 02:00`)")));
        }
        let mut c = Calendar {
            text: text.trim().to_owned(),
            weekdays: 0,
            year: Component::default(),
            month: Component::default(),
            day: Component::default(),
            hour: Component(vec![Item { start: 0, end: 0, step: 1 }]),
            minute: Component(vec![Item { start: 0, end: 0, step: 1 }]),
            second: Component(vec![Item { start: 0, end: 0, step: 1 }]),
        };
        let mut rest = tokens.as_slice();
        if let [first, tail @ ..] = rest {
            if first.starts_with(|ch: char| ch.is_ascii_alphabetic()) {
                c.weekdays = weekdays(first).map_err(|r| fail(&r))?;
                rest = tail;
            }
        }
        let (mut date, mut time) = (None, None);
        for t in rest {
            if t.contains(':') && time.is_none() {
                time = Some(*t);
            } else if t.contains('-') && date.is_none() && time.is_none() {
                date = Some(*t);
            } else if t.starts_with(|ch: char| ch.is_ascii_alphabetic()) {
                return Err(fail(&format!("`{t}`: only UTC is supported as a time zone, and weekdays come first")));
            } else {
                return Err(fail(&format!("`{t}` is neither a date (Y-M-D) nor a time (H:M[:S]) in its place")));
            }
        }
        if let Some(d) = date {
            if d.contains('~') {
                return Err(fail("the last days of a month (`~`) are not supported"));
            }
            let parts: Vec<&str> = d.split('-').collect();
            let (y, m, day) = match parts.as_slice() {
                [y, m, day] => (Some(*y), *m, *day),
                [m, day] => (None, *m, *day),
                _ => return Err(fail(&format!("the date `{d}` is not [YEAR-]MONTH-DAY"))),
            };
            if let Some(y) = y {
                if y != "*" && y.split(',').any(|p| p.split(['.', '/']).next().is_some_and(|s| s.len() != 4)) {
                    return Err(fail("a year has four digits"));
                }
                c.year = component(y, "year", MIN_YEAR, MAX_YEAR).map_err(|r| fail(&r))?;
            }
            c.month = component(m, "month", 1, 12).map_err(|r| fail(&r))?;
            c.day = component(day, "day", 1, 31).map_err(|r| fail(&r))?;
        }
        if let Some(t) = time {
            let parts: Vec<&str> = t.split(':').collect();
            let (h, m, s) = match parts.as_slice() {
                [h, m] => (*h, *m, "00"),
                [h, m, s] => (*h, *m, *s),
                _ => return Err(fail(&format!("the time `{t}` is not HOUR:MINUTE[:SECOND]"))),
            };
            if s.contains('.') && !s.contains("..") {
                return Err(fail("fractions of a second are not supported"));
            }
            c.hour = component(h, "hour", 0, 23).map_err(|r| fail(&r))?;
            c.minute = component(m, "minute", 0, 59).map_err(|r| fail(&r))?;
            c.second = component(s, "second", 0, 59).map_err(|r| fail(&r))?;
        }
        Ok(c)
    }

    /// The first instant strictly after `after` (seconds since the epoch, UTC) the event
    /// matches; `None` if it never does again (before the year 2200).
    pub fn next_after(&self, after: i64) -> Option<i64> {
        let start = after.checked_add(1)?;
        let (mut y, mut mo, mut d) = civil_from_days(start.div_euclid(86_400));
        let secs = start.rem_euclid(86_400) as u32;
        let (mut h, mut mi, mut s) = (secs / 3600, secs / 60 % 60, secs % 60);
        if y < i64::from(MIN_YEAR) {
            (y, mo, d, h, mi, s) = (i64::from(MIN_YEAR), 1, 1, 0, 0, 0);
        }
        loop {
            if y > i64::from(MAX_YEAR) {
                return None;
            }
            let yu = y as u32;
            if !self.year.matches(yu) {
                match self.year.next(yu + 1, MAX_YEAR) {
                    Some(n) => (y, mo, d, h, mi, s) = (i64::from(n), 1, 1, 0, 0, 0),
                    None => return None,
                }
                continue;
            }
            match self.month.next(mo, 12) {
                None => {
                    (y, mo, d, h, mi, s) = (y + 1, 1, 1, 0, 0, 0);
                    continue;
                }
                Some(n) if n != mo => (mo, d, h, mi, s) = (n, 1, 0, 0, 0),
                Some(_) => {}
            }
            let last = days_in_month(y, mo);
            let day = (d..=last).find(|&v| self.day.matches(v) && self.weekday_matches(y, mo, v));
            match day {
                None => {
                    (mo, d, h, mi, s) = (mo + 1, 1, 0, 0, 0);
                    if mo > 12 {
                        (y, mo) = (y + 1, 1);
                    }
                    continue;
                }
                Some(n) if n != d => (d, h, mi, s) = (n, 0, 0, 0),
                Some(_) => {}
            }
            match self.hour.next(h, 23) {
                None => {
                    (d, h, mi, s) = (d + 1, 0, 0, 0);
                    if d > last {
                        (mo, d) = (mo + 1, 1);
                        if mo > 12 {
                            (y, mo) = (y + 1, 1);
                        }
                    }
                    continue;
                }
                Some(n) if n != h => (h, mi, s) = (n, 0, 0),
                Some(_) => {}
            }
            match self.minute.next(mi, 59) {
                None => {
                    (h, mi, s) = (h + 1, 0, 0);
                    if h > 23 {
                        (d, h) = (d + 1, 0);
                        if d > last {
                            (mo, d) = (mo + 1, 1);
                            if mo > 12 {
                                (y, mo) = (y + 1, 1);
                            }
                        }
                    }
                    continue;
                }
                Some(n) if n != mi => (mi, s) = (n, 0),
                Some(_) => {}
            }
            match self.second.next(s, 59) {
                None => {
                    (mi, s) = (mi + 1, 0);
                    if mi > 59 {
                        (h, mi) = (h + 1, 0);
                        if h > 23 {
                            (d, h) = (d + 1, 0);
                            if d > last {
                                (mo, d) = (mo + 1, 1);
                                if mo > 12 {
                                    (y, mo) = (y + 1, 1);
                                }
                            }
                        }
                    }
                    continue;
                }
                Some(n) => s = n,
            }
            return Some(days_from_civil(y, mo, d) * 86_400 + i64::from(h * 3600 + mi * 60 + s));
        }
    }

    fn weekday_matches(&self, y: i64, m: u32, d: u32) -> bool {
        self.weekdays == 0 || self.weekdays & (1 << weekday(days_from_civil(y, m, d))) != 0
    }
}

/// 0 Monday … 6 Sunday.
pub(crate) fn weekday(days: i64) -> u32 {
    // 1970-01-01 was a Thursday.
    (days + 3).rem_euclid(7) as u32
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

pub(crate) fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day counted from 1970-01-01: (year, month 1–12, day 1–31).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { era * 400 + yoe + 1 } else { era * 400 + yoe }, m, d)
}

fn weekdays(token: &str) -> Result<u8, String> {
    let day = |name: &str| {
        let l = name.to_ascii_lowercase();
        WEEKDAYS
            .iter()
            .position(|(short, long)| l == *short || l == *long)
            .ok_or_else(|| format!("`{name}` is not a weekday (Mon, Tue, …, Sun)"))
    };
    let mut mask = 0u8;
    for part in token.split(',') {
        match part.split_once("..") {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                if a > b {
                    return Err(format!("the weekday range `{part}` runs backwards (Monday is the first day)"));
                }
                for i in a..=b {
                    mask |= 1 << i;
                }
            }
            None => mask |= 1 << day(part)?,
        }
    }
    Ok(mask)
}

fn number(s: &str, what: &str, min: u32, max: u32) -> Result<u32, String> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{s}` is not a number ({what})"));
    }
    let v: u32 = s.parse().map_err(|_| format!("`{s}` is not a number ({what})"))?;
    if v < min || v > max {
        return Err(format!("the {what} {v} is not from {min} to {max}"));
    }
    Ok(v)
}

fn component(s: &str, what: &str, min: u32, max: u32) -> Result<Component, String> {
    if s == "*" {
        return Ok(Component::default());
    }
    let mut items = Vec::new();
    for part in s.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, st)) => {
                let st = number(st, &format!("{what} step"), 1, max.max(1))?;
                (r, Some(st))
            }
            None => (part, None),
        };
        if range == "*" {
            return Err(format!("`{part}`: a repetition starts at a value (`0/{}`), not at `*`", step.unwrap_or(1)));
        }
        let (start, end) = match range.split_once("..") {
            Some((a, b)) => {
                let (a, b) = (number(a, what, min, max)?, number(b, what, min, max)?);
                if a > b {
                    return Err(format!("the {what} range `{range}` runs backwards"));
                }
                (a, b)
            }
            // `a/step` runs to the end of the component; `a` alone is one value.
            None => {
                let a = number(range, what, min, max)?;
                (a, if step.is_some() { max } else { a })
            }
        };
        items.push(Item { start, end, step: step.unwrap_or(1) });
    }
    Ok(Component(items))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        // "YYYY-MM-DD HH:MM:SS"
        let n: Vec<i64> = text.split(['-', ' ', ':']).map(|p| p.parse().unwrap_or(0)).collect();
        days_from_civil(n[0], n[1] as u32, n[2] as u32) * 86_400 + n[3] * 3600 + n[4] * 60 + n[5]
    }

    fn show(t: i64) -> String {
        let (y, m, d) = civil_from_days(t.div_euclid(86_400));
        let s = t.rem_euclid(86_400);
        format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    }

    fn elapses(expr: &str, base: &str, n: usize) -> Vec<String> {
        let c = Calendar::parse(expr).unwrap_or_else(|e| panic!("{e}"));
        let mut t = at(base);
        let mut out = Vec::new();
        for _ in 0..n {
            match c.next_after(t) {
                Some(next) => {
                    assert!(next > t, "{expr}: {next} not after {t}");
                    out.push(show(next));
                    t = next;
                }
                None => break,
            }
        }
        out
    }

    /// The expressions of the comparison with systemd, and more besides.
    const TABLE: &[&str] = &[
        "Mon..Fri 22:30",
        "*-*-* 00/6:00",
        "hourly",
        "daily",
        "weekly",
        "monthly",
        "yearly",
        "quarterly",
        "semiannually",
        "minutely",
        "Sat *-*-1..7 03:00",
        "*:*:0/2",
        "*:0/15",
        "12:05",
        "mon,wed..fri",
        "Sun,Sat 04:10:30",
        "*-*-29..31 00:00",
        "*-02-29 12:00",
        "*-2/3-1",
        "*-*-1/2",
        "1..5/2:00",
        "2027-*-* 01:00",
        "2026,2028-06-15 00:00:00",
        "Fri *-*-13 13:13",
        "02:00:0/30",
        "Mon 1:00 UTC",
        "2024-02-30",
        "*-12-31 23:59:59",
    ];

    #[test]
    fn dates_round_trip_through_day_numbers() {
        for days in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert!((1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m));
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(weekday(0), 3, "1970-01-01 was a Thursday");
        assert_eq!(show(at("2024-02-29 23:59:59") + 1), "2024-03-01 00:00:00");
    }

    #[test]
    fn next_elapses_follow_the_calendar() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("Mon..Fri 22:30", "2026-12-04 22:30:00", &["2026-12-07 22:30:00", "2026-12-08 22:30:00"]),
            ("*-*-* 00/6:00", "2026-12-07 17:26:00", &["2026-12-07 18:00:00", "2026-12-08 00:00:00"]),
            ("Sat *-*-1..7 03:00", "2024-02-28 23:59:59", &["2024-03-02 03:00:00", "2024-04-06 03:00:00"]),
            ("*-*-29..31 00:00", "2024-02-28 23:59:59", &["2024-02-29 00:00:00", "2024-03-29 00:00:00"]),
            ("*-02-29 12:00", "2025-01-01 00:00:00", &["2028-02-29 12:00:00"]),
            ("hourly", "2026-12-31 23:00:00", &["2027-01-01 00:00:00"]),
            ("*:*:0/2", "2026-12-07 17:27:11", &["2026-12-07 17:27:12", "2026-12-07 17:27:14"]),
            ("2024-02-30", "2020-01-01 00:00:00", &[]),
        ];
        for (expr, base, want) in cases {
            assert_eq!(
                elapses(expr, base, want.len() + 1).iter().take(want.len()).collect::<Vec<_>>(),
                *want,
                "{expr}"
            );
        }
        assert_eq!(elapses("2024-02-30", "2020-01-01 00:00:00", 1), Vec::<String>::new(), "never");
        // The ends of time: no overflow, a clear answer.
        let daily = Calendar::parse("daily").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(daily.next_after(i64::MAX), None);
        assert_eq!(daily.next_after(at("2199-12-31 00:00:00")), None, "the search ends with 2199");
        assert_eq!(daily.next_after(i64::MIN).map(show).as_deref(), Some("1970-01-01 00:00:00"));
    }

    #[test]
    fn mistakes_are_refused_with_the_reason() {
        for (expr, want) in [
            ("", "empty"),
            ("daily 02:00", "stands alone"),
            ("Fri..Mon", "backwards"),
            ("Moonday", "not a weekday"),
            ("*-*-* 24:00", "hour 24"),
            ("*-*-* 23:60", "minute 60"),
            ("*-13-01", "month 13"),
            ("*-*-32", "day 32"),
            ("*-*-0", "day 0"),
            ("*-*-* 1:2:3.5", "fractions"),
            ("*-*~1", "`~`"),
            ("*/5:00", "not at `*`"),
            ("0/5", "neither a date"),
            ("Mon 1:00 Europe/Paris", "only UTC"),
            ("26-01-01", "four digits"),
            ("*-*-* 5..1:00", "backwards"),
            ("*:0/0", "step 0"),
            ("1:2:3:4", "not HOUR:MINUTE"),
            ("1-2-3-4", "not [YEAR-]MONTH-DAY"),
            ("12:00 12:00", "neither"),
        ] {
            let e = Calendar::parse(expr).err().unwrap_or_else(|| panic!("accepted {expr:?}"));
            assert!(e.to_string().contains(want), "{expr:?}: {e}");
        }
    }

    /// Whether `t` is an elapse: every component matches (the definition, checked by brute
    /// force against the search).
    fn matches(c: &Calendar, t: i64) -> bool {
        let days = t.div_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let s = t.rem_euclid(86_400) as u32;
        (MIN_YEAR as i64..=MAX_YEAR as i64).contains(&y)
            && c.year.matches(y as u32)
            && c.month.matches(m)
            && c.day.matches(d)
            && c.weekday_matches(y, m, d)
            && c.hour.matches(s / 3600)
            && c.minute.matches(s / 60 % 60)
            && c.second.matches(s % 60)
    }

    /// Random expressions from systemd's pieces: what parses has a next elapse that matches,
    /// with no elapse before it (brute force over the two hours after the base), and parses
    /// again from its text to the same event.
    #[test]
    fn random_events_find_the_first_matching_second() {
        let pieces =
            ["*", "0", "1", "5", "7", "12", "23", "30", "59", "0/5", "1..5", "2/7", "10..20/3", "1,15", "*/2", "60"];
        let days = ["Mon", "fri", "Sat,Sun", "Mon..Wed", "Tue..Thu,Sun", "Sun..Mon"];
        let mut rng = fastrand::Rng::with_seed(7);
        let mut checked = 0;
        for _ in 0..3000 {
            let p = |rng: &mut fastrand::Rng| pieces[rng.usize(..pieces.len())];
            let mut e = String::new();
            if rng.bool() {
                e += days[rng.usize(..days.len())];
                e += " ";
            }
            if rng.u8(..4) == 0 {
                e += &format!("*-{}-{} ", p(&mut rng), p(&mut rng));
            }
            e += &format!("{}:{}", p(&mut rng), p(&mut rng));
            if rng.bool() {
                e += &format!(":{}", p(&mut rng));
            }
            let Ok(c) = Calendar::parse(&e) else { continue };
            assert_eq!(Calendar::parse(&c.to_string()).as_ref(), Ok(&c));
            let base = at("2026-01-01 00:00:00") + rng.i64(0..400 * 86_400);
            match c.next_after(base) {
                Some(next) => {
                    assert!(next > base && matches(&c, next), "{e}: {} from {}", show(next), show(base));
                    let window = (next - 1).min(base + 7200);
                    if let Some(early) = (base + 1..=window).find(|&t| matches(&c, t)) {
                        panic!("{e}: {} matches before {} (from {})", show(early), show(next), show(base));
                    }
                    checked += 1;
                }
                None => assert!((base + 1..base + 7200).all(|t| !matches(&c, t)), "{e}: none found"),
            }
        }
        assert!(checked > 300, "only {checked} expressions parsed");
    }

    /// Compares the next elapses with `systemd-analyze calendar` for every expression of
    /// [`TABLE`], from several base times. Skipped (with a message) where systemd-analyze is
    /// not installed.
    #[test]
    fn next_elapses_agree_with_systemd_analyze() {
        const N: usize = 6;
        let bases = ["2024-02-28 23:59:59", "2026-12-07 17:26:16", "2027-12-31 23:59:58"];
        let probe = std::process::Command::new("systemd-analyze").arg("--version").output();
        if !probe.is_ok_and(|o| o.status.success()) {
            eprintln!("systemd-analyze is not installed: the comparison is skipped");
            return;
        }
        let mut compared = 0;
        for base in bases {
            for expr in TABLE {
                let expr_utc = if expr.ends_with("UTC") { expr.to_string() } else { format!("{expr} UTC") };
                let out = std::process::Command::new("systemd-analyze")
                    .env("TZ", "UTC")
                    .args(["calendar", &format!("--iterations={N}"), &format!("--base-time={base} UTC"), &expr_utc])
                    .output()
                    .unwrap_or_else(|e| panic!("{e}"));
                assert!(out.status.success(), "systemd refuses {expr}: {}", String::from_utf8_lossy(&out.stderr));
                let text = String::from_utf8_lossy(&out.stdout);
                let theirs: Vec<String> = text
                    .lines()
                    .filter_map(|l| {
                        let l = l.trim();
                        let v = l
                            .strip_prefix("Next elapse: ")
                            .or_else(|| l.split_once(": ").filter(|(k, _)| k.starts_with("Iter.")).map(|(_, v)| v))?;
                        // "Mon 2026-12-07 22:30:00 UTC"
                        let mut w = v.split_whitespace();
                        let (_, date, time) = (w.next()?, w.next()?, w.next()?);
                        Some(format!("{date} {time}"))
                    })
                    .collect();
                let ours = elapses(expr, base, N);
                assert_eq!(ours, theirs, "{expr} from {base}");
                compared += 1;
            }
        }
        assert_eq!(compared, bases.len() * TABLE.len());
    }
}
