//! Source and site policies: how they are stored (JSON columns of the state
//! database, so a field added later reads as its default from an older row),
//! converted to and from their wire messages, and validated. Everything here
//! is pure; the state database and the services use it.

use std::str::FromStr;

use proto::pb;
use serde::{Deserialize, Serialize};

use crate::error::ServiceError;

/// Longest accepted real-time quiet period, in ms (1 h).
pub const MAX_QUIET_MS: u32 = 3_600_000;
/// Longest accepted real-time maximum delay, in ms (24 h).
pub const MAX_DELAY_MS: u32 = 86_400_000;
/// Shortest accepted reconcile period (0 = the default), in seconds.
pub const MIN_RECONCILE_SECS: u64 = 60;
/// Longest accepted reconcile period, in seconds (a year).
pub const MAX_RECONCILE_SECS: u64 = 365 * 86_400;
/// Longest accepted schedule jitter, in seconds (a day).
pub const MAX_JITTER_SECS: u32 = 86_400;
/// Slowest accepted non-zero bandwidth limit, in bytes per second.
pub const MIN_BYTES_PER_SEC: u64 = 1024;
/// Longest accepted keep-within, in seconds (100 years).
pub const MAX_KEEP_WITHIN_SECS: u64 = 100 * 365 * 86_400;
/// Minutes in a day: window bounds are below this.
pub const MINUTES_PER_DAY: u32 = 1440;

/// An upload limit (see `pb::BandwidthLimit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Bandwidth {
    /// Bytes per second; 0 = unlimited.
    pub bytes_per_sec: u64,
    /// Window start, minutes after local midnight.
    pub window_start_min: u32,
    /// Window end (exclusive), minutes after local midnight.
    pub window_end_min: u32,
}

impl From<&pb::BandwidthLimit> for Bandwidth {
    fn from(b: &pb::BandwidthLimit) -> Self {
        Bandwidth {
            bytes_per_sec: b.bytes_per_sec,
            window_start_min: b.window_start_min,
            window_end_min: b.window_end_min,
        }
    }
}

impl From<Bandwidth> for pb::BandwidthLimit {
    fn from(b: Bandwidth) -> Self {
        pb::BandwidthLimit {
            bytes_per_sec: b.bytes_per_sec,
            window_start_min: b.window_start_min,
            window_end_min: b.window_end_min,
        }
    }
}

/// Retention rules (see `pb::Retention`); all zero = keep everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Retention {
    /// The newest N.
    pub keep_last: u32,
    /// Everything younger than this many seconds.
    pub keep_within_secs: u64,
    /// Newest of each of the last N hours with a snapshot.
    pub hourly: u32,
    /// ... days.
    pub daily: u32,
    /// ... ISO weeks.
    pub weekly: u32,
    /// ... months.
    pub monthly: u32,
    /// ... years.
    pub yearly: u32,
}

impl Retention {
    /// True when no rule is set (keep everything; for a source: use the site's).
    pub fn is_empty(&self) -> bool {
        *self == Retention::default()
    }
}

impl From<&pb::Retention> for Retention {
    fn from(r: &pb::Retention) -> Self {
        Retention {
            keep_last: r.keep_last,
            keep_within_secs: r.keep_within_secs,
            hourly: r.hourly,
            daily: r.daily,
            weekly: r.weekly,
            monthly: r.monthly,
            yearly: r.yearly,
        }
    }
}

impl From<Retention> for pb::Retention {
    fn from(r: Retention) -> Self {
        pb::Retention {
            keep_last: r.keep_last,
            keep_within_secs: r.keep_within_secs,
            hourly: r.hourly,
            daily: r.daily,
            weekly: r.weekly,
            monthly: r.monthly,
            yearly: r.yearly,
        }
    }
}

/// The policy fields of a source besides paths, excludes, schedule and
/// real-time (which have columns of their own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SourcePolicy {
    /// Higher sends first.
    pub priority: i32,
    /// Upload limit of the source.
    pub bandwidth: Bandwidth,
    /// Real-time quiet period, ms (0 = default).
    pub quiet_ms: u32,
    /// Real-time maximum delay, ms (0 = default).
    pub max_delay_ms: u32,
    /// Reconcile scan period, s (0 = default).
    pub reconcile_secs: u64,
    /// Schedule jitter, s.
    pub jitter_secs: u32,
    /// The source's own retention (empty = the site's).
    pub retention: Retention,
}

