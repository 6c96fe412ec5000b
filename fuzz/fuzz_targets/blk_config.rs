//! livesnap-blk's `--config` file (`/etc/livesnap/vms/NAME.toml` under the host package's
//! template unit), parsed and checked before anything is opened.
//!
//! Holds: no panic (deep nesting, huge numbers, odd strings); an accepted file has absolute
//! paths, a queue count from 1 to 64, a delta limit of at least one byte, and disk ids of 1 to
//! 20 of [A-Za-z0-9_-] (the guest's serial).
#![no_main]

use libfuzzer_sys::fuzz_target;
use livesnap_blk::fuzzing::blk_config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(c) = blk_config(text) else { return };
    for p in &c.paths {
        assert!(p.is_absolute(), "{}", p.display());
    }
    assert!(c.queues.is_none_or(|q| (1..=64).contains(&q)), "{:?}", c.queues);
    assert_ne!(c.delta_limit, Some(0));
    for id in &c.disk_ids {
        assert!(
            (1..=20).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{id:?}"
        );
    }
});
