//! `livesnap-agent`: see the crate's README and [`livesnap_agent`].

use clap::Parser;
use livesnap_agent::{args::Args, serve, sys::SysFreezer};

fn main() {
    // Logs go to stderr (journald under systemd), through a writer thread that drops lines
    // rather than block: while the guest is frozen, a journal on a frozen filesystem must not
    // stall the agent.
    let (writer, _guard) = tracing_appender::non_blocking(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIVESNAP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(writer)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(serve::run(args, SysFreezer)));
    if let Err(e) = result {
        let text = livesnap_proto::error::chain(&*e);
        tracing::error!("{text}");
        drop(_guard);
        eprintln!("livesnap-agent: {text}");
        std::process::exit(1);
    }
}