impl SourcePolicy {
    /// The policy fields of a wire source.
    pub fn of(s: &pb::Source) -> Self {
        SourcePolicy {
            priority: s.priority,
            bandwidth: s
                .bandwidth
                .as_ref()
                .map(Bandwidth::from)
                .unwrap_or_default(),
            quiet_ms: s.quiet_ms,
            max_delay_ms: s.max_delay_ms,
            reconcile_secs: s.reconcile_secs,
            jitter_secs: s.jitter_secs,
            retention: s
                .retention
                .as_ref()
                .map(Retention::from)
                .unwrap_or_default(),
        }
    }

    /// Copy these fields into a wire source.
    pub fn apply(&self, s: &mut pb::Source) {
        s.priority = self.priority;
        s.bandwidth = Some(self.bandwidth.into());
        s.quiet_ms = self.quiet_ms;
        s.max_delay_ms = self.max_delay_ms;
        s.reconcile_secs = self.reconcile_secs;
        s.jitter_secs = self.jitter_secs;
        s.retention = Some(self.retention.into());
    }
}

/// A site's policy: its clock, the limit of each of its agents, and the
/// retention of sources that have none of their own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SitePolicy {
    /// IANA time zone name; empty = UTC.
    pub timezone: String,
    /// Upload limit of each agent of the site.
    pub agent_bandwidth: Bandwidth,
    /// Default retention.
    pub retention: Retention,
}

impl SitePolicy {
    /// The site's time zone (UTC when unset, or if a stored name no longer parses).
    pub fn tz(&self) -> chrono_tz::Tz {
        parse_timezone(&self.timezone).unwrap_or(chrono_tz::UTC)
    }

    /// What every agent of the site is told.
    pub fn agent_policy(&self) -> pb::AgentPolicy {
        pb::AgentPolicy {
            timezone: self.timezone.clone(),
            bandwidth: Some(self.agent_bandwidth.into()),
        }
    }
}

/// Parse an IANA time zone name ("Europe/Paris"); empty = UTC.
pub fn parse_timezone(name: &str) -> Result<chrono_tz::Tz, ServiceError> {
    if name.is_empty() {
        return Ok(chrono_tz::UTC);
    }
    chrono_tz::Tz::from_str(name).map_err(|_| {
        ServiceError::Invalid(format!(
            "time zone {:?} is not an IANA time zone name (e.g. Europe/Paris, America/New_York, UTC)",
            name.chars().take(64).collect::<String>()
        ))
    })
}

/// Check a cron expression (with seconds: "sec min hour day month weekday").
pub fn validate_schedule(schedule: &str) -> Result<(), ServiceError> {
    if schedule.is_empty() {
        return Ok(());
    }
    if schedule.len() > 256 {
        return Err(ServiceError::Invalid(
            "schedule: at most 256 characters".into(),
        ));
    }
    cron::Schedule::from_str(schedule).map_err(|e| {
        // The parser's message draws a caret under the input over several
        // lines; its last line says what is wrong.
        let e = e.to_string();
        let why = e.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        ServiceError::Invalid(format!(
            "schedule {schedule:?}: {why} (format: sec min hour day month weekday, e.g. \"0 0 2 * * *\")"
        ))
    })?;
    Ok(())
}

/// Check a bandwidth limit; `what` names it in the message.
pub fn validate_bandwidth(what: &str, b: &Bandwidth) -> Result<(), ServiceError> {
    if b.window_start_min >= MINUTES_PER_DAY || b.window_end_min >= MINUTES_PER_DAY {
        return Err(ServiceError::Invalid(format!(
            "{what}: window bounds are minutes after midnight, 0..{MINUTES_PER_DAY}"
        )));
    }
    if b.bytes_per_sec != 0 && b.bytes_per_sec < MIN_BYTES_PER_SEC {
        return Err(ServiceError::Invalid(format!(
            "{what}: {} bytes/s is too slow to be useful; at least {MIN_BYTES_PER_SEC} (0 = unlimited)",
            b.bytes_per_sec
        )));
    }
    if b.bytes_per_sec == 0 && b.window_start_min != b.window_end_min {
        return Err(ServiceError::Invalid(format!(
            "{what}: a time window needs a rate (0 = unlimited has no window)"
        )));
    }
    Ok(())
}

