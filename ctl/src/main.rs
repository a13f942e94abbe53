//! tambo: runs the whole system (`tambo run`, `tambo dev`) as the
//! supervisor of its four daemons; admin commands come later.
//!
//! Holds: nothing of the mail itself; it creates the daemons' sockets,
//! starts the daemons and restarts any that dies.
//! Must never: read the queue or keys, or speak SMTP.
#![forbid(unsafe_code)]

mod dev;
mod supervisor;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tambo", about = "tambo mail server", version = tambo_common::build::VERSION)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs every tambo daemon from a config directory, restarting any that
    /// dies, until SIGTERM or Ctrl-C.
    Run {
        /// Configuration directory.
        #[arg(
            long = "config_dir",
            alias = "config-dir",
            short = 'C',
            default_value = "/etc/tambo"
        )]
        config_dir: PathBuf,
        /// TOML applied on top of tambo.conf (passed to every daemon).
        #[arg(long = "config_overrides", alias = "config-overrides")]
        config_overrides: Option<String>,
    },
    /// Development mode: creates a config and state directory with a test
    /// domain and user, then runs everything as the current user.
    Dev {
        /// Where config, queue, sockets and mail go.
        #[arg(long = "state_dir", alias = "state-dir", default_value = ".tambo-dev")]
        state_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tambo_common::daemon::init_logging();
    tambo_common::daemon::restrict_umask();
    // Sockets systemd passed (for smtp_address = ["systemd"]) are taken
    // before the runtime opens descriptors of its own, so a wrong
    // LISTEN_FDS can never make us adopt one of those.
    let inherited = match tambo_proto::activation::Inherited::take() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("tambo: cannot take the sockets passed to tambo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tambo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match cli.command {
            Command::Run {
                config_dir,
                config_overrides,
            } => supervisor::run(&config_dir, config_overrides, inherited).await,
            Command::Dev { state_dir } => dev::run(&state_dir, inherited).await,
        }
    })
}
