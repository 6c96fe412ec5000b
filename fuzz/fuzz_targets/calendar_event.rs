//! Calendar events (systemd syntax) of livesnapd's schedules, parsed from the config file.
//!
//! Holds: no panic and no endless search (odd strings, huge numbers, dates that never come);
//! an accepted event's next elapse is strictly after the base time, is its own next elapse
//! from one second before, and the event parses again from its text to the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livesnap_control::daemon::calendar::Calendar;

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes pick the base time; the rest is the expression.
    if data.len() < 8 {
        return;
    }
    let (base, text) = data.split_at(8);
    let Ok(text) = std::str::from_utf8(text) else { return };
    let Ok(c) = Calendar::parse(text) else { return };
    assert_eq!(Calendar::parse(&c.to_string()).as_ref(), Ok(&c), "{text:?}");
    let raw = i64::from_le_bytes(base.try_into().unwrap_or([0; 8]));
    // From before 1970 to after 2200, where the search stops.
    let base = raw.rem_euclid(8_000_000_000) - 500_000_000;
    let mut t = base;
    for _ in 0..4 {
        let Some(next) = c.next_after(t) else { return };
        assert!(next > t, "{text:?}: {next} is not after {t}");
        assert_eq!(c.next_after(next - 1), Some(next), "{text:?}");
        t = next;
    }
});
