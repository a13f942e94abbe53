//! The client side of a session after the connection is made: the
//! greeting, EHLO/HELO/LHLO, and one mail transaction (MAIL, RCPT, DATA)
//! for SMTP and LMTP alike.

use std::borrow::Cow;

use tokio::fs::File;

use tambo_common::address;

use super::conn::{Conn, ConnError};
use super::data::send_message;
use super::failure::{Failure, Stage};
use super::reply::Reply;

/// What the server offered in its EHLO/LHLO reply. All false after HELO.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extensions {
    pub starttls: bool,
    pub smtputf8: bool,
    pub eightbitmime: bool,
}

impl Extensions {
    /// Reads the keywords of an EHLO reply (every line but the first).
    pub fn parse(reply: &Reply) -> Self {
        let mut ext = Extensions::default();
        for line in reply.lines().skip(1) {
            let keyword = line.split_ascii_whitespace().next().unwrap_or("");
            if keyword.eq_ignore_ascii_case("STARTTLS") {
                ext.starttls = true;
            } else if keyword.eq_ignore_ascii_case("SMTPUTF8") {
                ext.smtputf8 = true;
            } else if keyword.eq_ignore_ascii_case("8BITMIME") {
                ext.eightbitmime = true;
            }
        }
        ext
    }
}

/// SMTP or LMTP: they differ in the greeting command and in the replies
/// after the data (one, or one per accepted recipient).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Smtp,
    Lmtp,
}

/// Reads the server's greeting: 2xx, else a failure.
pub async fn greeting(conn: &mut Conn, host: &str) -> Result<(), Failure> {
    match conn.read_reply().await {
        Ok(r) if r.is_positive() => Ok(()),
        Ok(r) => Err(Failure::reply(Stage::Greeting, &r, host)),
        Err(e) => Err(Failure::conn(Stage::Greeting, &e, host)),
    }
}

/// `EHLO <name>`, or `HELO <name>` if the server refuses EHLO with a 5xx
/// (it may predate ESMTP); LMTP has only `LHLO`.
pub async fn hello(
    conn: &mut Conn,
    protocol: Protocol,
    name: &str,
    host: &str,
) -> Result<Extensions, Failure> {
    let verb = match protocol {
        Protocol::Smtp => "EHLO",
        Protocol::Lmtp => "LHLO",
    };
    let reply = conn
        .command(&format!("{verb} {name}"))
        .await
        .map_err(|e| Failure::conn(Stage::Hello(verb), &e, host))?;
    if reply.is_positive() {
        return Ok(Extensions::parse(&reply));
    }
    if protocol == Protocol::Lmtp || !reply.is_permanent() {
        return Err(Failure::reply(Stage::Hello(verb), &reply, host));
    }
    let stage = Stage::Hello("HELO");
    match conn.command(&format!("HELO {name}")).await {
        Ok(r) if r.is_positive() => Ok(Extensions::default()),
        Ok(r) => Err(Failure::reply(stage, &r, host)),
        Err(e) => Err(Failure::conn(stage, &e, host)),
    }
}

/// How an address goes on the wire, given whether the server takes
/// SMTPUTF8 (REFERENCE §4.5): ASCII as is; non-ASCII as is with the flag
/// if it does; else a non-ASCII domain is IDNA-encoded, and a non-ASCII
/// local part cannot be sent at all. The bool says whether the address
/// needs the SMTPUTF8 flag. The error is the reason, permanent.
pub fn wire_address(addr: &str, smtputf8: bool) -> Result<(Cow<'_, str>, bool), String> {
    // Addresses come from queued, which took them from smtpd's checked
    // commands; still, nothing that could end or split a command line may
    // reach the wire.
    if addr
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '<' || c == '>')
    {
        return Err(format!("5.1.3 invalid address {addr:?}"));
    }
    if addr.is_ascii() {
        return Ok((Cow::Borrowed(addr), false));
    }
    if smtputf8 {
        return Ok((Cow::Borrowed(addr), true));
    }
    let (user, domain) = address::split(addr);
    if !user.is_ascii() {
        return Err(format!(
            "5.6.7 the server does not support SMTPUTF8, which the non-ASCII local part of {addr} needs"
        ));
    }
    match idna::domain_to_ascii(domain) {
        Ok(d) if !d.is_empty() => Ok((Cow::Owned(format!("{user}@{d}")), false)),
        _ => Err(format!(
            "5.1.3 the domain of {addr} is not a valid internationalised domain name"
        )),
    }
}

