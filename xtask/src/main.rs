//! livesnap's build tasks, run with `cargo run -p xtask -- TASK`.
//!
//! - `host-docs DIR`: the host package's man pages (`DIR/man/*.1`, one per command and
//!   subcommand) and shell completions (`DIR/completions/{bash,zsh,fish}/`) for livesnapd,
//!   snapctl and livesnap-blk, generated from their clap definitions (`ci/package-host.sh`).
//!   Nothing generated is checked in: the package always describes the binaries it holds.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap_complete::Shell;

/// The host binaries, by the name they are installed under.
fn commands() -> Vec<clap::Command> {
    vec![
        livesnap_control::daemon::args::command(),
        livesnap_control::cli::args::command(),
        livesnap_blk::args::command(),
    ]
}

/// Where each shell looks for a vendor's completions, and the file name it expects there.
fn completion_file(shell: Shell, bin: &str) -> PathBuf {
    match shell {
        Shell::Bash => PathBuf::from("bash").join(bin),
        Shell::Zsh => PathBuf::from("zsh").join(format!("_{bin}")),
        Shell::Fish => PathBuf::from("fish").join(format!("{bin}.fish")),
        _ => PathBuf::from(shell.to_string()).join(bin),
    }
}

const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

fn host_docs(out: &Path) -> Result<()> {
    let man = out.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("Cannot create {}", man.display()))?;
    for cmd in commands() {
        let bin = cmd.get_name().to_owned();
        clap_mangen::generate_to(cmd.clone(), &man).with_context(|| format!("Cannot write {bin}'s man pages"))?;
        for shell in SHELLS {
            let path = out.join("completions").join(completion_file(shell, &bin));
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
            }
            let mut file = std::fs::File::create(&path).with_context(|| format!("Cannot create {}", path.display()))?;
            clap_complete::generate(shell, &mut cmd.clone(), &bin, &mut file);
        }
    }
    Ok(())
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["host-docs", dir] => host_docs(Path::new(dir)),
        _ => bail!("usage: cargo run -p xtask -- host-docs DIR"),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_line_is_consistent() {
        // clap's own checks (conflicting names, a `requires` naming no argument...), which
        // otherwise run only when a binary parses in a debug build.
        for cmd in commands() {
            cmd.debug_assert();
        }
    }

    #[test]
    fn host_docs_cover_every_binary_and_subcommand() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        host_docs(dir)?;
        for page in [
            "livesnapd.1",
            "livesnapd-check-config.1",
            "snapctl.1",
            "snapctl-vm-snapshot.1",
            "snapctl-backup-restore.1",
            "snapctl-job-cancel.1",
            "livesnap-blk.1",
            "livesnap-blk-ctl.1",
            "livesnap-blk-ctl-begin.1",
            "livesnap-blk-recover.1",
        ] {
            let text = std::fs::read_to_string(dir.join("man").join(page)).with_context(|| page.to_owned())?;
            assert!(text.starts_with(".ie"), "{page} is not a man page: {text:.80}");
        }
        let blk = std::fs::read_to_string(dir.join("man/livesnap-blk.1"))?;
        assert!(blk.contains("config"), "livesnap-blk.1 lacks --config");
        for bin in ["livesnapd", "snapctl", "livesnap-blk"] {
            for shell in SHELLS {
                let path = dir.join("completions").join(completion_file(shell, bin));
                let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
                assert!(text.contains(bin), "{} does not complete {bin}", path.display());
            }
        }
        Ok(())
    }
}
