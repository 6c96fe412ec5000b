//! A hook's output in the guest agent, from the pipe reads to the reply the host checks: the
//! bytes kept of stdout and stderr (bounded), their text, the failure message, the gRPC reply.
//!
//! Whatever a hook prints (any bytes, any name a file in the hooks directory can have, any
//! output limit the agent accepts), holds: no panic; at most the limit is kept of each
//! stream and "truncated" says whether more came; the host accepts the reply the agent builds
//! (a freeze aborted by the hook reaches the host as an abort with its report, not as an
//! invalid reply).
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use livesnap_agent::hooks::{keep, output_text, HookResult, Outcome, Phase, MAX_OUTPUT_LIMIT};
use livesnap_control::agent::{Error, Limits};
use livesnap_control::fuzzing::check_freeze;
use livesnap_proto::agent as pb;

/// The agent's default `--hook-output-limit`.
const DEFAULT_LIMIT: usize = 4096;

#[derive(Arbitrary, Debug)]
struct Input {
    name: Vec<u8>,
    phase: u8,
    outcome: u8,
    exit_code: Option<i32>,
    limit: Option<u16>,
    /// What the hook prints, each piece repeated (a hook printing in a loop).
    stdout: Vec<(Vec<u8>, u8)>,
    stderr: Vec<(Vec<u8>, u8)>,
    duration_ms: u32,
}

fn printed(pieces: &[(Vec<u8>, u8)]) -> Vec<u8> {
    pieces.iter().flat_map(|(p, n)| std::iter::repeat_n(p, usize::from(*n) + 1).flatten().copied()).collect()
}

fn capture(printed: &[u8], max: usize) -> (Vec<u8>, bool) {
    let mut kept = (Vec::new(), false);
    // A pipe read is at most 4 KiB (the agent's buffer).
    for piece in printed.chunks(4096) {
        keep(&mut kept, piece, max);
    }
    kept
}

fuzz_target!(|input: Input| {
    let max = input.limit.map_or(DEFAULT_LIMIT, |l| usize::from(l) % (MAX_OUTPUT_LIMIT + 1));
    let (stdout, stderr) = (printed(&input.stdout), printed(&input.stderr));
    let streams = [capture(&stdout, max), capture(&stderr, max)];
    for ((bytes, truncated), all) in streams.iter().zip([&stdout, &stderr]) {
        assert!(bytes.len() <= max);
        assert_eq!(bytes[..], all[..bytes.len()]);
        assert_eq!(*truncated, all.len() > max);
    }
    let (output, output_truncated) = output_text(&streams, max);

    // A file name: 1 to 255 bytes, no slash, no NUL.
    let mut name: Vec<u8> = input.name.into_iter().filter(|&b| b != b'/' && b != 0).take(255).collect();
    if name.is_empty() {
        name.push(b'h');
    }
    let phase = [Phase::Freeze, Phase::Thaw, Phase::FreezeFail][usize::from(input.phase % 3)];
    let outcome =
        [Outcome::Ok, Outcome::Failed, Outcome::TimedOut, Outcome::SpawnFailed][usize::from(input.outcome % 4)];
    let result = HookResult {
        name: String::from_utf8_lossy(&name).into_owned(),
        phase,
        outcome,
        exit_code: input.exit_code,
        output,
        output_truncated,
        duration: Duration::from_millis(u64::from(input.duration_ms)),
    };
    let failure = result.failure();
    assert_eq!(failure.is_some(), outcome != Outcome::Ok);

    let hook = livesnap_agent::fuzzing::hook_reply(&result);
    let reply = pb::FreezeReply {
        frozen: failure.is_none(),
        error: failure.clone().unwrap_or_default(),
        filesystems: Vec::new(),
        hooks: vec![hook],
        deadline_unix_ms: 1,
    };
    match check_freeze(&Limits::default(), reply) {
        Ok(r) => assert!(failure.is_none() && r.hooks[0].output == result.output),
        Err(Error::FreezeAborted { report, .. }) => {
            assert!(failure.is_some());
            assert_eq!(report.hooks[0].output, result.output);
        }
        Err(e) => panic!("the host refuses the agent's reply: {e:?}"),
    }
});
