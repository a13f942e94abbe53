//! The effective configuration as TOML (`tambo print-config`, and what a
//! daemon reports as its config): every key, defaults included, in the
//! syntax tambo.conf takes, so the output is itself a valid tambo.conf.

use std::time::Duration;

use toml::{Table, Value};

use super::{Config, ListenAddr};
use crate::duration;

fn s(v: impl ToString) -> Value {
    Value::String(v.to_string())
}

fn int(v: impl Into<u64>) -> Value {
    // Every count tambo takes fits; a value that would not reads as the
    // largest TOML integer rather than wrapping.
    Value::Integer(i64::try_from(v.into()).unwrap_or(i64::MAX))
}

fn list<T: std::fmt::Display>(items: &[T]) -> Value {
    Value::Array(items.iter().map(s).collect())
}

fn dur(d: Duration) -> Value {
    // The keys that take zero take it as "0s".
    if d.is_zero() {
        return s("0s");
    }
    s(duration::format(d))
}

fn listen(addrs: &[ListenAddr]) -> Value {
    list(addrs)
}

impl Config {
    /// Every setting, as TOML that [`Config::from_str`] reads back to the
    /// same configuration (the `[testing]` knobs only when set).
    pub fn to_toml(&self) -> String {
        let mut top = Table::new();
        top.insert("hostname".into(), s(&self.hostname));
        top.insert("max_data_size_mb".into(), int(self.max_data_size_mb));
        top.insert("smtp_address".into(), listen(&self.smtp_address));
        top.insert(
            "submission_address".into(),
            listen(&self.submission_address),
        );
        top.insert(
            "submission_over_tls_address".into(),
            listen(&self.submission_over_tls_address),
        );
        top.insert(
            "monitoring_address".into(),
            s(self
                .monitoring_address
                .map(|a| a.to_string())
                .unwrap_or_default()),
        );
        top.insert(
            "mail_delivery_agent_bin".into(),
            s(&self.mail_delivery_agent_bin),
        );
        top.insert(
            "mail_delivery_agent_args".into(),
            list(&self.mail_delivery_agent_args),
        );
        top.insert("data_dir".into(), s(self.data_dir.display()));
        top.insert("suffix_separators".into(), s(&self.suffix_separators));
        top.insert("drop_characters".into(), s(&self.drop_characters));
        top.insert("mail_log_path".into(), s(&self.mail_log_path));
        top.insert("dovecot_auth".into(), Value::Boolean(self.dovecot_auth));
        top.insert("dovecot_userdb_path".into(), s(&self.dovecot_userdb_path));
        top.insert("dovecot_client_path".into(), s(&self.dovecot_client_path));
        top.insert(
            "haproxy_incoming".into(),
            Value::Boolean(self.haproxy_incoming),
        );
        top.insert("max_queue_items".into(), int(self.max_queue_items));
        top.insert("give_up_send_after".into(), dur(self.give_up_send_after));

        let t = &self.tambo;
        let mut tambo = Table::new();
        tambo.insert("runtime_dir".into(), s(t.runtime_dir.display()));
        tambo.insert("smtpd_user".into(), s(&t.smtpd_user));
        tambo.insert("queued_user".into(), s(&t.queued_user));
        tambo.insert("deliverd_user".into(), s(&t.deliverd_user));
        tambo.insert("monitord_user".into(), s(&t.monitord_user));
        if let Some(m) = &t.maildir {
            tambo.insert("maildir".into(), s(m));
        }
        tambo.insert("delivery_slots".into(), int(t.delivery_slots));
        tambo.insert("max_sessions".into(), int(t.max_sessions));
        tambo.insert(
            "max_sessions_per_client".into(),
            int(t.max_sessions_per_client),
        );
        tambo.insert("max_data_in_flight_mb".into(), int(t.max_data_in_flight_mb));
        tambo.insert(
            "sender_bound_to_login".into(),
            Value::Boolean(t.sender_bound_to_login),
        );
        tambo.insert(
            "max_tls_signatures_per_second".into(),
            int(t.max_tls_signatures_per_second),
        );
        if let Some(a) = &t.lmtp_address {
            tambo.insert("lmtp_address".into(), s(a));
        }
        tambo.insert(
            "outgoing_source_address".into(),
            list(&t.outgoing_source_address),
        );
        tambo.insert(
            "smtp_connection_cache_time".into(),
            dur(t.smtp_connection_cache_time),
        );
        tambo.insert("relay_networks".into(), list(&t.relay_networks));
        tambo.insert(
            "deliverd_paths".into(),
            Value::Array(t.deliverd_paths.iter().map(|p| s(p.display())).collect()),
        );
        top.insert("tambo".into(), Value::Table(tambo));

        let testing = self.testing_table();
        if !testing.is_empty() {
            top.insert("testing".into(), Value::Table(testing));
        }
        top.to_string()
    }

