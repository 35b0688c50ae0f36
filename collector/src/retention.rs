//! Retention: which snapshots of one (site, agent, source) group to keep,
//! with restic's `forget` semantics. Pure: no I/O, the clock and the time
//! zone are arguments.
//!
//! - `keep_last N`: the N newest;
//! - `keep_within D`: every snapshot at most D older than "now";
//! - `hourly` / `daily` / `weekly` (ISO week) / `monthly` / `yearly N`: the
//!   newest snapshot of each of the last N such periods that have one, the
//!   periods taken on the site's local clock;
//! - a snapshot is kept when any rule keeps it; no rule at all keeps
//!   everything ("no retention policy"); the newest snapshot of a group is
//!   always kept, whatever the rules say.
//!
//! Ties in time are broken by id, so the result does not depend on the
//! order of the input.

use std::collections::HashSet;

use chrono::{Datelike, TimeZone, Timelike};
use repo_format::Id;

use crate::policy::Retention;

/// A snapshot as retention sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Its id (breaks ties in time).
    pub id: Id,
    /// Its (collector) time, ns since the epoch.
    pub time_ns: i64,
}

/// What happens to one snapshot, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Kept (true) or forgotten.
    pub keep: bool,
    /// The rules that keep it ("last 3, daily 2026-11-21"), or why it goes.
    pub reason: String,
}

/// Reason given to snapshots no rule keeps.
pub const NO_RULE: &str = "no rule keeps it";
/// Reason given to every snapshot when there is no rule at all.
pub const NO_POLICY: &str = "no retention policy";
/// Reason given to a group's newest snapshot when no rule keeps it.
pub const NEWEST: &str = "newest of its group";

#[derive(Clone, Copy)]
enum Period {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    /// The period `time_ns` falls in on `tz`'s clock, as a label that is
    /// unique per period ("daily 2026-11-21").
    fn label(self, time_ns: i64, tz: chrono_tz::Tz) -> String {
        let t = tz.timestamp_nanos(time_ns);
        match self {
            Period::Hour => format!(
                "hourly {:04}-{:02}-{:02} {:02}:00",
                t.year(),
                t.month(),
                t.day(),
                t.hour()
            ),
            Period::Day => format!("daily {:04}-{:02}-{:02}", t.year(), t.month(), t.day()),
            Period::Week => {
                let w = t.iso_week();
                format!("weekly {:04}-W{:02}", w.year(), w.week())
            }
            Period::Month => format!("monthly {:04}-{:02}", t.year(), t.month()),
            Period::Year => format!("yearly {:04}", t.year()),
        }
    }
}

/// "2h", "30d", "90m", "45s": the largest unit that divides `secs` evenly.
pub fn format_duration(secs: u64) -> String {
    for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs >= n && secs.is_multiple_of(n) {
            return format!("{}{unit}", secs / n);
        }
    }
    format!("{secs}s")
}

