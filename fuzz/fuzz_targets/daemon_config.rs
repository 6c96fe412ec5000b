//! livesnapd's TOML config, parsed and checked whole before the daemon starts.
//!
//! Holds: no panic (deep nesting, huge numbers, odd strings); an accepted config has absolute
//! paths, a freeze timeout in range, distinct VM names that are valid repository names,
//! distinct backend control sockets, agent endpoints that are absolute paths or guest CIDs.
#![no_main]

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use livesnap_control::daemon::config::{AgentEndpoint, Config, RepositoryConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(c) = Config::parse(Path::new("/etc/livesnap/livesnapd.toml"), text) else { return };
    if let RepositoryConfig::Dir(p) = &c.repository {
        assert!(p.is_absolute(), "{}", p.display());
    }
    for p in [&c.socket, &c.state, &c.restore_dir] {
        assert!(p.is_absolute(), "{}", p.display());
    }
    if let Some(t) = &c.tcp {
        assert!(t.cert.is_absolute() && t.key.is_absolute() && t.token_file.is_absolute());
    }
    assert!(c.freeze_timeout > Duration::ZERO && c.freeze_timeout <= Duration::from_secs(600));
    assert!(c.read_bytes_per_sec != Some(0));
    let mut names = HashSet::new();
    let mut controls = HashSet::new();
    for v in &c.vms {
        livesnap_repo::validate_name("VM", &v.name).unwrap_or_else(|e| panic!("{e}"));
        assert!(names.insert(&v.name), "VM {} twice", v.name);
        assert!(v.control.is_absolute());
        assert!(controls.insert(&v.control), "control socket {} twice", v.control.display());
        match &v.agent {
            None => {}
            Some(AgentEndpoint::Hybrid(a)) => assert!(a.path.is_absolute()),
            Some(AgentEndpoint::Unix(p)) => assert!(p.is_absolute()),
            Some(AgentEndpoint::Vsock { cid, .. }) => assert!(*cid >= 3 && *cid != u32::MAX),
        }
    }
    assert!(c.vm("").is_none());
});
