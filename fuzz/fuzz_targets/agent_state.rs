//! The guest agent's state file (the freeze lease's record under /run), which a restarted
//! agent reads to thaw what it froze.
//!
//! Holds: no panic; a state that reads back, written again, reads back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livesnap_agent::lease::LeaseState;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(state) = LeaseState::decode(text) else { return };
    let again = state.encode();
    assert_eq!(LeaseState::decode(&again), Ok(state));
});
