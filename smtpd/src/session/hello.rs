//! HELO and EHLO.

use super::{Next, Session};

impl Session {
    pub(super) async fn hello(&mut self, esmtp: bool, arg: &[u8]) -> Next {
        let arg = String::from_utf8_lossy(arg);
        let Some(name) = arg.split_whitespace().next() else {
            self.reply(501, "", "Invalid domain name");
            return Next::Continue;
        };
        self.ehlo = Some(name.to_string());
        self.esmtp = esmtp;
        // RFC 5321 §4.1.4: HELO/EHLO clears the envelope.
        if !self.reset_envelope().await {
            return self.queue_lost();
        }
        if !esmtp {
            let text = format!("{} Hello", self.hostname);
            self.reply(250, "", &text);
            return Next::Continue;
        }
        let mut lines = vec![
            self.hostname.clone(),
            "8BITMIME".into(),
            "PIPELINING".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            format!("SIZE {}", self.cfg.max_data_size),
        ];
        // STARTTLS before TLS (when queued sent the certificates), AUTH on
        // TLS; never both.
        if self.tls.is_some() {
            lines.push("AUTH PLAIN LOGIN".into());
        } else if self.cfg.tls.as_ref().and_then(|t| t.acceptor()).is_some() {
            lines.push("STARTTLS".into());
        }
        lines.push("HELP".into());
        self.reply_multi(250, &lines);
        Next::Continue
    }
}