/// How one transaction went.
#[derive(Debug)]
pub enum Transaction {
    /// Failed before any recipient had an answer of its own (MAIL, or
    /// the sender's address). Temporary exactly when MAIL got no answer
    /// or a 4xx: on a cached connection that may only mean it was closed
    /// or limited while idle, not that the server refused anything.
    Whole { failure: Failure },
    /// One result per recipient, in order. `reusable`: the server took
    /// the message and the session is ready for another transaction.
    Each {
        results: Vec<Result<(), Failure>>,
        reusable: bool,
        /// Per recipient: the whole message, final dot included, went
        /// out for it, and the connection failed before the server's
        /// answer. The server may have taken it: sending it elsewhere
        /// now could deliver it twice.
        in_doubt: Vec<bool>,
    },
}

/// Runs MAIL FROM, one RCPT TO per recipient, and DATA if any recipient
/// was accepted. The message is read from its start.
pub async fn transaction(
    conn: &mut Conn,
    ext: Extensions,
    protocol: Protocol,
    from: &str,
    to: &[String],
    message: &mut File,
    host: &str,
) -> Transaction {
    // The null sender is "" in a job; "<>" is taken to mean it too.
    let from = if from == "<>" { "" } else { from };
    let (from, mut utf8) = match wire_address(from, ext.smtputf8) {
        Ok(v) => v,
        Err(why) => {
            return Transaction::Whole {
                failure: Failure::permanent(format!("{}: {why} ({host})", Stage::Mail)),
            };
        }
    };
    // Each recipient: its wire form, or its final result already.
    let mut results: Vec<Option<Result<(), Failure>>> = Vec::with_capacity(to.len());
    let mut wire = Vec::with_capacity(to.len());
    for addr in to {
        match wire_address(addr, ext.smtputf8) {
            Ok((w, needs)) => {
                utf8 |= needs;
                wire.push(Some(w));
                results.push(None);
            }
            Err(why) => {
                wire.push(None);
                let text = format!("{}: {why} ({host})", Stage::Rcpt);
                results.push(Some(Err(Failure::permanent(text))));
            }
        }
    }
    let finished = |results: Vec<Option<Result<(), Failure>>>, reusable| Transaction::Each {
        in_doubt: vec![false; results.len()],
        results: results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect(),
        reusable,
    };
    if wire.iter().all(Option::is_none) {
        return finished(results, false);
    }

    let mut mail = format!("MAIL FROM:<{from}>");
    if ext.eightbitmime {
        mail.push_str(" BODY=8BITMIME");
    }
    if utf8 {
        mail.push_str(" SMTPUTF8");
    }
    match conn.command(&mail).await {
        Ok(r) if r.is_positive() => {}
        Ok(r) => {
            return Transaction::Whole {
                failure: Failure::reply(Stage::Mail, &r, host),
            };
        }
        Err(e) => {
            return Transaction::Whole {
                failure: Failure::conn(Stage::Mail, &e, host),
            };
        }
    }

    // Accepted recipients, by index, in RCPT order.
    let mut accepted = Vec::new();
    for (i, w) in wire.iter().enumerate() {
        let Some(w) = w else { continue };
        match conn.command(&format!("RCPT TO:<{w}>")).await {
            Ok(r) if r.is_positive() => accepted.push(i),
            Ok(r) => results[i] = Some(Err(Failure::reply(Stage::Rcpt, &r, host))),
            Err(e) => {
                // Every recipient still open shares the fate of the session.
                fill(&mut results, Failure::conn(Stage::Rcpt, &e, host));
                return finished(results, false);
            }
        }
    }
    if accepted.is_empty() {
        return finished(results, false);
    }

    match conn.command("DATA").await {
        Ok(r) if r.is_intermediate() => {}
        Ok(r) => {
            fill(&mut results, Failure::reply(Stage::Data, &r, host));
            return finished(results, false);
        }
        Err(e) => {
            fill(&mut results, Failure::conn(Stage::Data, &e, host));
            return finished(results, false);
        }
    }
    if let Err(e) = send_message(conn, message).await {
        // Cut off inside the data: anything sent now would be data.
        conn.set_broken();
        fill(&mut results, Failure::conn(Stage::Data, &e, host));
        return finished(results, false);
    }
    // From here the server has the whole message: a lost connection
    // leaves every recipient still without an answer in doubt.
    let lost = |results: Vec<Option<Result<(), Failure>>>, e: &ConnError| {
        let failure = Failure::temporary(format!(
            "{}: connection lost after the message was sent ({e}); will retry ({host})",
            Stage::EndOfData
        ));
        let in_doubt = results.iter().map(Option::is_none).collect();
        Transaction::Each {
            results: results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(failure.clone())))
                .collect(),
            reusable: false,
            in_doubt,
        }
    };

    match protocol {
        Protocol::Smtp => match conn.read_reply().await {
            Ok(r) if r.is_positive() => {
                fill_ok(&mut results);
                finished(results, true)
            }
            Ok(r) => {
                fill(&mut results, Failure::reply(Stage::EndOfData, &r, host));
                finished(results, false)
            }
            Err(e) => lost(results, &e),
        },
        // RFC 2033 §4.2: one reply per accepted recipient, in RCPT order.
        Protocol::Lmtp => {
            for i in accepted {
                match conn.read_reply().await {
                    Ok(r) if r.is_positive() => results[i] = Some(Ok(())),
                    Ok(r) => results[i] = Some(Err(Failure::reply(Stage::EndOfData, &r, host))),
                    Err(e) => return lost(results, &e),
                }
            }
            finished(results, true)
        }
    }
}

