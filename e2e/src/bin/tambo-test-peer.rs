//! A hostile IPC peer for the end-to-end tests, run as another user (the
//! tests start it with `Command::uid`/`gid`), so the kernel reports a
//! different uid than the role it claims.
//!
//! ```text
//! tambo-test-peer client <socket> <claimed role> <expected server role>
//!     Connects, says hello as <claimed role>. Prints one line:
//!     "accepted", or "refused: <why>". If accepted as deliverd, also
//!     sends Ready and waits up to 3 s for a job: "job received" or
//!     "no job".
//! tambo-test-peer serve <socket> <role> <marker path>
//!     Binds <socket> (mode 0777) and answers every connection as <role>
//!     without waiting to be checked: Hello, then (to a deliverd) a pipe
//!     job `touch <marker path>`. Prints one line per connection:
//!     "client hung up" if the client left without a word.
//! tambo-test-peer hold <socket> <count> [<claimed role>]
//!     Keeps <count> connections to <socket> open: each one the server
//!     closes is opened again within 100 ms, until killed. Says nothing on
//!     them, or, given a role, a hello as that role. Prints "holding
//!     <count>" once all are open at the same time, then "reopened <n>"
//!     for every 1000 reopened.
//! tambo-test-peer attack <role> <config_dir> <attempt>...
//!     Locks itself down exactly as the daemon of <role> does (the same
//!     `tambo_common::sandbox::lock_down` call on the same config), then
//!     plays that daemon compromised: each attempt is `open:<path>`,
//!     `list:<dir>`, `write:<path>`, `exec:<path>`, `tcp:<ip:port>`,
//!     `udp`, `vsock` or `abstract:<name>` (connect to an abstract Unix
//!     socket), and prints one line `<attempt>: ok` or `<attempt>: <ERRNO>`.
//! tambo-test-peer handed
//!     Plays a program handed a queued message on its stdin (an MDA, a
//!     pipe command, deliverd itself): reads it, and tries to read the
//!     item queued keeps on the file (`user.tambo.item`). Prints
//!     `read: <bytes>` or `read: <ERRNO>`, then `item: ok` or
//!     `item: <ERRNO>`.
//! ```
#![forbid(unsafe_code)]

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tambo_proto::deliver::{FromDeliverd, Job, Target, ToDeliverd};
use tambo_proto::frame::{encode, read_frame, write_frame};
use tambo_proto::hello::Hello;
use tambo_proto::{PROTOCOL_VERSION, Role};

fn role(name: &str) -> Role {
    match name {
        "smtpd" => Role::Smtpd,
        "queued" => Role::Queued,
        "deliverd" => Role::Deliverd,
        "monitord" => Role::Monitord,
        "ctl" => Role::Ctl,
        other => panic!("unknown role {other}"),
    }
}

/// Says hello as `me` without checking who answers: the attacker does not
/// care.
async fn client(socket: &Path, me: Role, expect: Role) {
    let mut s = match tokio::net::UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) => {
            println!("refused: {e}");
            return;
        }
    };
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        role: me,
    };
    // A server that refuses at accept may close before the hello is even
    // written: that is a refusal too, and no job can follow.
    if let Err(e) = write_frame(&mut s, &hello).await {
        println!("refused: {e}");
        if me == Role::Deliverd {
            println!("no job");
        }
        return;
    }
    match tokio::time::timeout(Duration::from_secs(10), read_frame::<_, Hello>(&mut s)).await {
        Ok(Ok(Some(h))) if h.role == expect => println!("accepted"),
        Ok(Ok(Some(h))) => println!("refused: answered as {:?}", h.role),
        Ok(Ok(None)) => println!("refused: closed"),
        Ok(Err(e)) => println!("refused: {e}"),
        Err(_) => println!("refused: no answer"),
    }
    if me != Role::Deliverd {
        return;
    }
    if write_frame(&mut s, &FromDeliverd::Ready { slots: 1 })
        .await
        .is_err()
    {
        println!("no job");
        return;
    }
    let mut r = tambo_proto::fd::FdReader::new(s);
    match tokio::time::timeout(
        Duration::from_secs(3),
        r.read_frame::<ToDeliverd>(tambo_proto::frame::MAX_SMALL_FRAME),
    )
    .await
    {
        Ok(Ok(Some(_))) => println!("job received"),
        _ => println!("no job"),
    }
}

/// A stranger trying to take every connection slot of a server: silent
/// connections, put back as soon as the server drops them.
async fn hold(socket: &Path, count: usize, claim: Option<Role>) {
    use tokio::net::UnixStream;
    async fn open(socket: &Path, claim: Option<Role>) -> UnixStream {
        loop {
            // A full backlog (EAGAIN) or a server restarting: try again.
            let Ok(mut s) = UnixStream::connect(socket).await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            if let Some(role) = claim {
                let hello = Hello {
                    protocol_version: PROTOCOL_VERSION,
                    role,
                };
                // Already closed: noticed on the next sweep.
                let _ = write_frame(&mut s, &hello).await;
            }
            return s;
        }
    }
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        conns.push(open(socket, claim).await);
    }
    println!("holding {count}");
    let mut reopened: u64 = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for c in &mut conns {
            let mut b = [0u8; 16];
            // A stranger gets no answer: a read that does not wait means
            // the server closed the connection.
            match c.try_read(&mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                _ => {}
            }
            *c = open(socket, claim).await;
            reopened += 1;
            if reopened.is_multiple_of(1000) {
                println!("reopened {reopened}");
            }
        }
    }
}

