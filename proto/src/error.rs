//! Error chains, printed one way by every livesnap binary and sent whole across gRPC.
//!
//! An error's message says what failed; its `source()` says why. An operator must read every
//! cause ("Cannot write the snapshot record: No space left on device"), so binaries print
//! [`chain`] and the gRPC adapters answer with [`status`], never with the top message alone.

use std::error::Error;

/// `e` and its causes, `: `-separated. A cause whose text the chain already holds is left out
/// (some errors, tonic's transport errors among them, repeat their source in their own message).
pub fn chain(e: &dyn Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// A gRPC status with `code` whose message is the whole chain of `e`.
pub fn status(code: tonic::Code, e: &dyn Error) -> tonic::Status {
    tonic::Status::new(code, chain(e))
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    const ENOSPC: i32 = 28;

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot write the snapshot record")]
    struct Outer(#[source] io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot open `x`: {0}")]
    struct Repeats(#[source] io::Error);

    #[test]
    fn chain_holds_every_cause_once() {
        let e = Outer(io::Error::from_raw_os_error(ENOSPC));
        assert_eq!(chain(&e), "Cannot write the snapshot record: No space left on device (os error 28)");
        let e = Repeats(io::Error::new(io::ErrorKind::NotFound, "gone"));
        assert_eq!(chain(&e), "Cannot open `x`: gone");
    }

    #[test]
    fn status_carries_the_chain_and_the_code() {
        let s = status(tonic::Code::ResourceExhausted, &Outer(io::Error::from_raw_os_error(ENOSPC)));
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(s.message().ends_with("No space left on device (os error 28)"), "{}", s.message());
    }
}