/// Check retention rules.
pub fn validate_retention(r: &Retention) -> Result<(), ServiceError> {
    if r.keep_within_secs > MAX_KEEP_WITHIN_SECS {
        return Err(ServiceError::Invalid(format!(
            "retention: keep-within is at most {} days",
            MAX_KEEP_WITHIN_SECS / 86_400
        )));
    }
    Ok(())
}

/// Check a whole source policy (the merged result, at AddSource and SetPolicy).
pub fn validate_source(schedule: &str, p: &SourcePolicy) -> Result<(), ServiceError> {
    validate_schedule(schedule)?;
    validate_bandwidth("bandwidth", &p.bandwidth)?;
    if p.quiet_ms > MAX_QUIET_MS {
        return Err(ServiceError::Invalid(format!(
            "quiet period: at most {} s",
            MAX_QUIET_MS / 1000
        )));
    }
    if p.max_delay_ms > MAX_DELAY_MS {
        return Err(ServiceError::Invalid(format!(
            "maximum delay: at most {} h",
            MAX_DELAY_MS / 3_600_000
        )));
    }
    if p.quiet_ms != 0 && p.max_delay_ms != 0 && p.quiet_ms > p.max_delay_ms {
        return Err(ServiceError::Invalid(format!(
            "quiet period ({} ms) longer than the maximum delay ({} ms)",
            p.quiet_ms, p.max_delay_ms
        )));
    }
    if p.reconcile_secs != 0
        && !(MIN_RECONCILE_SECS..=MAX_RECONCILE_SECS).contains(&p.reconcile_secs)
    {
        return Err(ServiceError::Invalid(format!(
            "reconcile period: {MIN_RECONCILE_SECS} s to {} days (0 = every 24 h)",
            MAX_RECONCILE_SECS / 86_400
        )));
    }
    if p.jitter_secs > MAX_JITTER_SECS {
        return Err(ServiceError::Invalid(format!(
            "jitter: at most {MAX_JITTER_SECS} s"
        )));
    }
    validate_retention(&p.retention)
}

/// Check a whole site policy.
pub fn validate_site(p: &SitePolicy) -> Result<(), ServiceError> {
    parse_timezone(&p.timezone)?;
    validate_bandwidth("agent bandwidth", &p.agent_bandwidth)?;
    validate_retention(&p.retention)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_zones() {
        assert_eq!(parse_timezone("").ok(), Some(chrono_tz::UTC));
        assert_eq!(
            parse_timezone("Europe/Paris").ok(),
            Some(chrono_tz::Europe::Paris)
        );
        let e = parse_timezone("Mars/Olympus").expect_err("bad zone");
        assert!(e.to_string().contains("IANA"), "{e}");
    }

    #[test]
    fn source_rules() {
        let ok = SourcePolicy {
            quiet_ms: 1000,
            max_delay_ms: 5000,
            ..Default::default()
        };
        validate_source("0 0 2 * * *", &ok).expect("valid");
        assert!(validate_source("every day", &ok).is_err());
        let inverted = SourcePolicy {
            quiet_ms: 6000,
            max_delay_ms: 5000,
            ..Default::default()
        };
        assert!(validate_source("", &inverted).is_err());
        // Only one set: no ordering to check.
        validate_source(
            "",
            &SourcePolicy {
                quiet_ms: 6000,
                ..Default::default()
            },
        )
        .expect("quiet alone");
        let window = |s, e, r| Bandwidth {
            bytes_per_sec: r,
            window_start_min: s,
            window_end_min: e,
        };
        validate_bandwidth("b", &window(480, 1080, 2_000_000)).expect("8-18h");
        validate_bandwidth("b", &window(1320, 360, 2_000_000)).expect("wraps midnight");
        assert!(validate_bandwidth("b", &window(480, 1440, 2_000_000)).is_err());
        assert!(validate_bandwidth("b", &window(480, 1080, 0)).is_err());
        assert!(validate_bandwidth("b", &window(0, 0, 10)).is_err());
        let bad_reconcile = SourcePolicy {
            reconcile_secs: 5,
            ..Default::default()
        };
        assert!(validate_source("", &bad_reconcile).is_err());
    }

    #[test]
    fn stored_json_reads_with_defaults() {
        let p: SourcePolicy = serde_json::from_str(r#"{"priority": 3}"#).expect("json");
        assert_eq!(p.priority, 3);
        assert!(p.retention.is_empty());
        let s: SitePolicy = serde_json::from_str("{}").expect("json");
        assert_eq!(s.tz(), chrono_tz::UTC);
    }
}
