//! Live restore: a disk served to the guest while its image is filled from a backup.
//!
//! - [`disk`]: [`RestoreDisk`], the `DiskFile` that fills chunks on demand and marks guest writes;
//!   the feed's wants and answers.
//! - [`map`]: the restore map `IMAGE.restore` (header, restored-chunk and guest-write bitmaps).
//!
//! The rules (what is durable before what) and the map's layout: `docs/live-restore.md`.

pub mod disk;
pub mod map;

#[cfg(test)]
mod bench_tests;
#[cfg(test)]
mod model_tests;

pub use self::disk::{Answer, FeedMsg, Options, RestoreDisk};
pub use self::map::{create_map, map_path, read_map, Identity, MapInfo};
