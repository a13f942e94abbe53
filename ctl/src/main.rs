//! tambo: runs the whole system (`tambo run`, `tambo dev`) as the
//! supervisor of its four daemons, and the admin commands (REFERENCE §9).
//!
//! Holds: nothing of the mail itself; it creates the daemons' sockets,
//! starts the daemons and restarts any that dies.
//! Must never: read the queue or keys, or speak SMTP. The admin commands run
//! as the admin, apart from the supervisor: `dkim-keygen` writes a DKIM key
//! and `dkim-dns` reads one, to print its public half.
#![forbid(unsafe_code)]

mod admin;
mod check;
mod dev;
mod dkim;
mod dkimverify;
mod import;
mod sendmail;
mod supervisor;
mod users;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

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
        /// TOML applied on top of the dev config (e.g. `[testing]
        /// dns_server`, as the tests use), as for `tambo run`.
        #[arg(long = "config_overrides", alias = "config-overrides")]
        config_overrides: Option<String>,
    },
    /// Generates a DKIM key for a domain and prints its DNS record.
    ///
    /// The key is written as PKCS#8 PEM with mode 0660, by default to
    /// domains/<domain>/dkim:<selector>.pem, never over an existing file.
    DkimKeygen {
        #[command(flatten)]
        config: ConfigDir,
        /// The domain the key signs for.
        domain: String,
        /// The selector [default: today's UTC date, YYYYMMDD].
        selector: Option<String>,
        /// Where to write the key [default: domains/<domain>/dkim:<selector>.pem].
        key_path: Option<PathBuf>,
        /// The kind of key.
        #[arg(long, value_enum, default_value = "rsa3072")]
        algo: dkim::Algorithm,
    },
    /// Adds a user, or replaces one, in domains/<domain>/users (creating the
    /// domain directory if needed). Without --password it asks twice on the
    /// terminal, or reads one line of standard input.
    UserAdd {
        #[command(flatten)]
        config: ConfigDir,
        /// The user, as user@domain.
        address: String,
        /// The password (visible to other users in the process list: prefer
        /// the prompt or standard input).
        #[arg(long)]
        password: Option<String>,
        /// The user receives mail but never authenticates.
        #[arg(long = "receive_only", alias = "receive-only")]
        receive_only: bool,
    },
    /// Removes a user from domains/<domain>/users.
    UserRemove {
        #[command(flatten)]
        config: ConfigDir,
        /// The user, as user@domain.
        address: String,
    },
    /// Checks a password against the users file (not Dovecot); exits 1 if
    /// it does not match.
    Authenticate {
        #[command(flatten)]
        config: ConfigDir,
        /// The user, as user@domain.
        address: String,
        /// The password [default: asked on the terminal, or one line of
        /// standard input].
        #[arg(long)]
        password: Option<String>,
    },
    /// Loads a domain's users file and prints how many users it has.
    CheckUserdb {
        #[command(flatten)]
        config: ConfigDir,
        /// The domain.
        domain: String,
    },
    /// Prints the effective configuration, defaults included, as TOML.
    PrintConfig {
        #[command(flatten)]
        config: ConfigDir,
    },
    /// Checks a configuration directory as the daemons will read it at
    /// startup (config, domains, users, aliases, DKIM keys, certificates);
    /// exits 1 with their one-line errors if they would not start.
    CheckConfig {
        #[command(flatten)]
        config: ConfigDir,
    },
    /// Asks the running queued what an address resolves to: one line per
    /// result, its type ((email), (pipe), (forward)) and address.
    AliasesResolve {
        #[command(flatten)]
        config: ConfigDir,
        /// The address.
        address: String,
    },
    /// Asks the running queued to forget a domain's security levels (both
    /// directions back to plain). Silent on success.
    DomaininfoRemove {
        #[command(flatten)]
        config: ConfigDir,
        /// The domain.
        domain: String,
    },
    /// The running queue: lists it (the default), tries an item now, or
    /// removes one.
    Queue {
        #[command(flatten)]
        config: ConfigDir,
        #[command(subcommand)]
        action: Option<QueueAction>,
    },
    /// Submits a message from standard input, as sendmail(8) does: -t,
    /// -i/-oi, -f, -F, -C <config_dir>, recipients after the options or
    /// after --. Installed as /usr/sbin/sendmail, it is run by that name.
    /// Exits with sysexits.h codes; 75 (try again later) when queued is
    /// not running.
    Sendmail {
        /// sendmail's options and the recipients.
        #[arg(allow_hyphen_values = true, trailing_var_arg = true, num_args = 0..)]
        args: Vec<String>,
    },
    /// Lists the queue (`tambo queue list`; as root). Installed as mailq.
    Mailq {
        #[command(flatten)]
        config: ConfigDir,
    },
    /// Prints the DKIM-Signature field queued would add to the message on
    /// standard input (the domain defaults to its From: address's; the
    /// key to the domain's first dkim:*.pem).
    DkimSign {
        #[command(flatten)]
        config: ConfigDir,
        /// The signing domain [default: the From: address's].
        domain: Option<String>,
        /// The key's selector [default: the domain's first dkim:*.pem].
        selector: Option<String>,
        /// The key file [default: domains/<domain>/dkim:<selector>.pem].
        key_path: Option<PathBuf>,
    },
    /// Verifies the DKIM signatures of the message on standard input, as
    /// deliverd does, and prints the Authentication-Results header.
    DkimVerify {
        #[command(flatten)]
        config: ConfigDir,
        /// Use this key record for every signature instead of the DNS.
        #[arg(long)]
        txt: Option<String>,
        /// One more line per signature, with its result.
        #[arg(short)]
        v: bool,
    },
    /// Prints the DNS record (name, TXT, value) that publishes a DKIM key.
    DkimDns {
        #[command(flatten)]
        config: ConfigDir,
        /// The domain of the key.
        domain: String,
        /// The key's selector [default: the domain's first dkim:*.pem].
        selector: Option<String>,
        /// The key file [default: domains/<domain>/dkim:<selector>.pem].
        key_path: Option<PathBuf>,
    },
    /// Converts a chasquid configuration directory into a tambo one:
    /// chasquid.conf, users (passwords kept), aliases, DKIM keys,
    /// certificates, hooks and the domaininfo. Prints what it could not
    /// carry over. Never overwrites a file, never changes chasquid's.
    ImportChasquid {
        /// chasquid's configuration directory, e.g. /etc/chasquid (only read).
        chasquid_dir: PathBuf,
        /// The tambo configuration directory to write.
        #[arg(long, default_value = "/etc/tambo")]
        to: PathBuf,
    },
}

