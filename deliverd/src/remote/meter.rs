//! The counters of remote delivery. They go to the process's metrics;
//! tests also read them back from here, since the process-wide ones are
//! shared by every test running at once.

use tambo_proto::metrics;

#[derive(Default)]
pub struct Meter {
    #[cfg(test)]
    seen: std::sync::Mutex<std::collections::HashMap<(&'static str, String), u64>>,
}

impl Meter {
    pub fn inc(&self, var: &'static str) {
        metrics::inc(var);
        #[cfg(test)]
        self.note(var, "");
    }

    pub fn inc_label(&self, var: &'static str, label: &str) {
        metrics::inc_label(var, label);
        #[cfg(test)]
        self.note(var, label);
    }

    #[cfg(test)]
    fn note(&self, var: &'static str, label: &str) {
        let mut seen = self.seen.lock().unwrap();
        *seen.entry((var, label.to_string())).or_default() += 1;
    }

    /// How often `var` (with `label`, "" for none) was counted here.
    #[cfg(test)]
    pub fn get(&self, var: &'static str, label: &str) -> u64 {
        let seen = self.seen.lock().unwrap();
        seen.get(&(var, label.to_string())).copied().unwrap_or(0)
    }
}
