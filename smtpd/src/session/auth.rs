//! AUTH PLAIN and AUTH LOGIN, only on TLS. smtpd only carries the exchange:
//! queued checks the password and, on success, binds the session's link to
//! the user, which is what lets it relay. Neither the response nor the
//! password is ever logged.

use tambo_proto::submit::{AuthVerdict, SubmitReply, SubmitRequest};

use super::{LineError, Next, Session};
use crate::sasl::{self, Credentials, SaslError};

impl Session {
    pub(super) async fn auth(&mut self, arg: &[u8]) -> Next {
        if self.tls.is_none() {
            self.reply(503, "5.7.10", "Encryption required: STARTTLS first");
            return Next::Continue;
        }
        if self.auth.is_some() {
            self.reply(503, "5.5.1", "Already authenticated");
            return Next::Continue;
        }
        if self.mail_from.is_some() {
            self.reply(
                503,
                "5.5.1",
                "AUTH is not allowed during a mail transaction",
            );
            return Next::Continue;
        }
        let arg = String::from_utf8_lossy(arg).into_owned();
        let mut words = arg.split_ascii_whitespace();
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(|w| w.as_bytes().to_vec());
        let creds = match mechanism.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(r) => r,
                    None => match self.challenge("").await {
                        Ok(r) => r,
                        Err(next) => return next,
                    },
                };
                sasl::decode_plain(&response)
            }
            "LOGIN" => match self.login(initial).await {
                Ok(c) => c,
                Err(next) => return next,
            },
            _ => {
                self.reply(534, "5.7.9", "Mechanism not supported (PLAIN or LOGIN)");
                return Next::Continue;
            }
        };
        let creds = match creds {
            Ok(c) => c,
            Err(SaslError::Cancelled) => {
                self.reply(501, "5.0.0", "Authentication cancelled");
                return Next::Continue;
            }
            Err(SaslError::Malformed) => {
                self.reply(501, "5.5.2", "Cannot decode the response");
                return Next::Continue;
            }
        };
        self.check(creds).await
    }

    /// AUTH LOGIN's two prompts (the user may come with the command).
    async fn login(
        &mut self,
        initial: Option<Vec<u8>>,
    ) -> Result<Result<Credentials, SaslError>, Next> {
        let user = match initial {
            Some(r) => r,
            None => self.challenge(sasl::LOGIN_USERNAME_PROMPT).await?,
        };
        let user = match sasl::decode_line(&user) {
            Ok(u) => u,
            Err(e) => return Ok(Err(e)),
        };
        let password = self.challenge(sasl::LOGIN_PASSWORD_PROMPT).await?;
        let password = match sasl::decode_line(&password) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        Ok(sasl::login_credentials(&user, &password))
    }

    /// Sends a `334` challenge and reads the client's one-line answer.
    async fn challenge(&mut self, text: &str) -> Result<Vec<u8>, Next> {
        self.reply(334, "", text);
        if self.flush().await.is_err() {
            return Err(Next::Close);
        }
        match self.next_line().await {
            Ok(line) => Ok(line),
            Err(LineError::Timeout) => {
                self.reply(
                    421,
                    "4.4.2",
                    "Timed out waiting for the AUTH response, closing",
                );
                Err(Next::Close)
            }
            Err(LineError::TooLong) => {
                self.reply(554, "5.5.2", "Line too long, closing");
                Err(Next::Close)
            }
            Err(LineError::QueueLost(_)) => Err(self.queue_lost()),
            Err(LineError::Eof | LineError::Io(_)) => Err(Next::Close),
        }
    }

    /// Asks queued, which pads every answer to the same duration.
    async fn check(&mut self, creds: Credentials) -> Next {
        if !self.open_link().await {
            return self.queue_lost();
        }
        let Some(queue) = self.queue.as_mut() else {
            return self.queue_lost();
        };
        let identity = creds.identity.clone();
        let req = SubmitRequest::Auth {
            identity: creds.identity,
            password: creds.password,
        };
        match queue.call(&req).await {
            Ok(SubmitReply::Auth(AuthVerdict::Accepted)) => {
                tracing::info!(peer = %self.peer, "auth succeeded for {}", identity.escape_debug());
                self.log_auth(&identity, true);
                self.auth = Some(identity);
                self.reply(235, "2.7.0", "Authentication successful");
                Next::Continue
            }
            Ok(SubmitReply::Auth(AuthVerdict::Invalid)) => {
                tracing::info!(peer = %self.peer, "auth failed for {}", identity.escape_debug());
                self.log_auth(&identity, false);
                self.reply(535, "5.7.8", "Authentication credentials invalid");
                Next::Continue
            }
            Ok(SubmitReply::Auth(AuthVerdict::Blocked)) => {
                tracing::info!(peer = %self.peer, "auth failed for {}: too many failures from this client", identity.escape_debug());
                self.log_auth(&identity, false);
                self.reply(454, "4.7.0", "Too many failed attempts, try again later");
                Next::Continue
            }
            Ok(SubmitReply::Auth(AuthVerdict::TempError)) => {
                self.reply(454, "4.7.0", "Temporary authentication failure");
                Next::Continue
            }
            Ok(other) => {
                tracing::warn!(peer = %self.peer, "queued answered AUTH with {other:?}");
                self.reply(454, "4.7.0", "Temporary authentication failure");
                Next::Continue
            }
            Err(e) => {
                tracing::error!(peer = %self.peer, "queued link failed at AUTH: {e}");
                self.queue_lost()
            }
        }
    }
}

impl Session {
    /// The mail log's `auth` line (REFERENCE §8).
    fn log_auth(&self, user: &str, ok: bool) {
        crate::maillog::log(tambo_proto::submit::MailLogEvent::Auth {
            client: self.peer.to_string(),
            user: user.to_string(),
            ok,
        });
    }
}