#[derive(Subcommand)]
enum QueueAction {
    /// Lists every item: ID, creation time, sender, recipients with their
    /// status, type, original address and last failure.
    List,
    /// Tries an item now instead of at its next retry (every item
    /// without an ID).
    Flush {
        /// The item's ID (as `tambo queue` and the mail log show it).
        id: Option<String>,
    },
    /// Takes an item out of the queue after the attempt under way, if
    /// any: its pending recipients fail and the sender gets a DSN (none
    /// with --silent).
    Remove {
        /// The item's ID.
        id: String,
        /// Drop it without telling the sender.
        #[arg(long)]
        silent: bool,
    },
}

/// `-C`/`--config_dir` of the admin commands.
#[derive(Args)]
struct ConfigDir {
    /// Configuration directory.
    #[arg(
        long = "config_dir",
        alias = "config-dir",
        short = 'C',
        default_value = "/etc/tambo"
    )]
    config_dir: PathBuf,
}

fn main() -> ExitCode {
    // Run as sendmail or mailq (the Debian package's alternatives), or
    // `tambo sendmail …`: sendmail's own option syntax, not clap's.
    let argv: Vec<String> = std::env::args().collect();
    let called = argv
        .first()
        .map(|a| {
            Path::new(a)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    match called.as_str() {
        "sendmail" => return sendmail::run(&argv[1..]),
        "mailq" => {
            let mut args = vec!["-bp".to_string()];
            args.extend(argv[1..].iter().cloned());
            return sendmail::run(&args);
        }
        _ => {}
    }
    if argv.get(1).map(String::as_str) == Some("sendmail")
        && !argv[2..].iter().any(|a| a == "--help" || a == "-h")
    {
        return sendmail::run(&argv[2..]);
    }
    // A usage error exits 1, as REFERENCE §9 asks (clap's own exit is 2).
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tambo_common::daemon::init_logging();
    tambo_common::daemon::restrict_umask();
    let admin = match cli.command {
        Command::DkimKeygen {
            config,
            domain,
            selector,
            key_path,
            algo,
        } => dkim::keygen(
            &config.config_dir,
            &domain,
            selector.as_deref(),
            key_path.as_deref(),
            algo,
        )
        .map_err(|e| e.to_string()),
        Command::DkimDns {
            config,
            domain,
            selector,
            key_path,
        } => dkim::dns(
            &config.config_dir,
            &domain,
            selector.as_deref(),
            key_path.as_deref(),
        )
        .map_err(|e| e.to_string()),
        Command::UserAdd {
            config,
            address,
            password,
            receive_only,
        } => users::add(&config.config_dir, &address, password, receive_only),
        Command::UserRemove { config, address } => users::remove(&config.config_dir, &address),
        Command::Authenticate {
            config,
            address,
            password,
        } => users::authenticate(&config.config_dir, &address, password),
        Command::CheckUserdb { config, domain } => users::check(&config.config_dir, &domain),
        Command::PrintConfig { config } => check::print(&config.config_dir),
        Command::DkimVerify { config, txt, v } => {
            let mut message = Vec::new();
            match std::io::Read::read_to_end(&mut std::io::stdin(), &mut message) {
                Ok(_) => dkimverify::verify(&config.config_dir, &message, txt, v),
                Err(e) => Err(format!("cannot read the message: {e}")),
            }
        }
        Command::DkimSign {
            config,
            domain,
            selector,
            key_path,
        } => {
            let mut message = Vec::new();
            match std::io::Read::read_to_end(&mut std::io::stdin(), &mut message) {
                Ok(_) => dkim::sign(
                    &config.config_dir,
                    &message,
                    domain.as_deref(),
                    selector.as_deref(),
                    key_path.as_deref(),
                )
                .map_err(|e| e.to_string()),
                Err(e) => Err(format!("cannot read the message: {e}")),
            }
        }
        Command::Sendmail { args } => return sendmail::run(&args),
        Command::Mailq { config } => {
            let dir = format!("--config_dir={}", config.config_dir.display());
            return sendmail::run(&["-bp".to_string(), dir]);
        }
        Command::AliasesResolve { config, address } => admin::ask(
            &config.config_dir,
            tambo_proto::submit::AdminRequest::AliasesResolve { address },
        ),
        Command::DomaininfoRemove { config, domain } => admin::ask(
            &config.config_dir,
            tambo_proto::submit::AdminRequest::DomaininfoRemove { domain },
        ),
        Command::Queue { config, action } => {
            use tambo_proto::submit::AdminRequest as A;
            let req = match action.unwrap_or(QueueAction::List) {
                QueueAction::List => A::QueueList,
                QueueAction::Flush { id } => A::QueueFlush { id },
                QueueAction::Remove { id, silent } => A::QueueRemove { id, silent },
            };
            admin::ask(&config.config_dir, req)
        }
        Command::CheckConfig { config } => check::check(&config.config_dir),
        Command::ImportChasquid { chasquid_dir, to } => import::run(&chasquid_dir, &to),
        Command::Run {
            config_dir,
            config_overrides,
        } => {
            return supervise(|inherited| async move {
                supervisor::run(&config_dir, config_overrides, inherited).await
            });
        }
        Command::Dev {
            state_dir,
            config_overrides,
        } => {
            return supervise(|inherited| async move {
                dev::run(&state_dir, config_overrides, inherited).await
            });
        }
    };
    // Not print!, which panics when stdout is closed.
    match admin.map(|out| std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes())) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("tambo: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tambo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `run` and `dev`: `start` runs the supervisor on its runtime.
fn supervise<F, Fut>(start: F) -> ExitCode
where
    F: FnOnce(tambo_proto::activation::Inherited) -> Fut,
    Fut: Future<Output = ExitCode>,
{
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
    rt.block_on(start(inherited))
}
