//! The hybrid vsock handshake as the host reads it: after `CONNECT <port>\n`, the reply line of
//! the VMM's or vhost-device-vsock's socket, which the guest can influence (a guest that owns
//! the port's listener). Also the `PATH:PORT` addresses of the config.
//!
//! Holds: no panic; the reply is accepted only as `OK <u32>`; reading stops right after its
//! newline, never taking a byte of the guest's stream, and never reads past the longest line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livesnap_control::fuzzing::hybrid_reply;
use livesnap_control::vsock::HybridAddr;

fuzz_target!(|data: &[u8]| {
    let mut rest: &[u8] = data;
    let got = futures::executor::block_on(hybrid_reply(&mut rest));
    let consumed = data.len() - rest.len();
    assert!(consumed <= 34, "read {consumed} bytes of a handshake");
    if let Ok(port) = got {
        let newline = data.iter().position(|&b| b == b'\n').unwrap_or_else(|| panic!("accepted without a newline"));
        assert_eq!(consumed, newline + 1, "the guest's stream was read into");
        let line = String::from_utf8_lossy(&data[..newline]);
        let n = line.strip_prefix("OK ").unwrap_or_else(|| panic!("accepted {line:?}"));
        assert_eq!(n.trim().parse::<u32>().ok(), Some(port));
    }

    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(addr) = text.parse::<HybridAddr>() {
            assert!(!addr.path.as_os_str().is_empty());
            let again = format!("{}:{}", addr.path.display(), addr.port);
            assert_eq!(again.parse::<HybridAddr>(), Ok(addr));
        }
    }
});
