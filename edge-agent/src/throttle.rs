//! Upload bandwidth limits: token buckets, per source and per agent, each
//! optionally active only inside a daily window of the site's local time
//! ("2 MB/s from 08:00 to 18:00, unlimited otherwise").
//!
//! The bucket is a pure function of the time it is given ([`TokenBucket::take`]
//! returns how long to wait), so tests drive it with a simulated clock; the
//! upload feeder (a blocking thread) sleeps for what it returns.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Timelike, Utc};

/// A rate limit and the daily window it applies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limit {
    /// Bytes per second; 0 = unlimited.
    pub bytes_per_sec: u64,
    /// Window start, minutes after local midnight.
    pub window_start_min: u32,
    /// Window end (exclusive); equal to the start = all day. May wrap past midnight.
    pub window_end_min: u32,
}

impl Limit {
    /// From the wire form.
    pub fn from_pb(b: Option<&proto::pb::BandwidthLimit>) -> Limit {
        b.map(|b| Limit {
            bytes_per_sec: b.bytes_per_sec,
            window_start_min: b.window_start_min % 1440,
            window_end_min: b.window_end_min % 1440,
        })
        .unwrap_or_default()
    }

    /// The rate in force at `minute` after local midnight (None = unlimited).
    pub fn rate_at(&self, minute: u32) -> Option<u64> {
        if self.bytes_per_sec == 0 {
            return None;
        }
        let (s, e) = (self.window_start_min, self.window_end_min);
        let inside = if s == e {
            true
        } else if s < e {
            (s..e).contains(&minute)
        } else {
            minute >= s || minute < e
        };
        inside.then_some(self.bytes_per_sec)
    }
}

/// A token bucket that may go into debt: a blob larger than the burst is
/// sent at once and the debt is waited off before the next one, so the
/// long-run rate is exact whatever the blob sizes.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Option<Instant>,
}

impl Default for TokenBucket {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenBucket {
    /// An empty bucket (no initial burst).
    pub fn new() -> Self {
        TokenBucket {
            tokens: 0.0,
            last: None,
        }
    }

    /// Take `n` bytes at time `now` under `rate` bytes/s (None = unlimited);
    /// returns how long to wait before sending them.
    pub fn take(&mut self, n: u64, rate: Option<u64>, now: Instant) -> Duration {
        let Some(rate) = rate.filter(|r| *r > 0) else {
            self.tokens = 0.0;
            self.last = Some(now);
            return Duration::ZERO;
        };
        let rate = rate as f64;
        // At most 100 ms of burst: a limit holds over short spans too.
        let cap = (rate / 10.0).max(16.0 * 1024.0);
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * rate).min(cap);
        }
        self.last = Some(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

/// One limit with its bucket, shared by every upload it governs.
#[derive(Debug)]
pub struct Throttle {
    limit: Limit,
    tz: chrono_tz::Tz,
    bucket: Mutex<TokenBucket>,
}

impl Throttle {
    /// A throttle for `limit`, its window read in time zone `tz`.
    pub fn new(limit: Limit, tz: chrono_tz::Tz) -> Arc<Throttle> {
        Arc::new(Throttle {
            limit,
            tz,
            bucket: Mutex::new(TokenBucket::new()),
        })
    }

    /// The rate in force at wall time `t`.
    pub fn rate_at(&self, t: DateTime<Utc>) -> Option<u64> {
        let local = t.with_timezone(&self.tz);
        self.limit.rate_at(local.hour() * 60 + local.minute())
    }

    /// How long to wait before sending `n` bytes now.
    pub fn take(&self, n: u64) -> Duration {
        let rate = self.rate_at(Utc::now());
        match self.bucket.lock() {
            Ok(mut b) => b.take(n, rate, Instant::now()),
            Err(_) => Duration::ZERO,
        }
    }
}

/// Block the calling (blocking) thread until `n` bytes may be sent under
/// every throttle in `all`.
pub fn wait_all(all: &[Arc<Throttle>], n: u64) {
    for t in all {
        let d = t.take(n);
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Send `total` bytes in blobs of `size` as fast as the bucket allows,
    /// on a simulated clock; returns (bytes sent, seconds until the last
    /// blob was released).
    fn simulate(rate: u64, size: u64, total: u64) -> (u64, f64) {
        let mut b = TokenBucket::new();
        let start = Instant::now();
        let mut t = start;
        let mut sent = 0;
        while sent < total {
            t += b.take(size, Some(rate), t);
            sent += size;
        }
        (sent, t.duration_since(start).as_secs_f64())
    }

    /// A 10 s transfer (at the limit) runs at the limit within 10 %, from
    /// blobs much smaller than a second's worth to blobs of two seconds.
    #[test]
    fn limit_holds_within_ten_percent_over_ten_seconds() {
        for (rate, size) in [
            (2_000_000, 1 << 20),
            (2_000_000, 4 << 20),
            (500_000, 64 << 10),
            (100_000_000, 1 << 20),
            (50_000, 300),
        ] {
            let (sent, secs) = simulate(rate, size, rate * 10);
            assert!(secs >= 9.0, "rate {rate}, blobs of {size}: {secs:.2} s");
            let ratio = sent as f64 / secs / rate as f64;
            assert!(
                (0.9..=1.1).contains(&ratio),
                "rate {rate}, blobs of {size}: {ratio:.3} of the limit"
            );
        }
    }

    #[test]
    fn unlimited_never_waits() {
        let mut b = TokenBucket::new();
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(b.take(1 << 30, None, now), Duration::ZERO);
        }
    }

    #[test]
    fn window_applies_only_inside_and_may_wrap() {
        let day = Limit {
            bytes_per_sec: 2_000_000,
            window_start_min: 8 * 60,
            window_end_min: 18 * 60,
        };
        assert_eq!(day.rate_at(7 * 60 + 59), None);
        assert_eq!(day.rate_at(8 * 60), Some(2_000_000));
        assert_eq!(day.rate_at(17 * 60 + 59), Some(2_000_000));
        assert_eq!(day.rate_at(18 * 60), None);
        let night = Limit {
            window_start_min: 22 * 60,
            window_end_min: 6 * 60,
            ..day
        };
        assert_eq!(night.rate_at(23 * 60), Some(2_000_000));
        assert_eq!(night.rate_at(60), Some(2_000_000));
        assert_eq!(night.rate_at(12 * 60), None);
        let always = Limit {
            window_start_min: 0,
            window_end_min: 0,
            ..day
        };
        assert_eq!(always.rate_at(12 * 60), Some(2_000_000));
        assert_eq!(Limit::default().rate_at(600), None);
    }

    #[test]
    fn window_is_read_in_the_site_time_zone() {
        let t = Throttle::new(
            Limit {
                bytes_per_sec: 1000,
                window_start_min: 8 * 60,
                window_end_min: 18 * 60,
            },
            chrono_tz::Asia::Tokyo,
        );
        // 00:30 UTC is 09:30 in Tokyo: inside the window.
        let utc = "2026-11-22T00:30:00Z"
            .parse::<DateTime<Utc>>()
            .expect("time");
        assert_eq!(t.rate_at(utc), Some(1000));
        // 12:00 UTC is 21:00 in Tokyo: outside.
        let utc = "2026-11-22T12:00:00Z"
            .parse::<DateTime<Utc>>()
            .expect("time");
        assert_eq!(t.rate_at(utc), None);
    }
}
