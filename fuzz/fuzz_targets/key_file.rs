//! Key files (`LSNAPKEY`: key id, KEK id, creation time, nonce, the data key wrapped by the
//! KEK with AES-256-GCM), as livesnapd and `livesnapd key` read them, opened with the fuzz KEK.
//!
//! Holds: no panic; a file that opens parses, and its key's id is the id its header names; a
//! file whose header does not parse never opens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livesnap_repo::fuzzing::open_key_file;

fuzz_target!(|data: &[u8]| {
    let (info, key) = open_key_file(data);
    match (info, key) {
        (Ok(info), Some(key)) => assert_eq!(info.key, key.id()),
        (Err(why), Some(key)) => panic!("key {} opened from a file that does not parse: {why}", key.id()),
        (_, None) => {}
    }
});
