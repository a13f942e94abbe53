//! A DNS server on loopback serving TXT records given on the command
//! line, for the benchmarks (bench/inbound.sh), which must not ask the
//! real DNS for the senders' SPF records either. Not installed.
//!
//!     tambo-test-dns NAME=TEXT...
//!
//! Prints the address it listens on (UDP and TCP), then serves until
//! killed.

use tambo_e2e::dns::TestDns;

fn main() {
    let dns = TestDns::start();
    for arg in std::env::args().skip(1) {
        let Some((name, text)) = arg.split_once('=') else {
            eprintln!("usage: tambo-test-dns NAME=TEXT...");
            std::process::exit(2);
        };
        dns.add_txt(name, text);
    }
    println!("{}", dns.addr());
    loop {
        std::thread::park();
    }
}