async fn serve(socket: &Path, me: Role, marker: &Path) {
    let _ = std::fs::remove_file(socket);
    let l = tokio::net::UnixListener::bind(socket).expect("bind");
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    println!("listening");
    let job_body = tempfile::tempfile().expect("a temp file for the job's fd");
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        // Answer at once, as an impostor would, and push a job.
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            role: me,
        };
        let _ = write_frame(&mut s, &hello).await;
        let job = ToDeliverd::Job(Job {
            job: 1,
            queue_id: "pwned".into(),
            from: String::new(),
            to: vec!["x@example.test".into()],
            target: Target::Pipe(format!("/usr/bin/touch {}", marker.display())),
            security: None,
            maybe_delivered: false,
            positions: Vec::new(),
        });
        if let Ok(bytes) = encode(&job) {
            let _ = tambo_proto::fd::send_with_fd(&s, &bytes, job_body.as_fd()).await;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut s, &mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => println!("client hung up"),
            Ok(Ok(_)) => println!("client spoke"),
            Err(_) => println!("client silent"),
        }
    }
}

/// `attack`: lock down as `role`, then try each of `attempts`.
fn attack(role: Role, config_dir: &Path, attempts: &[String]) {
    let cfg = match tambo_common::config::Config::load(config_dir, None) {
        Ok(c) => c.resolve_paths(),
        Err(e) => {
            println!("config: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = tambo_common::sandbox::lock_down(role, &cfg) {
        println!("lock down: {e}");
        std::process::exit(2);
    }
    for a in attempts {
        let (what, arg) = a.split_once(':').unwrap_or((a.as_str(), ""));
        let r: std::io::Result<()> = match what {
            "open" => std::fs::File::open(arg).map(drop),
            "list" => std::fs::read_dir(arg).map(drop),
            "write" => std::fs::write(arg, b"planted"),
            "exec" => std::process::Command::new(arg).status().map(drop),
            "tcp" => std::net::TcpStream::connect(arg).map(drop),
            "udp" => std::net::UdpSocket::bind("127.0.0.1:0").map(drop),
            "vsock" => nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Vsock,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::empty(),
                None,
            )
            .map(drop)
            .map_err(std::io::Error::from),
            "abstract" => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(arg.as_bytes())
                    .and_then(|a| std::os::unix::net::UnixStream::connect_addr(&a))
                    .map(drop)
            }
            other => panic!("unknown attempt {other}"),
        };
        match r {
            Ok(()) => println!("{a}: ok"),
            Err(e) => match e.raw_os_error() {
                Some(n) => println!("{a}: {:?}", nix::errno::Errno::from_raw(n)),
                None => println!("{a}: {e}"),
            },
        }
    }
}

/// `handed`: what a program given a message on its stdin can read.
fn handed() {
    use std::io::Read;
    let mut body = Vec::new();
    match std::io::stdin().lock().read_to_end(&mut body) {
        Ok(n) => println!("read: {n}"),
        Err(e) => println!("read: {e}"),
    }
    let mut buf = vec![0u8; 64 * 1024];
    match rustix::fs::fgetxattr(std::io::stdin(), "user.tambo.item", &mut buf[..]) {
        Ok(_) => println!("item: ok"),
        Err(e) => println!("item: {:?}", nix::errno::Errno::from_raw(e.raw_os_error())),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("handed") {
        handed();
        return;
    }
    // Before any runtime thread: a Landlock domain covers the calling
    // thread and its later children only.
    if args.get(1).map(String::as_str) == Some("attack") && args.len() >= 4 {
        attack(role(&args[2]), Path::new(&args[3]), &args[4..]);
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match args.get(1).map(String::as_str) {
        Some("client") if args.len() == 5 => {
            rt.block_on(client(Path::new(&args[2]), role(&args[3]), role(&args[4])))
        }
        Some("hold") if args.len() == 4 || args.len() == 5 => match args[3].parse() {
            Ok(count) => rt.block_on(hold(
                Path::new(&args[2]),
                count,
                args.get(4).map(|r| role(r)),
            )),
            Err(e) => {
                eprintln!("hold: bad count {:?}: {e}", args[3]);
                std::process::exit(2);
            }
        },
        Some("serve") if args.len() == 5 => rt.block_on(serve(
            Path::new(&args[2]),
            role(&args[3]),
            Path::new(&args[4]),
        )),
        _ => {
            eprintln!("usage: see the top of e2e/src/bin/tambo-test-peer.rs");
            std::process::exit(2);
        }
    }
}