/// Decide keep or forget for each of `snaps` (one group), in input order.
pub fn decide(snaps: &[Candidate], r: &Retention, now_ns: i64, tz: chrono_tz::Tz) -> Vec<Decision> {
    if r.is_empty() {
        return snaps
            .iter()
            .map(|_| Decision {
                keep: true,
                reason: NO_POLICY.into(),
            })
            .collect();
    }
    // Newest first; ties broken by id so that input order does not matter.
    let mut order: Vec<usize> = (0..snaps.len()).collect();
    order.sort_by(|&a, &b| (snaps[b].time_ns, snaps[b].id).cmp(&(snaps[a].time_ns, snaps[a].id)));
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); snaps.len()];

    for &i in order.iter().take(r.keep_last as usize) {
        reasons[i].push(format!("last {}", r.keep_last));
    }
    if r.keep_within_secs > 0 {
        let within = i128::from(r.keep_within_secs) * 1_000_000_000;
        for (i, s) in snaps.iter().enumerate() {
            if i128::from(now_ns) - i128::from(s.time_ns) <= within {
                reasons[i].push(format!("within {}", format_duration(r.keep_within_secs)));
            }
        }
    }
    for (n, period) in [
        (r.hourly, Period::Hour),
        (r.daily, Period::Day),
        (r.weekly, Period::Week),
        (r.monthly, Period::Month),
        (r.yearly, Period::Year),
    ] {
        if n == 0 {
            continue;
        }
        let mut seen = HashSet::new();
        for &i in &order {
            if seen.len() >= n as usize {
                break;
            }
            let label = period.label(snaps[i].time_ns, tz);
            // Newest first: the first snapshot met in a period is its newest.
            if seen.insert(label.clone()) {
                reasons[i].push(label);
            }
        }
    }
    if let Some(&newest) = order.first()
        && reasons[newest].is_empty()
    {
        reasons[newest].push(NEWEST.into());
    }
    reasons
        .into_iter()
        .map(|r| Decision {
            keep: !r.is_empty(),
            reason: if r.is_empty() {
                NO_RULE.into()
            } else {
                r.join(", ")
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: i64 = 1_000_000_000;

    fn ns(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
        chrono::Utc
            .with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .and_then(|t| t.timestamp_nanos_opt())
            .expect("valid test time")
    }

    fn cands(times: &[i64]) -> Vec<Candidate> {
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| Candidate {
                id: Id([i as u8; 32]),
                time_ns: t,
            })
            .collect()
    }

    fn kept(d: &[Decision]) -> Vec<usize> {
        d.iter()
            .enumerate()
            .filter(|(_, d)| d.keep)
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn no_policy_keeps_everything() {
        let c = cands(&[1, 2, 3]);
        let d = decide(&c, &Retention::default(), 10, chrono_tz::UTC);
        assert!(d.iter().all(|d| d.keep && d.reason == NO_POLICY));
        assert!(decide(&[], &Retention::default(), 0, chrono_tz::UTC).is_empty());
    }

    #[test]
    fn keep_last_keeps_the_newest_n() {
        let c = cands(&[50, 10, 40, 20, 30]);
        let r = Retention {
            keep_last: 2,
            ..Default::default()
        };
        let d = decide(&c, &r, 100, chrono_tz::UTC);
        assert_eq!(kept(&d), vec![0, 2]);
        assert_eq!(d[0].reason, "last 2");
        assert_eq!(d[1].reason, NO_RULE);
    }

    #[test]
    fn keep_within_counts_from_now() {
        let now = ns(2026, 11, 22, 12, 0);
        let c = cands(&[now - 3 * 3600 * S, now - 2 * 3600 * S, now - 60 * S]);
        let r = Retention {
            keep_within_secs: 7200,
            ..Default::default()
        };
        let d = decide(&c, &r, now, chrono_tz::UTC);
        assert_eq!(kept(&d), vec![1, 2]);
        assert_eq!(d[2].reason, "within 2h");
        // All older than the window: only the newest stays, and says why.
        let d = decide(&c[..2], &r, now + 10 * 3600 * S, chrono_tz::UTC);
        assert_eq!(kept(&d), vec![1]);
        assert_eq!(d[1].reason, NEWEST);
    }

    #[test]
    fn daily_follows_the_site_clock() {
        // 22:30 and 23:30 UTC on the 21st: one UTC day, but 23:30 and 00:30
        // (the 22nd) in Paris.
        let c = cands(&[
            ns(2026, 11, 20, 12, 0),
            ns(2026, 11, 21, 22, 30),
            ns(2026, 11, 21, 23, 30),
        ]);
        let r = Retention {
            daily: 2,
            ..Default::default()
        };
        let now = ns(2026, 11, 22, 6, 0);
        let utc = decide(&c, &r, now, chrono_tz::UTC);
        assert_eq!(kept(&utc), vec![0, 2]);
        assert_eq!(utc[2].reason, "daily 2026-11-21");
        let paris = decide(&c, &r, now, chrono_tz::Europe::Paris);
        assert_eq!(kept(&paris), vec![1, 2]);
        assert_eq!(paris[2].reason, "daily 2026-11-22");
        assert_eq!(paris[1].reason, "daily 2026-11-21");
    }

    #[test]
    fn weekly_uses_iso_weeks_and_monthly_yearly_calendar_periods() {
        // Monday 2025-12-29 and Thursday 2026-01-01 are both in ISO week 2026-W01.
        let c = cands(&[
            ns(2025, 12, 22, 9, 0),
            ns(2025, 12, 29, 9, 0),
            ns(2026, 1, 1, 9, 0),
        ]);
        let now = ns(2026, 1, 2, 0, 0);
        let weekly = Retention {
            weekly: 2,
            ..Default::default()
        };
        let d = decide(&c, &weekly, now, chrono_tz::UTC);
        assert_eq!(kept(&d), vec![0, 2]);
        assert_eq!(d[2].reason, "weekly 2026-W01");
        assert_eq!(d[0].reason, "weekly 2025-W52");
        let monthly = Retention {
            monthly: 5,
            ..Default::default()
        };
        let d = decide(&c, &monthly, now, chrono_tz::UTC);
        assert_eq!(kept(&d), vec![1, 2]);
        let yearly = Retention {
            yearly: 1,
            ..Default::default()
        };
        let d = decide(&c, &yearly, now, chrono_tz::UTC);
        assert_eq!(kept(&d), vec![2]);
        assert_eq!(d[2].reason, "yearly 2026");
    }

    #[test]
    fn continuous_snapshots_thin_out_with_age() {
        // A snapshot every 10 minutes for 3 days; keep all for 2 h, hourly
        // for 48 h, daily for 30 days.
        let now = ns(2026, 11, 22, 0, 0);
        let times: Vec<i64> = (0..432).map(|k| now - k * 600 * S).collect();
        let c = cands(&times);
        let r = Retention {
            keep_within_secs: 7200,
            hourly: 48,
            daily: 30,
            ..Default::default()
        };
        let d = decide(&c, &r, now, chrono_tz::UTC);
        let k = kept(&d);
        // Within 2 h: k = 0..=12 (13). Hourly: k = 0 (00:00) and the xx:50 of
        // the 47 hours before it: k = 1 + 6j, j < 47. Daily: k = 0, 1, 145,
        // 289 (the 22nd, then 23:50 of the 21st, 20th and 19th).
        let mut want: Vec<usize> = (0..=12).collect();
        want.extend((0..47).map(|j| 1 + 6 * j));
        want.extend([145, 289]);
        want.sort_unstable();
        want.dedup();
        assert_eq!(k, want);
        assert_eq!(k.len(), 59);
        assert_eq!(
            d[0].reason,
            "within 2h, hourly 2026-11-22 00:00, daily 2026-11-22"
        );
        assert_eq!(d[289].reason, "daily 2026-11-19");
        assert_eq!(d[2].reason, "within 2h");
        assert_eq!(d[13].reason, "hourly 2026-11-21 21:00");
        assert_eq!(d[14].reason, NO_RULE);
    }

    fn retention() -> impl Strategy<Value = Retention> {
        (
            0u32..4,
            0u64..200_000,
            0u32..6,
            0u32..6,
            0u32..4,
            0u32..4,
            0u32..3,
        )
            .prop_map(
                |(keep_last, keep_within_secs, hourly, daily, weekly, monthly, yearly)| Retention {
                    keep_last,
                    keep_within_secs,
                    hourly,
                    daily,
                    weekly,
                    monthly,
                    yearly,
                },
            )
    }

    fn zone() -> impl Strategy<Value = chrono_tz::Tz> {
        prop_oneof![
            Just(chrono_tz::UTC),
            Just(chrono_tz::Europe::Paris),
            Just(chrono_tz::America::New_York),
            Just(chrono_tz::Asia::Kolkata),
        ]
    }

    const BASE: i64 = 1_795_318_662 * S;

    /// Up to 40 times within ~3 years, duplicates likely enough.
    fn times() -> impl Strategy<Value = Vec<i64>> {
        prop::collection::vec(
            prop_oneof![
                (0i64..1000).prop_map(|m| BASE - m * 60 * S),
                (0i64..100_000_000).prop_map(|s| BASE - s * S),
            ],
            1..40,
        )
    }

    proptest! {
        #[test]
        fn newest_is_always_kept(t in times(), r in retention(), tz in zone(), later in 0i64..10_000_000) {
            let c = cands(&t);
            let d = decide(&c, &r, BASE + later * S, tz);
            let newest = (0..c.len()).max_by_key(|&i| (c[i].time_ns, c[i].id)).expect("non-empty");
            prop_assert!(d[newest].keep);
        }

        #[test]
        fn a_larger_n_keeps_a_superset(
            t in times(), r in retention(), tz in zone(), rule in 0usize..7, more in 1u32..5,
        ) {
            prop_assume!(!r.is_empty());
            let mut bigger = r;
            match rule {
                0 => bigger.keep_last += more,
                1 => bigger.keep_within_secs += u64::from(more) * 3600,
                2 => bigger.hourly += more,
                3 => bigger.daily += more,
                4 => bigger.weekly += more,
                5 => bigger.monthly += more,
                _ => bigger.yearly += more,
            }
            let c = cands(&t);
            let a = decide(&c, &r, BASE, tz);
            let b = decide(&c, &bigger, BASE, tz);
            for (x, y) in a.iter().zip(&b) {
                prop_assert!(!x.keep || y.keep, "kept with {r:?} but not with {bigger:?}");
            }
        }

        #[test]
        fn input_order_does_not_matter(
            (t, shuffled) in times().prop_flat_map(|t| {
                let idx: Vec<usize> = (0..t.len()).collect();
                (Just(t), Just(idx).prop_shuffle())
            }),
            r in retention(),
            tz in zone(),
        ) {
            let c = cands(&t);
            let d = decide(&c, &r, BASE, tz);
            let c2: Vec<Candidate> = shuffled.iter().map(|&i| c[i]).collect();
            let d2 = decide(&c2, &r, BASE, tz);
            for (j, &i) in shuffled.iter().enumerate() {
                prop_assert_eq!(&d[i], &d2[j]);
            }
        }
    }
}
