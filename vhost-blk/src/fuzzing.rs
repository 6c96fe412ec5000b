//! Entry points of the fuzz targets (`fuzz/` at the repository root) into parsers that are
//! otherwise private. Not an API: nothing else may use it, and it may change at any time.

pub use crate::disk::qcow2::Header as Qcow2Header;

/// The largest virtual size the qcow2 header check accepts.
pub const QCOW2_MAX_VIRTUAL_SIZE: u64 = crate::disk::qcow2::MAX_VIRTUAL_SIZE;