/// Gives every recipient without a result yet this failure.
fn fill(results: &mut [Option<Result<(), Failure>>], failure: Failure) {
    for r in results.iter_mut().filter(|r| r.is_none()) {
        *r = Some(Err(failure.clone()));
    }
}

/// Every recipient without a result yet was delivered.
fn fill_ok(results: &mut [Option<Result<(), Failure>>]) {
    for r in results.iter_mut().filter(|r| r.is_none()) {
        *r = Some(Ok(()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions() {
        let r = Reply {
            code: 250,
            text: "mx.test hi\nsmtputf8\n8BITMIME\nSTARTTLS\nSIZE 100".into(),
        };
        let e = Extensions::parse(&r);
        assert!(e.starttls && e.smtputf8 && e.eightbitmime);
        // The first line is the server's name, never an extension.
        let r = Reply {
            code: 250,
            text: "STARTTLS".into(),
        };
        assert_eq!(Extensions::parse(&r), Extensions::default());
    }

    #[test]
    fn addresses_on_the_wire() {
        let w = |a, u| wire_address(a, u).map(|(s, n)| (s.into_owned(), n));
        assert_eq!(w("a@b.example", false), Ok(("a@b.example".into(), false)));
        assert_eq!(w("", false), Ok(("".into(), false)));
        assert_eq!(w("ñ@b.example", true), Ok(("ñ@b.example".into(), true)));
        assert_eq!(
            w("a@ñ.example", false),
            Ok(("a@xn--ida.example".into(), false))
        );
        assert_eq!(w("a@ñ.example", true), Ok(("a@ñ.example".into(), true)));
        assert!(w("ñ@b.example", false).unwrap_err().starts_with("5.6.7 "));
        assert!(
            w("a@b.example>\r\nRSET", true)
                .unwrap_err()
                .starts_with("5.1.3 ")
        );
        assert!(w("a b@c", true).is_err());
    }
}
