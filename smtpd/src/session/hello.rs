//! HELO and EHLO.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Next, Session};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
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
            let text = format!("{} Hello", self.cfg.hostname);
            self.reply(250, "", &text);
            return Next::Continue;
        }
        let lines = [
            self.cfg.hostname.clone(),
            "8BITMIME".into(),
            "PIPELINING".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            format!("SIZE {}", self.cfg.max_data_size),
            "HELP".into(),
        ];
        self.reply_multi(250, &lines);
        Next::Continue
    }
}
