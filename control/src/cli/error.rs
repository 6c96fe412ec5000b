//! What can go wrong in a daemon command, and the exit code each maps to (control/README.md).

use std::process::ExitCode;

use tonic::Code;

/// snapctl's exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// The operation ran and failed: a snapshot's Failed event, damage found by verify, a
    /// reply snapctl cannot make sense of.
    Failed = 1,
    /// A usage error: clap's, or an argument snapctl or livesnapd refuses.
    Usage = 2,
    /// livesnapd cannot be reached (or refused the token).
    Unreachable = 3,
    /// No such VM, backup or disk.
    NotFound = 4,
    /// Refused for the current state: a job is running, the target file exists, no parent for
    /// an incremental backup...
    Refused = 5,
    /// Ctrl-C: snapctl stopped following; the job goes on in livesnapd.
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// The exit code a gRPC status from livesnapd maps to.
pub fn exit_for_code(code: Code) -> Exit {
    match code {
        Code::Ok => Exit::Ok,
        Code::NotFound => Exit::NotFound,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => Exit::Refused,
        Code::InvalidArgument | Code::OutOfRange => Exit::Usage,
        Code::Unauthenticated | Code::PermissionDenied => Exit::Unreachable,
        Code::Cancelled
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Unimplemented
        | Code::Internal
        | Code::Unavailable
        | Code::DataLoss => Exit::Failed,
    }
}

/// A daemon command's failure. Each message says what to do where there is something to do;
/// none repeats a cause another part of it already gives.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "livesnapd is not running at {path} ({why}); start it with `livesnapd --config \
         /etc/livesnap/livesnapd.toml`, or name its socket with --socket or LIVESNAP_SOCKET"
    )]
    NotRunning { path: String, why: &'static str },
    #[error("Cannot reach livesnapd at {target}: {reason}")]
    Unreachable { target: String, reason: String },
    /// A file named on the command line cannot be read (`what`: "token file").
    #[error("Cannot read the {what} {}", path.display())]
    ReadFile {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    /// livesnapd answered with an error.
    #[error("{action}: {message}")]
    Status { action: String, code: Code, message: String },
    #[error("{action}: lost the connection to livesnapd at {target}: {reason}")]
    ConnectionLost { action: String, target: String, reason: String },
    /// A reply that breaks the API's rules.
    #[error("{action}: {reason}")]
    BadReply { action: String, reason: String },
    #[error(
        "Stopped following the snapshot of {vm}; livesnapd goes on with job {job}: see `snapctl vm list` \
         and `snapctl backup list {vm}`"
    )]
    Detached { job: String, vm: String },
    /// Ctrl-C while following a live restore: the job goes on.
    #[error(
        "Stopped following live restore job {job}; livesnapd goes on feeding {target}: see `snapctl job show {job}`"
    )]
    LiveDetached { job: String, target: String },
    /// Ctrl-C cannot be watched for.
    #[error("Cannot handle Ctrl-C")]
    Signal(#[source] std::io::Error),
    /// snapctl's own runtime cannot start.
    #[error("Cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    /// A snapshot's Failed event: `code` is its gRPC code.
    #[error("{message}")]
    SnapshotFailed { message: String, code: i32 },
    /// The operation ran and failed; what to say was already printed or is in the message.
    #[error("{0}")]
    Failed(String),
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::NotRunning { .. } | Error::Unreachable { .. } | Error::ConnectionLost { .. } => Exit::Unreachable,
            Error::Usage(_) | Error::ReadFile { .. } => Exit::Usage,
            Error::Status { code, .. } => exit_for_code(*code),
            Error::BadReply { .. } | Error::Failed(_) | Error::Signal(_) | Error::Runtime(_) => Exit::Failed,
            Error::Detached { .. } | Error::LiveDetached { .. } => Exit::Interrupted,
            // A refusal found during the job (quiesce required, the agent unreachable) exits
            // like the same refusal before the stream; any other failure is a failure.
            Error::SnapshotFailed { code, .. } => match exit_for_code(Code::from_i32(*code)) {
                e @ (Exit::Refused | Exit::NotFound) => e,
                _ => Exit::Failed,
            },
        }
    }

    /// `status` from a call to livesnapd at `target` while doing `action` ("cannot list VMs").
    ///
    /// tonic turns a broken connection into a status whose message repeats its source chain;
    /// such a status (it has a source: the ones decoded from livesnapd's replies never do)
    /// becomes `ConnectionLost` with the innermost cause only.
    pub fn from_status(action: impl Into<String>, target: &str, status: &tonic::Status) -> Error {
        let action = action.into();
        if let Some(src) = std::error::Error::source(status) {
            return Error::ConnectionLost { action, target: target.to_owned(), reason: innermost(src) };
        }
        let message = match status.message().trim() {
            "" => describe(status.code()).to_owned(),
            m => super::render::clean(m),
        };
        let message = match status.code() {
            Code::Unauthenticated => format!("{message} (livesnapd wants its token: --token-file FILE)"),
            Code::PermissionDenied => format!("{message} (livesnapd refused the request; check --token-file)"),
            Code::Unimplemented => {
                format!("{message} (this livesnapd does not know the call: is it older than snapctl?)")
            }
            _ => message,
        };
        Error::Status { action, code: status.code(), message }
    }
}

/// The last error of a source chain, the one that says what happened (tonic's and hyper's
/// wrappers repeat it or say only "transport error").
pub fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(s) = last.source() {
        last = s;
    }
    super::render::clean(&last.to_string())
}

/// What a code means, for a status that came without a message.
pub fn describe(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "refused in the current state",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "not implemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// A code's name as JSON carries it ("failed_precondition").
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}
