//! The guest agent's replies as the host reads them: protobuf bytes of a Ping, Freeze, Thaw or
//! Status reply (the first byte says which), decoded as tonic does and checked as livesnapd's
//! and snapctl's agent client does before anything uses them.
//!
//! Holds: no panic; an accepted reply respects every limit (counts, string lengths, known
//! outcomes and hook phases); a freeze that is not frozen is an abort that carries its report.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livesnap_control::agent::{Error, Filesystem, HookResult, Limits};
use livesnap_control::fuzzing::{check_freeze, check_ping, check_status, check_thaw};
use livesnap_proto::agent as pb;
use prost::Message;

fn check_fs(l: &Limits, fss: &[Filesystem]) {
    assert!(fss.len() <= l.max_filesystems);
    for f in fss {
        for s in [&f.mount_point, &f.fs_type, &f.source, &f.error] {
            assert!(s.len() <= l.max_string);
        }
    }
}

fn check_hooks(l: &Limits, hooks: &[HookResult]) {
    assert!(hooks.len() <= l.max_hooks);
    for h in hooks {
        assert!(h.name.len() <= l.max_string);
        assert!(h.output.len() <= l.max_hook_output);
        assert!(["freeze", "thaw", "freeze-fail"].contains(&h.phase.as_str()));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    let l = Limits::default();
    if bytes.len() > l.max_message {
        return;
    }
    match which % 4 {
        0 => {
            let Ok(r) = pb::PingReply::decode(bytes) else { return };
            let Ok(p) = check_ping(&l, r) else { return };
            assert!(p.capabilities.len() <= 64 && p.version.len() <= l.max_string);
            assert!(p.capabilities.iter().all(|c| c.len() <= l.max_string));
        }
        1 => {
            let Ok(r) = pb::FreezeReply::decode(bytes) else { return };
            let frozen = r.frozen;
            match check_freeze(&l, r) {
                Ok(f) => {
                    assert!(frozen && f.frozen);
                    assert!(f.error.len() <= l.max_string);
                    check_fs(&l, &f.filesystems);
                    check_hooks(&l, &f.hooks);
                }
                Err(Error::FreezeAborted { reason, report }) => {
                    assert!(!frozen && !report.frozen);
                    assert!(!reason.is_empty() && reason.len() <= l.max_string);
                    check_fs(&l, &report.filesystems);
                    check_hooks(&l, &report.hooks);
                }
                Err(Error::InvalidReply(_)) => {}
                Err(e) => panic!("unexpected error {e:?}"),
            }
        }
        2 => {
            let Ok(r) = pb::ThawReply::decode(bytes) else { return };
            let Ok(t) = check_thaw(&l, r) else { return };
            assert!(t.error.len() <= l.max_string);
            check_fs(&l, &t.filesystems);
            check_hooks(&l, &t.hooks);
        }
        _ => {
            let Ok(r) = pb::StatusReply::decode(bytes) else { return };
            let Ok(s) = check_status(&l, r) else { return };
            assert!(s.snapshot_id.len() <= l.max_string && s.last_thaw_reason.len() <= l.max_string);
        }
    }
});