    fn testing_table(&self) -> Table {
        let t = &self.testing;
        let mut out = Table::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                out.insert(k.into(), v);
            }
        };
        put(
            "retry_delays",
            t.retry_delays
                .map(|d| Value::Array(d.iter().map(|d| dur(*d)).collect())),
        );
        put("retry_jitter", t.retry_jitter.map(dur));
        put(
            "fail_queue_writes",
            t.fail_queue_writes.then_some(Value::Boolean(true)),
        );
        put("smtp_command_timeout", t.smtp_command_timeout.map(dur));
        put("smtp_first_deadline", t.smtp_first_deadline.map(dur));
        put("delivery_job_deadline", t.delivery_job_deadline.map(dur));
        put(
            "fail_dir_sync_if_exists",
            t.fail_dir_sync_if_exists.as_ref().map(|p| s(p.display())),
        );
        put("ipc_idle_timeout", t.ipc_idle_timeout.map(dur));
        put("http_idle_timeout", t.http_idle_timeout.map(dur));
        put("mda_timeout", t.mda_timeout.map(dur));
        put("heap_profile_rate", t.heap_profile_rate.map(int));
        put("maildir_pause", t.maildir_pause.map(dur));
        put("reload_period", t.reload_period.map(dur));
        put("dns_server", t.dns_server.map(s));
        put("smtp_port", t.smtp_port.map(int));
        put("sts_https_port", t.sts_https_port.map(int));
        put("tls_roots", t.tls_roots.as_ref().map(|p| s(p.display())));
        put("smtp_out_timeout", t.smtp_out_timeout.map(dur));
        put("sts_refresh_period", t.sts_refresh_period.map(dur));
        put("hook_timeout", t.hook_timeout.map(dur));
        out
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_defaults_read_back_to_themselves() {
        let dir = Path::new("/etc/tambo");
        let cfg = Config::defaults(dir);
        let text = cfg.to_toml();
        assert!(text.contains("max_data_size_mb = 50"), "{text}");
        assert!(text.contains("[tambo]"), "{text}");
        assert!(!text.contains("[testing]"), "{text}");
        let back = Config::from_str(dir, Path::new("printed"), &text).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn every_setting_reads_back_to_itself() {
        let dir = Path::new("/etc/tambo");
        let text = r#"
hostname = "mx.example.org"
smtp_address = ["127.0.0.1:2525", "[::1]:2525"]
monitoring_address = "127.0.0.1:1099"
mail_delivery_agent_args = ["-d", "%to%", "with \"quotes\""]
give_up_send_after = "3h30m"
[tambo]
maildir = "/var/mail/%to_domain%/%to_user%"
lmtp_address = "/run/dovecot/lmtp"
relay_networks = ["10.0.0.0/8", "2001:db8::/32"]
outgoing_source_address = ["192.0.2.1"]
deliverd_paths = ["/var/spool/extra"]
smtp_connection_cache_time = "1.5s"
[testing]
retry_delays = ["1s", "2s", "3s", "4s"]
retry_jitter = "0s"
fail_queue_writes = true
dns_server = "127.0.0.1:5353"
smtp_port = 2525
reload_period = "250ms"
"#;
        let cfg = Config::from_str(dir, Path::new("in"), text).unwrap();
        let printed = cfg.to_toml();
        let back = Config::from_str(dir, Path::new("printed"), &printed).unwrap();
        assert_eq!(back, cfg, "{printed}");
    }
}
