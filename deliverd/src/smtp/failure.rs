//! Failure texts: what queued stores as a recipient's last error and puts
//! in the DSN, so each one names the stage, quotes the server's reply as
//! it came (the DSN takes the enhanced code from it) and names the host.

use std::fmt;

use tambo_proto::deliver::Outcome;

use super::conn::ConnError;
use super::reply::Reply;

/// Longest failure text kept; queued cuts at 1024 bytes anyway, and the
/// stage and host come first and last.
const MAX_TEXT: usize = 900;

/// Where in a session something failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Greeting,
    /// The greeting command as sent: `EHLO`, `HELO` or `LHLO`.
    Hello(&'static str),
    Mail,
    Rcpt,
    Data,
    /// The reply to the final `.`.
    EndOfData,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connect",
            Stage::Greeting => "greeting",
            Stage::Hello(verb) => verb,
            Stage::Mail => "MAIL FROM",
            Stage::Rcpt => "RCPT TO",
            Stage::Data => "DATA",
            Stage::EndOfData => "end of DATA",
        })
    }
}

/// A failed attempt, for one recipient or all of them. Permanent exactly
/// when a server said 5xx, or when no server could ever accept it (null
/// MX, a non-ASCII local part for a server without SMTPUTF8, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Temporary(String),
    Permanent(String),
}

impl Failure {
    pub fn temporary(text: impl Into<String>) -> Self {
        Failure::Temporary(clean(text.into()))
    }

    pub fn permanent(text: impl Into<String>) -> Self {
        Failure::Permanent(clean(text.into()))
    }

    /// `RCPT TO: 550 5.1.1 no such user (mx.example.org)`: permanent for
    /// 5xx, temporary for anything else.
    pub fn reply(stage: Stage, reply: &Reply, host: &str) -> Self {
        let text = format!("{stage}: {reply} ({host})");
        if reply.is_permanent() {
            Failure::permanent(text)
        } else {
            Failure::temporary(text)
        }
    }

    /// `DATA: connection closed by the server (mx.example.org)`: always
    /// temporary.
    pub fn conn(stage: Stage, err: &ConnError, host: &str) -> Self {
        Failure::temporary(format!("{stage}: {err} ({host})"))
    }

    pub fn is_permanent(&self) -> bool {
        matches!(self, Failure::Permanent(_))
    }

    pub fn text(&self) -> &str {
        match self {
            Failure::Temporary(t) | Failure::Permanent(t) => t,
        }
    }

    pub fn into_outcome(self) -> Outcome {
        match self {
            Failure::Temporary(t) => Outcome::TempFail(t),
            Failure::Permanent(t) => Outcome::PermFail(t),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

/// Control characters (a server's ANSI escapes, stray CRs) become spaces,
/// and the text is cut: it reaches logs, the queue and DSNs.
fn clean(text: String) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts() {
        let r = Reply {
            code: 550,
            text: "5.1.1 no such user".into(),
        };
        assert_eq!(
            Failure::reply(Stage::Rcpt, &r, "mx.example.org"),
            Failure::Permanent("RCPT TO: 550 5.1.1 no such user (mx.example.org)".into())
        );
        let r = Reply {
            code: 421,
            text: "4.3.2 bye\x1b[31m".into(),
        };
        assert_eq!(
            Failure::reply(Stage::Hello("EHLO"), &r, "mx"),
            Failure::Temporary("EHLO: 421 4.3.2 bye [31m (mx)".into())
        );
        assert_eq!(
            Failure::conn(Stage::Data, &ConnError::Closed, "mx"),
            Failure::Temporary("DATA: connection closed by the server (mx)".into())
        );
        let long = Failure::temporary("é".repeat(1000));
        assert!(long.text().len() <= MAX_TEXT + '…'.len_utf8());
    }
}
