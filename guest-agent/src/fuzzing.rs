//! Entry points of the fuzz targets (`fuzz/` at the repository root) into code that is
//! otherwise private. Not an API: nothing else may use it, and it may change at any time.

use livesnap_proto::agent as pb;

use crate::hooks::HookResult;

/// A hook's result as the gRPC service sends it to the host.
pub fn hook_reply(r: &HookResult) -> pb::HookResult {
    crate::service::hook(r)
}
