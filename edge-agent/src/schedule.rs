//! Scheduled sources: when the next run is due.
//!
//! A cron expression (with seconds, `cron` crate) is evaluated in the site's
//! time zone. The decision is a pure function of the last run and "now"
//! ([`next_due`]), so tests drive it with a simulated clock: a run missed
//! while the agent was down is due at once on start, exactly once (the next
//! slot is counted from that run, not from the missed ones).

use std::str::FromStr;

use chrono::{DateTime, Utc};

/// What to do now about a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// A slot has passed since the last run: run now.
    Now,
    /// Nothing due before this time.
    At(DateTime<Utc>),
    /// The expression never fires again.
    Never,
}

/// A parsed schedule in its time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: cron::Schedule,
    tz: chrono_tz::Tz,
}

/// A schedule that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "schedule {expr:?} is not a cron expression with seconds (\"sec min hour day month weekday\"): {reason}"
)]
pub struct BadSchedule {
    expr: String,
    reason: String,
}

impl Schedule {
    /// Parse `expr` (cron with seconds) to be evaluated in `tz`.
    pub fn new(expr: &str, tz: chrono_tz::Tz) -> Result<Schedule, BadSchedule> {
        let cron = cron::Schedule::from_str(expr).map_err(|e| BadSchedule {
            expr: expr.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Schedule { cron, tz })
    }

    /// The first slot strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .after(&t.with_timezone(&self.tz))
            .next()
            .map(|n| n.with_timezone(&Utc))
    }

    /// Given the last run (or, before the first, when the source was
    /// assigned), is a run due at `now`?
    pub fn next_due(&self, last: DateTime<Utc>, now: DateTime<Utc>) -> Due {
        match self.next_after(last) {
            Some(n) if n <= now => Due::Now,
            Some(n) => Due::At(n),
            None => Due::Never,
        }
    }
}

/// Parse an IANA time zone name; empty = UTC.
pub fn time_zone(name: &str) -> Result<chrono_tz::Tz, String> {
    if name.is_empty() {
        return Ok(chrono_tz::UTC);
    }
    name.parse::<chrono_tz::Tz>()
        .map_err(|_| format!("unknown time zone {name:?} (an IANA name like Europe/Paris)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().expect("time")
    }

    /// A simulated agent: runs whenever due, for `until`, stepping the clock
    /// `step` at a time, but only while `up(now)`. Returns the run times.
    fn simulate(
        s: &Schedule,
        start: DateTime<Utc>,
        until: DateTime<Utc>,
        step: chrono::Duration,
        up: impl Fn(DateTime<Utc>) -> bool,
    ) -> Vec<DateTime<Utc>> {
        let mut last = start;
        let mut runs = Vec::new();
        let mut now = start;
        while now < until {
            if up(now) && s.next_due(last, now) == Due::Now {
                runs.push(now);
                last = now;
            }
            now += step;
        }
        runs
    }

    #[test]
    fn fires_at_each_slot_while_up() {
        let s = Schedule::new("0 0 * * * *", chrono_tz::UTC).expect("parse");
        let runs = simulate(
            &s,
            t("2026-11-22T10:30:00Z"),
            t("2026-11-22T14:30:00Z"),
            chrono::Duration::seconds(10),
            |_| true,
        );
        assert_eq!(
            runs,
            vec![
                t("2026-11-22T11:00:00Z"),
                t("2026-11-22T12:00:00Z"),
                t("2026-11-22T13:00:00Z"),
                t("2026-11-22T14:00:00Z")
            ]
        );
    }

    #[test]
    fn runs_missed_during_downtime_run_once_on_start() {
        let s = Schedule::new("0 0 * * * *", chrono_tz::UTC).expect("parse");
        // Down from 10:40 to 14:10: the 11:00, 12:00, 13:00 and 14:00 slots
        // are missed; one run at 14:10, then the normal 15:00 slot.
        let down_from = t("2026-11-22T10:40:00Z");
        let up_at = t("2026-11-22T14:10:00Z");
        let runs = simulate(
            &s,
            t("2026-11-22T10:30:00Z"),
            t("2026-11-22T15:30:00Z"),
            chrono::Duration::seconds(10),
            |now| now < down_from || now >= up_at,
        );
        assert_eq!(runs, vec![up_at, t("2026-11-22T15:00:00Z")]);
    }

    #[test]
    fn evaluated_in_the_site_time_zone() {
        // 02:00 in Paris is 01:00 UTC in winter, 00:00 UTC in summer.
        let s = Schedule::new("0 0 2 * * *", chrono_tz::Europe::Paris).expect("parse");
        assert_eq!(
            s.next_after(t("2026-11-22T12:00:00Z")),
            Some(t("2026-11-23T01:00:00Z"))
        );
        assert_eq!(
            s.next_after(t("2026-07-01T12:00:00Z")),
            Some(t("2026-07-02T00:00:00Z"))
        );
    }

    #[test]
    fn not_due_before_the_first_slot() {
        let s = Schedule::new("0 30 2 * * *", chrono_tz::UTC).expect("parse");
        assert_eq!(
            s.next_due(t("2026-11-22T03:00:00Z"), t("2026-11-22T04:00:00Z")),
            Due::At(t("2026-11-23T02:30:00Z"))
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_refused_clearly() {
        let e = Schedule::new("every day", chrono_tz::UTC).expect_err("bad cron");
        assert!(e.to_string().contains("every day"), "{e}");
        assert!(time_zone("Mars/Olympus").is_err());
        assert_eq!(time_zone(""), Ok(chrono_tz::UTC));
        assert_eq!(time_zone("Asia/Tokyo"), Ok(chrono_tz::Asia::Tokyo));
    }
}
