//! Live restore: a disk served to the guest while its image is filled from a backup.
//!
//! - [`map`]: the restore map `IMAGE.restore` (header, restored-chunk and guest-write bitmaps).
//!
//! The rules (what is durable before what) and the map's layout: `docs/live-restore.md`.

pub mod map;

pub use self::map::{create_map, map_path, read_map, Identity, MapInfo};
