//! The outcome of a run: one row per phase (the table) and the checks, as text and as JSON.

use serde::Serialize;

use crate::verify::{Check, Exactness};

#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    pub fault: String,
    pub action: String,
    pub seconds: f64,
    /// From the injection until what it broke was back (restarted and ready).
    pub recovered_after_s: Option<f64>,
    pub sent: u64,
    pub accepted: u64,
    /// Commands answered 503 at least once (then retried with their key).
    pub got_503: u64,
    /// Commands answered unavailable (503, 408, 429, other 5xx) or timed out at least once.
    pub retried: u64,
    pub refused_4xx: u64,
    /// No definitive answer within the retry budget.
    pub unresolved: u64,
    #[serde(flatten)]
    pub exactness: Exactness,
    /// Replays (same key, same body) answered differently from the first answer.
    pub replay_mismatches: u64,
    pub replays: u64,
    /// Replays that got no definitive answer within the retry budget (the stack was down).
    pub replays_inconclusive: u64,
    pub writes_unavailable_s: f64,
    pub reads_unavailable_s: f64,
}

impl PhaseResult {
    pub fn failed(&self) -> bool {
        let e = &self.exactness;
        e.lost > 0 || e.duplicated > 0 || e.refused_but_in_log > 0 || self.replay_mismatches > 0
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub about: serde_json::Value,
    pub phases: Vec<PhaseResult>,
    pub checks: Vec<Check>,
    pub problems: Vec<String>,
}

impl Report {
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "{:<22} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>9} {:>9}\n",
            "fault", "sent", "2xx", "503", "4xx", "unres", "lost", "dup", "replay", "writes↓s", "reads↓s"
        ));
        for p in &self.phases {
            let dup = p.exactness.duplicated + p.exactness.refused_but_in_log + p.replay_mismatches;
            s.push_str(&format!(
                "{:<22} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>9.1} {:>9.1}\n",
                p.fault,
                p.sent,
                p.accepted,
                p.got_503,
                p.refused_4xx,
                p.unresolved,
                p.exactness.lost,
                dup,
                format!("{}/{}", p.replays - p.replay_mismatches - p.replays_inconclusive, p.replays),
                p.writes_unavailable_s,
                p.reads_unavailable_s
            ));
        }
        s.push('\n');
        for c in &self.checks {
            s.push_str(&format!("{} {}: {}\n", if c.ok { "ok  " } else { "FAIL" }, c.name, c.detail));
        }
        s
    }
}
