//! The scrub schedule: a cron expression (with seconds, evaluated in UTC,
//! like every time the admin CLI prints) and a read rate, kept in
//! state.db's `settings` and changed through the admin API. A task of the
//! running collector sleeps until the next slot and scrubs (not a dry run)
//! at that rate, the way Proxmox Backup Server runs verify jobs: damage is
//! found when the schedule says, not when a restore needs the data.
//!
//! A slot that comes while a scrub runs (an admin's, or a long scheduled
//! one) is skipped, not queued; a slot missed while the collector was down
//! is not made up: the next one comes soon enough, and a restart is no time
//! to read the whole repository.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use proto::pb;

use crate::Ctx;
use crate::error::ServiceError;
use crate::policy::validate_schedule;
use crate::scrub::{self, Options, Trigger};

/// The `settings` row holding the cron expression.
const SCHEDULE: &str = "scrub_schedule";
/// The `settings` row holding the read rate, bytes per second.
const RATE: &str = "scrub_bytes_per_sec";
/// The scheduler re-reads the clock at least this often (clock steps).
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// The schedule, its next slot, and the last scrub that finished.
pub fn info(ctx: &Ctx) -> Result<pb::ScrubScheduleInfo, ServiceError> {
    let (schedule, bytes_per_sec) = read(ctx)?;
    Ok(pb::ScrubScheduleInfo {
        next_ns: next_after(&schedule, Utc::now())
            .and_then(|t| t.timestamp_nanos_opt())
            .unwrap_or(0),
        schedule,
        bytes_per_sec,
        last: ctx.state.last_scrub()?,
        running: ctx.scrub.is_running(),
    })
}

/// Apply the fields `r` sets (all checked before the first is written),
/// cancel the running scrub if asked, wake the scheduler, and return the
/// new [`info`].
pub fn update(
    ctx: &Ctx,
    r: &pb::ScrubScheduleRequest,
) -> Result<pb::ScrubScheduleInfo, ServiceError> {
    if let Some(s) = &r.schedule {
        validate_schedule(s)?;
        if !s.is_empty() && next_after(s, Utc::now()).is_none() {
            return Err(ServiceError::Invalid(format!(
                "schedule {s:?} never fires (no such date before 2100)"
            )));
        }
    }
    if let Some(rate) = r.bytes_per_sec {
        scrub::validate_rate(rate)?;
    }
    if r.cancel {
        let was = ctx.scrub.cancel();
        tracing::info!(running = was, "scrub cancel asked");
    }
    if let Some(s) = &r.schedule {
        ctx.state
            .set_setting(SCHEDULE, (!s.is_empty()).then_some(s.as_str()))?;
    }
    if let Some(rate) = r.bytes_per_sec {
        ctx.state.set_setting(RATE, Some(&rate.to_string()))?;
    }
    if r.schedule.is_some() || r.bytes_per_sec.is_some() {
        tracing::info!(schedule = ?r.schedule, bytes_per_sec = ?r.bytes_per_sec,
            "scrub schedule changed");
        ctx.scrub.changed.notify_one();
    }
    info(ctx)
}

/// (schedule, bytes per second) as stored; ("", 0) when unset.
fn read(ctx: &Ctx) -> Result<(String, u64), ServiceError> {
    let schedule = ctx.state.setting(SCHEDULE)?.unwrap_or_default();
    let rate = ctx
        .state
        .setting(RATE)?
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    Ok((schedule, rate))
}

/// The first slot of `schedule` after `t` ("" or unparsable: none).
fn next_after(schedule: &str, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if schedule.is_empty() {
        return None;
    }
    cron::Schedule::from_str(schedule).ok()?.after(&t).next()
}

/// Run scheduled scrubs until the task is aborted (at shutdown).
pub async fn run(ctx: Arc<Ctx>) {
    loop {
        // Armed before the schedule is read, so a change made meanwhile
        // still wakes this loop.
        let changed = ctx.scrub.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (schedule, rate) = match ctx.blocking(read).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("reading the scrub schedule failed: {e}; retrying in a minute");
                tokio::time::sleep(Duration::from_secs(60)).await;
                continue;
            }
        };
        let Some(at) = next_after(&schedule, Utc::now()) else {
            changed.await;
            continue;
        };
        let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep(wait.min(MAX_SLEEP)) => {}
            _ = &mut changed => continue,
        }
        if Utc::now() < at {
            continue; // woke early to look at the clock again
        }
        let opts = Options {
            dry_run: false,
            bytes_per_sec: rate,
            trigger: Trigger::Schedule,
        };
        match ctx
            .blocking(move |c| scrub::scrub(c, opts, &mut |_| {}))
            .await
        {
            Ok(r) if r.damaged.is_empty() => {}
            Ok(r) => tracing::error!(
                damaged = r.damaged.len(),
                affected = r.affected.len(),
                "the scheduled scrub set damaged packs aside: `hubvault scrub --dry-run` \
                 lists the snapshots that need their data again"
            ),
            Err(ServiceError::Exhausted(_)) => {
                tracing::info!("scheduled scrub skipped: another scrub is running");
            }
            Err(e) => tracing::error!("the scheduled scrub stopped: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_in_utc_and_an_empty_schedule_has_none() {
        let t = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .expect("time")
                .with_timezone(&Utc)
        };
        assert_eq!(
            next_after("0 0 3 * * Sun", t("2026-11-22T12:00:00Z")),
            Some(t("2026-11-29T03:00:00Z"))
        );
        assert_eq!(next_after("", t("2026-11-22T12:00:00Z")), None);
    }

    #[test]
    fn pace_waits_for_what_was_read_beyond_the_rate() {
        let s = Duration::from_secs;
        assert_eq!(scrub::pace(s(1), 10 << 20, 0), Duration::ZERO);
        assert_eq!(scrub::pace(s(1), 10 << 20, 5 << 20), s(1));
        assert_eq!(scrub::pace(s(3), 10 << 20, 5 << 20), Duration::ZERO);
    }
}
