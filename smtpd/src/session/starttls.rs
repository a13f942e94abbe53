//! STARTTLS on 25 and 587, and the implicit TLS of 465 (before the
//! greeting). The handshake's signatures are made by queued (see
//! [`crate::tls`]).

use tokio::io::AsyncWriteExt;

use tambo_proto::metrics::{self, names};

use super::{LazyReader, Next, Session, TlsInfo};
use crate::conn::Conn;

/// How long the 554 after a failed handshake may take to send.
const REPLY_AFTER_FAILURE: std::time::Duration = std::time::Duration::from_secs(5);

impl Session {
    /// 465: the handshake comes first (after the PROXY header, if any),
    /// under the first deadline. False if there is no TLS (yet) or the
    /// handshake failed: close, no reply.
    pub(super) async fn implicit_tls(&mut self) -> bool {
        let deadline = self.cfg.first_deadline;
        match tokio::time::timeout_at(self.first_deadline, self.handshake(false)).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::info!(peer = %self.peer, "TLS handshake failed on submission+TLS: {e}");
                false
            }
            Err(_) => {
                tracing::info!(peer = %self.peer, "no TLS handshake within the first {deadline:?}");
                false
            }
        }
    }

    pub(super) async fn starttls(&mut self, arg: &[u8]) -> Next {
        if self.tls.is_some() {
            self.reply(503, "5.5.1", "Already on TLS");
            return Next::Continue;
        }
        if !arg.is_empty() {
            self.reply(501, "5.5.4", "STARTTLS takes no argument");
            return Next::Continue;
        }
        if self.cfg.tls.as_ref().and_then(|t| t.acceptor()).is_none() {
            self.reply(454, "4.7.0", "TLS not available right now");
            return Next::Continue;
        }
        self.reply(220, "2.0.0", "Ready to start TLS");
        if self.flush().await.is_err() {
            return Next::Close;
        }
        let timeout = self.cfg.command_timeout;
        match tokio::time::timeout(timeout, self.handshake(true)).await {
            Ok(Ok(())) => {
                // RFC 3207 §4.2: start over, as if just connected, except
                // that the greeting is not sent again.
                self.ehlo = None;
                self.esmtp = false;
                self.mail_from = None;
                self.accepted.clear();
                self.rcpts = 0;
                self.spf = None;
                // A link to queued opened in plain text says so; drop it, and
                // the next MAIL opens one that says TLS.
                self.queue = None;
                Next::Continue
            }
            Ok(Err(e)) => {
                tracing::info!(peer = %self.peer, "STARTTLS handshake failed: {e}");
                Next::Close
            }
            Err(_) => {
                tracing::info!(peer = %self.peer, "STARTTLS handshake timed out");
                Next::Close
            }
        }
    }

    /// Runs the TLS handshake on the plain connection. Whatever the client
    /// sent after STARTTLS and before the handshake is dropped with the old
    /// buffer, unread (RFC 3207 §4.2, the CVE-2011-0411 class of command
    /// injection).
    ///
    /// After STARTTLS (`after_starttls`), a failed handshake gets
    /// `554 5.5.0` in plain text (REFERENCE §2.4, as chasquid does); on
    /// 465 there was never a plain-text dialogue, so nothing.
    async fn handshake(&mut self, after_starttls: bool) -> std::io::Result<()> {
        let Some((acceptor, resolver)) = self.cfg.tls.as_ref().and_then(|t| t.acceptor()) else {
            return Err(std::io::Error::other("no TLS certificates from queued yet"));
        };
        let old = std::mem::replace(&mut self.conn, LazyReader::new(Conn::Gone));
        let Conn::Plain(tcp) = old.into_inner() else {
            return Err(std::io::Error::other("not a plain connection"));
        };
        let stream = match acceptor.accept(tcp).into_fallible().await {
            Ok(stream) => stream,
            Err((e, mut tcp)) => {
                if after_starttls {
                    let reply = b"554 5.5.0 TLS handshake failed\r\n";
                    metrics::inc_label(names::SMTP_IN_RESPONSE_CODE_COUNT, "554");
                    let _ = tokio::time::timeout(REPLY_AFTER_FAILURE, tcp.write_all(reply)).await;
                }
                return Err(e);
            }
        };
        let (_, conn) = stream.get_ref();
        let (version, cipher) = crate::tls::describe(conn);
        // A name the client asked for and a certificate covers becomes this
        // session's host name (greeting, EHLO, Received).
        if let Some(sni) = conn.server_name()
            && resolver.covers(sni)
        {
            self.hostname = sni.to_ascii_lowercase();
        }
        tracing::debug!(peer = %self.peer, "TLS: {version}, {cipher}");
        self.tls = Some(TlsInfo { version, cipher });
        self.conn = LazyReader::new(Conn::Tls(Box::new(stream)));
        Ok(())
    }
}
