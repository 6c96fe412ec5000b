//! File-level restore's reading of a tenant's disk (`control/src/files/`): the partition table
//! (GPT, MBR and its chain of logical partitions), the signature check, then ext4-view over
//! the chosen region, listing `/` and walking the whole tree with every file's data.
//!
//! Input: a disk image, then one byte choosing the partition (0: chosen as livesnapd does, else
//! 1–3). Seeds are small real images (`mkfs.ext4 -d` on a bare disk, in a GPT and in an MBR
//! partition) from `fuzz_seeds`. Holds, besides no panic and no hang: the region read lies
//! within the disk; every name of the walk is one safe path component; data comes only after
//! a regular file's entry, inside its size, never empty.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use livesnap_control::files::{Error, Item, Kind, Volume};

/// Bounds on one input's work: entries walked and file bytes produced (holes included).
const MAX_ITEMS: usize = 20_000;
const MAX_READ: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, img)) = data.split_last() else { return };
    let partition = match sel % 4 {
        0 => None,
        n => Some(u32::from(n)),
    };
    let size = img.len() as u64;
    let Ok(v) = Volume::open(Arc::new(img.to_vec()), partition) else { return };
    assert!(v.region.start.checked_add(v.region.len).is_some_and(|end| end <= size), "{:?}", v.region);
    v.limit_reads(MAX_READ);
    if let Ok(list) = v.list("/") {
        for e in &list {
            assert!(!e.name.is_empty() && !e.name.contains(&b'/') && !e.name.contains(&0), "{:?}", e.name);
        }
    }
    let mut items = 0usize;
    let mut file: Option<u64> = None;
    let _ = v.walk("/", |item| {
        items += 1;
        if items > MAX_ITEMS {
            return Err(Error::Gone);
        }
        match item {
            Item::Entry { path, info } => {
                for c in &path {
                    let ok = !c.is_empty() && c != b"." && c != b".." && !c.contains(&b'/') && !c.contains(&0);
                    assert!(ok, "an unsafe name in {path:?}");
                }
                file = (info.kind == Kind::File).then_some(info.size);
            }
            Item::Data { offset, data } => {
                let size = file.unwrap_or_else(|| panic!("data at {offset} with no regular file open"));
                assert!(!data.is_empty());
                assert!(offset.checked_add(data.len() as u64).is_some_and(|end| end <= size));
            }
        }
        Ok(())
    });
});
