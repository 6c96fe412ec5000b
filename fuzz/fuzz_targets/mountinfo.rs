//! The guest agent's reading of `/proc/self/mountinfo` into its freeze plan, and the octal
//! escapes it shares with its state file.
//!
//! Holds: no panic; the plan holds each superblock once, only freezable read-write mounts that
//! are in the table, in reverse table order; unescaping what was escaped gives back any bytes.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use livesnap_agent::freeze::{escape, parse_mountinfo, plan, unescape};

fuzz_target!(|data: &[u8]| {
    assert_eq!(unescape(&escape(data)), data);
    let escaped = escape(data);
    assert!(escaped.bytes().all(|b| b.is_ascii_graphic()), "escaped text holds a separator: {escaped:?}");

    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(mounts) = parse_mountinfo(text) else { return };
    assert!(mounts.len() <= text.lines().count());
    let targets = plan(&mounts);
    let mut devs = HashSet::new();
    let mut last_index = usize::MAX;
    let ro = |o: &str| o.split(',').any(|o| o == "ro");
    for t in &targets {
        assert!(devs.insert(t.dev), "superblock {:?} planned twice", t.dev);
        // The superblock's first read-write mount of that type is the one planned.
        let i = mounts
            .iter()
            .position(|m| m.dev == t.dev && m.fs_type == t.fs_type && !ro(&m.mount_options) && !ro(&m.super_options))
            .unwrap_or_else(|| panic!("{t:?} is not a read-write mount of the table"));
        assert_eq!((&mounts[i].mount_point, &mounts[i].source), (&t.mount_point, &t.source));
        assert!(!["proc", "sysfs", "tmpfs", "nfs", "nfs4", "fuse"].contains(&t.fs_type.as_str()));
        assert!(last_index == usize::MAX || i < last_index, "plan not in reverse table order");
        last_index = i;
    }
});
