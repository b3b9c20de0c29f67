//! Cron schedules as pure logic: which cron forms are accepted and how they are
//! normalised for the `cron` crate, IANA time zones, the next run after an instant
//! (wall-clock semantics across daylight-saving changes), the plan for a schedule
//! found due (which ticks fire, which were missed) and the minimum-interval check.
//! No IO, no clock: every function takes the instants it needs.
//!
//! Accepted forms (documented in `docs/protocol.md` §13):
//! - 5 fields `minute hour day-of-month month day-of-week` (standard cron), read
//!   as if prefixed with `0 ` (second 0);
//! - 6 fields with seconds first, 7 fields with a year last;
//! - macros `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`), `@hourly`.
//!
//! Day-of-week follows standard cron, not the `cron` crate: `0`–`6` are Sunday to
//! Saturday and `7` is Sunday again; names `SUN`–`SAT` work too. The field is
//! rewritten to names, so `1-5` reaches the crate as `MON,TUE,WED,THU,FRI`.
//! Restricting both day-of-month and day-of-week is refused: standard cron fires
//! when *either* matches, the `cron` crate only when *both* do.
//!
//! Daylight saving time: a local time that does not exist (the skipped hour) does
//! not fire that day; a local time that happens twice (the repeated hour) fires
//! once, at its first occurrence. Schedules that must tick through the repeated
//! hour use the zone `UTC`.

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use std::collections::VecDeque;
use std::str::FromStr;

/// Why a cron expression or time zone was refused; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("cron: {0}")]
    Cron(String),
    #[error("timezone: unknown IANA time zone `{0}` (e.g. `Europe/Berlin`, `America/New_York`, `UTC`)")]
    TimeZone(String),
    #[error(
        "cron: fires every {gap_secs} s at its most frequent (around {at}), more often than the minimum interval of {min_secs} s"
    )]
    TooFrequent { gap_secs: i64, min_secs: u64, at: String },
}

/// A cron expression in one of the accepted forms, with its normalised text (what
/// the `cron` crate parses) and the parsed schedule. Cannot hold a bad expression.
#[derive(Clone, Debug)]
pub struct CronExpr {
    source: String,
    normalized: String,
    schedule: cron::Schedule,
}

impl PartialEq for CronExpr {
    fn eq(&self, other: &Self) -> bool {
        self.normalized == other.normalized
    }
}

impl CronExpr {
    /// Parses and normalises `source` (see the module documentation for the forms).
    pub fn parse(source: &str) -> Result<Self, ScheduleError> {
        let normalized = normalize(source)?;
        let schedule = cron::Schedule::from_str(&normalized)
            .map_err(|e| ScheduleError::Cron(format!("`{}` is not a valid expression: {e}", source.trim())))?;
        Ok(Self {
            source: source.trim().to_string(),
            normalized,
            schedule,
        })
    }

    /// The expression as the user wrote it (trimmed).
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The 6- or 7-field form with day-of-week names, as the `cron` crate reads it.
    pub fn normalized(&self) -> &str {
        &self.normalized
    }

    /// The first tick strictly after `after`, in `tz`; `None` if it never fires again.
    pub fn next_after(&self, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // In a repeated hour the crate yields the earlier instant of an ambiguous local
        // time first, which can lie before `after`; skip to the first one really after it.
        self.schedule
            .after(&after.with_timezone(&tz))
            .take(4)
            .map(|t| t.with_timezone(&Utc))
            .find(|t| *t > after)
    }

    /// The next `n` ticks after `after`.
    pub fn upcoming(&self, tz: Tz, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut t = after;
        while out.len() < n {
            match self.next_after(tz, t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }

    /// Refuses a schedule whose consecutive ticks come closer than `min_secs`, looking
    /// at up to 1,000 ticks within a year after `from`; also refuses one that never fires.
    pub fn check_min_interval(&self, tz: Tz, from: DateTime<Utc>, min_secs: u64) -> Result<(), ScheduleError> {
        let Some(mut prev) = self.next_after(tz, from) else {
            return Err(ScheduleError::Cron(format!("`{}` never fires", self.source)));
        };
        let horizon = from + Duration::days(366);
        for _ in 0..1000 {
            let Some(next) = self.next_after(tz, prev) else { break };
            let gap = (next - prev).num_seconds();
            if gap < min_secs as i64 {
                return Err(ScheduleError::TooFrequent {
                    gap_secs: gap,
                    min_secs,
                    at: prev.to_rfc3339(),
                });
            }
            if next > horizon {
                break;
            }
            prev = next;
        }
        Ok(())
    }
}

/// Parses an IANA time zone name (`Europe/Berlin`, `UTC`).
pub fn parse_zone(name: &str) -> Result<Tz, ScheduleError> {
    Tz::from_str(name.trim()).map_err(|_| ScheduleError::TimeZone(name.to_string()))
}

/// At most this many missed ticks of one schedule are listed one by one per pass;
/// the rest are summarised in one ledger row.
pub const MAX_MISSED_LISTED: usize = 1000;
/// At most this many ticks are walked for one schedule in one pass (a schedule left
/// without a scheduler for a very long time then skips ahead to `now`).
pub const MAX_TICKS_SCANNED: u64 = 100_000;

/// Missed ticks not listed one by one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unlisted {
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
    /// How many (at least this many when `complete` is false).
    pub count: u64,
    /// False when the walk stopped at [`MAX_TICKS_SCANNED`] and skipped ahead.
    pub complete: bool,
}

/// What to do with a schedule found due at `now`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DuePlan {
    /// Ticks to materialise, oldest first (at most `catch_up_ticks`: the newest due ones).
    pub fire: Vec<DateTime<Utc>>,
    /// Older due ticks, recorded as missed, oldest first.
    pub missed: Vec<DateTime<Utc>>,
    pub unlisted: Option<Unlisted>,
    /// The first tick after `now` (`None`: it never fires again).
    pub next_run_at: Option<DateTime<Utc>>,
}

/// Plans a due schedule: every tick from `next_run_at` up to `now` is due; the newest
/// `catch_up_ticks` of them fire and the older ones were missed (no scheduler ran
/// while they passed). With the default of one, a scheduler back after an outage
/// fires the latest tick once instead of a burst.
pub fn plan_due(
    cron: &CronExpr,
    tz: Tz,
    next_run_at: DateTime<Utc>,
    now: DateTime<Utc>,
    catch_up_ticks: u32,
) -> DuePlan {
    let keep = catch_up_ticks.max(1) as usize;
    let mut window: VecDeque<DateTime<Utc>> = VecDeque::with_capacity(keep + 1);
    let mut missed = Vec::new();
    let mut unlisted: Option<Unlisted> = None;
    let mut note_missed = |t: DateTime<Utc>, missed: &mut Vec<DateTime<Utc>>| {
        if missed.len() < MAX_MISSED_LISTED {
            missed.push(t);
        } else {
            let u = unlisted.get_or_insert(Unlisted {
                first: t,
                last: t,
                count: 0,
                complete: true,
            });
            u.last = t;
            u.count += 1;
        }
    };
    let mut next = Some(next_run_at);
    let mut scanned = 0u64;
    while let Some(t) = next {
        if t > now {
            break;
        }
        if scanned >= MAX_TICKS_SCANNED {
            // Too far behind to walk: everything still due is missed, and the plan
            // resumes after `now`.
            for w in window.drain(..) {
                note_missed(w, &mut missed);
            }
            note_missed(t, &mut missed);
            let next_run_at = cron.next_after(tz, now);
            if let Some(u) = unlisted.as_mut() {
                u.complete = false;
            }
            return DuePlan {
                fire: Vec::new(),
                missed,
                unlisted,
                next_run_at,
            };
        }
        scanned += 1;
        window.push_back(t);
        if window.len() > keep {
            let old = window.pop_front().expect("window is not empty");
            note_missed(old, &mut missed);
        }
        next = cron.next_after(tz, t);
    }
    DuePlan {
        fire: window.into_iter().collect(),
        missed,
        unlisted,
        next_run_at: next,
    }
}

/// The idempotency key of the task a schedule materialises for one tick.
pub fn tick_key(schedule_id: uuid::Uuid, tick: DateTime<Utc>) -> String {
    format!(
        "schedule:{schedule_id}:{}",
        tick.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    )
}

// ---------------------------------------------------------------------------
// Normalisation

const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

fn normalize(source: &str) -> Result<String, ScheduleError> {
    let trimmed = source.trim();
    if trimmed.is_empty() {
        return Err(ScheduleError::Cron("must not be empty".into()));
    }
    if trimmed.len() > 256 {
        return Err(ScheduleError::Cron("must be at most 256 bytes".into()));
    }
    if let Some(name) = trimmed.strip_prefix('@') {
        let expanded = match name.to_ascii_lowercase().as_str() {
            "yearly" | "annually" => "0 0 0 1 1 *",
            "monthly" => "0 0 0 1 * *",
            "weekly" => "0 0 0 * * SUN",
            "daily" | "midnight" => "0 0 0 * * *",
            "hourly" => "0 0 * * * *",
            _ => {
                return Err(ScheduleError::Cron(format!(
                    "unknown macro `{trimmed}`; use @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly"
                )));
            }
        };
        return Ok(expanded.to_string());
    }
    let mut fields: Vec<String> = trimmed.split_whitespace().map(str::to_string).collect();
    match fields.len() {
        5 => fields.insert(0, "0".into()),
        6 | 7 => {}
        n => {
            return Err(ScheduleError::Cron(format!(
                "`{trimmed}` has {n} fields; expected 5 (minute hour day-of-month month day-of-week), \
                 6 (with seconds first), 7 (with a year last) or a macro such as @daily"
            )));
        }
    }
    let dom_restricted = !matches!(fields[3].as_str(), "*" | "?");
    fields[5] = normalize_day_of_week(&fields[5])?;
    if dom_restricted && fields[5] != "*" {
        return Err(ScheduleError::Cron(format!(
            "`{trimmed}` restricts both day-of-month and day-of-week; standard cron fires when either matches, \
             this scheduler only when both do, so restrict one and write `*` in the other"
        )));
    }
    if fields[3] == "?" {
        fields[3] = "*".into();
    }
    Ok(fields.join(" "))
}

/// Standard day-of-week (0–6 = Sunday–Saturday, 7 = Sunday, names) → `*` or a list of names.
fn normalize_day_of_week(field: &str) -> Result<String, ScheduleError> {
    let bad = |why: String| ScheduleError::Cron(format!("day-of-week `{field}`: {why}"));
    let mut days = [false; 7];
    for part in field.split(',') {
        if part.is_empty() {
            return Err(bad("empty list element".into()));
        }
        if part.contains('L') || part.contains('#') {
            return Err(bad("`L` and `#` are not supported".into()));
        }
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .ok()
                    .filter(|s| *s >= 1)
                    .ok_or_else(|| bad(format!("step `{s}` is not a positive number")))?;
                (r, step)
            }
            None => (part, 1),
        };
        let (start, end) = match range {
            "*" | "?" => (0, 6),
            _ => match range.split_once('-') {
                Some((a, b)) => (day_value(a).map_err(&bad)?, day_value(b).map_err(&bad)?),
                // `a/n` means from a to the end of the week, as in standard cron.
                None if step > 1 => (day_value(range).map_err(&bad)?, 6),
                None => {
                    let d = day_value(range).map_err(&bad)?;
                    (d, d)
                }
            },
        };
        if start > end {
            return Err(bad(format!(
                "range `{range}` runs backwards; split it, e.g. `5-6,0-1` or `FRI-SAT,SUN-MON`"
            )));
        }
        let mut d = start;
        while d <= end {
            days[(d % 7) as usize] = true;
            d += step;
        }
    }
    if days.iter().all(|d| *d) {
        return Ok("*".into());
    }
    Ok(DAY_NAMES
        .iter()
        .zip(days)
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(","))
}

/// `0`–`7` (0 and 7 = Sunday) or a three-letter name.
fn day_value(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return if n <= 7 {
            Ok(n)
        } else {
            Err(format!("`{n}` is not a day (0-6 = Sunday-Saturday, 7 = Sunday)"))
        };
    }
    DAY_NAMES
        .iter()
        .position(|d| d.eq_ignore_ascii_case(s))
        .map(|p| p as u32)
        .ok_or_else(|| format!("`{s}` is not a day (0-6 = Sunday-Saturday, 7 = Sunday, or SUN-SAT)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn norm(s: &str) -> String {
        CronExpr::parse(s).unwrap().normalized().to_string()
    }

    #[test]
    fn five_fields_get_a_seconds_field() {
        assert_eq!(norm("*/5 * * * *"), "0 */5 * * * *");
        assert_eq!(norm("  30  2 * * * "), "0 30 2 * * *");
        assert_eq!(norm("15 30 2 * * *"), "15 30 2 * * *");
        assert_eq!(norm("0 0 12 * * * 2030"), "0 0 12 * * * 2030");
    }

    #[test]
    fn macros_expand() {
        assert_eq!(norm("@daily"), "0 0 0 * * *");
        assert_eq!(norm("@MIDNIGHT"), "0 0 0 * * *");
        assert_eq!(norm("@hourly"), "0 0 * * * *");
        assert_eq!(norm("@weekly"), "0 0 0 * * SUN");
        assert_eq!(norm("@annually"), "0 0 0 1 1 *");
        let e = CronExpr::parse("@reboot").unwrap_err().to_string();
        assert!(e.starts_with("cron: unknown macro"), "{e}");
    }

    #[test]
    fn day_of_week_numbers_are_standard_cron() {
        assert_eq!(norm("0 9 * * 1-5"), "0 0 9 * * MON,TUE,WED,THU,FRI");
        assert_eq!(norm("0 9 * * 0"), "0 0 9 * * SUN");
        assert_eq!(norm("0 9 * * 7"), "0 0 9 * * SUN");
        assert_eq!(norm("0 9 * * 6,7"), "0 0 9 * * SUN,SAT");
        assert_eq!(norm("0 9 * * mon-fri"), "0 0 9 * * MON,TUE,WED,THU,FRI");
        assert_eq!(norm("0 9 * * */2"), "0 0 9 * * SUN,TUE,THU,SAT");
        assert_eq!(norm("0 9 * * 1/2"), "0 0 9 * * MON,WED,FRI");
        assert_eq!(norm("0 9 * * 0-7"), "0 0 9 * * *");
        assert_eq!(norm("0 9 * * ?"), "0 0 9 * * *");
        // And the crate really fires on those days: 2026-11-30 is a Monday.
        let c = CronExpr::parse("0 9 * * 1").unwrap();
        let next = c.next_after(Tz::UTC, utc("2026-11-26T10:00:00Z")).unwrap();
        assert_eq!(next, utc("2026-11-30T09:00:00Z"));
        assert_eq!(next.weekday(), Weekday::Mon);
    }

    #[test]
    fn bad_expressions_name_the_field() {
        for (bad, want) in [
            ("", "must not be empty"),
            ("* * *", "has 3 fields"),
            ("0 9 * * 8", "day-of-week `8`"),
            ("0 9 * * 5-1", "runs backwards"),
            ("0 9 * * MON#2", "not supported"),
            ("0 9 1 * MON", "both day-of-month and day-of-week"),
            ("61 * * * *", "not a valid expression"),
            ("0 0 0 30 2 *", "never fires"),
        ] {
            let e = CronExpr::parse(bad)
                .and_then(|c| {
                    c.check_min_interval(Tz::UTC, utc("2026-11-26T00:00:00Z"), 60)
                        .map(|_| c)
                })
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("cron: "), "{bad}: {e}");
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert_eq!(
            parse_zone("Mars/Olympus").unwrap_err().to_string(),
            "timezone: unknown IANA time zone `Mars/Olympus` (e.g. `Europe/Berlin`, `America/New_York`, `UTC`)"
        );
        assert_eq!(parse_zone("Europe/Berlin").unwrap(), chrono_tz::Europe::Berlin);
    }

    #[test]
    fn the_minimum_interval_is_enforced() {
        let from = utc("2026-11-26T00:00:00Z");
        let every_second = CronExpr::parse("* * * * * *").unwrap();
        assert!(matches!(
            every_second.check_min_interval(Tz::UTC, from, 60),
            Err(ScheduleError::TooFrequent { gap_secs: 1, .. })
        ));
        assert!(every_second.check_min_interval(Tz::UTC, from, 1).is_ok());
        assert!(
            CronExpr::parse("* * * * *")
                .unwrap()
                .check_min_interval(Tz::UTC, from, 60)
                .is_ok()
        );
        // Irregular gaps: the smallest one counts.
        assert!(
            CronExpr::parse("0 0,1 * * * *")
                .unwrap()
                .check_min_interval(Tz::UTC, from, 60)
                .is_ok()
        );
        let e = CronExpr::parse("0,30 0 * * * *")
            .unwrap()
            .check_min_interval(Tz::UTC, from, 60);
        assert!(matches!(e, Err(ScheduleError::TooFrequent { gap_secs: 30, .. })));
    }

    #[test]
    fn next_runs_follow_the_zone() {
        let c = CronExpr::parse("0 9 * * *").unwrap();
        let tz = parse_zone("America/New_York").unwrap();
        // 09:00 EST = 14:00 UTC.
        assert_eq!(
            c.upcoming(tz, utc("2026-11-26T00:00:00Z"), 2),
            vec![utc("2026-11-26T14:00:00Z"), utc("2026-11-27T14:00:00Z")]
        );
    }

    const BERLIN: Tz = chrono_tz::Europe::Berlin;

    #[test]
    fn dst_skipped_hour_does_not_fire_that_day() {
        // 2026-03-29: Berlin jumps from 02:00 CET to 03:00 CEST; 02:30 does not exist.
        let c = CronExpr::parse("30 2 * * *").unwrap();
        let runs = c.upcoming(BERLIN, utc("2026-03-27T12:00:00Z"), 3);
        assert_eq!(
            runs,
            vec![
                utc("2026-03-28T01:30:00Z"), // 02:30 CET
                utc("2026-03-30T00:30:00Z"), // 02:30 CEST; none on the 29th
                utc("2026-03-31T00:30:00Z"),
            ]
        );
        // An hourly schedule loses nothing real: 01:00 CET is followed by 03:00 CEST, one hour later.
        let hourly = CronExpr::parse("@hourly").unwrap();
        assert_eq!(
            hourly.upcoming(BERLIN, utc("2026-03-28T23:30:00Z"), 3),
            vec![
                utc("2026-03-29T00:00:00Z"), // 01:00 CET
                utc("2026-03-29T01:00:00Z"), // 03:00 CEST
                utc("2026-03-29T02:00:00Z"), // 04:00 CEST
            ]
        );
    }

    #[test]
    fn dst_repeated_hour_fires_once() {
        // 2026-10-25: Berlin goes from 03:00 CEST back to 02:00 CET; 02:30 happens twice.
        let c = CronExpr::parse("30 2 * * *").unwrap();
        let runs = c.upcoming(BERLIN, utc("2026-10-24T12:00:00Z"), 3);
        assert_eq!(
            runs,
            vec![
                utc("2026-10-25T00:30:00Z"), // 02:30 CEST, the first occurrence only
                utc("2026-10-26T01:30:00Z"), // 02:30 CET
                utc("2026-10-27T01:30:00Z"),
            ]
        );
        // Every local minute of the repeated hour fires once: after 02:59 CEST comes 03:00 CET.
        let minutely = CronExpr::parse("* * * * *").unwrap();
        let after = utc("2026-10-25T00:58:00Z"); // 02:58 CEST
        let runs = minutely.upcoming(BERLIN, after, 3);
        assert_eq!(
            runs,
            vec![
                utc("2026-10-25T00:59:00Z"), // 02:59 CEST
                utc("2026-10-25T02:00:00Z"), // 03:00 CET
                utc("2026-10-25T02:01:00Z"),
            ]
        );
        let local: Vec<u32> = runs.iter().map(|t| t.with_timezone(&BERLIN).hour()).collect();
        assert_eq!(local, vec![2, 3, 3]);
        // Starting inside the second pass never yields an instant in the past.
        let inside = utc("2026-10-25T01:10:00Z"); // 02:10 CET
        assert_eq!(minutely.next_after(BERLIN, inside), Some(utc("2026-10-25T01:11:00Z")));
    }

    #[test]
    fn plan_fires_the_newest_ticks_and_records_older_ones_missed() {
        let c = CronExpr::parse("* * * * * *").unwrap();
        let start = utc("2026-11-26T10:00:00Z");
        // On time: one tick due, it fires.
        let p = plan_due(&c, Tz::UTC, start, start, 1);
        assert_eq!(p.fire, vec![start]);
        assert!(p.missed.is_empty());
        assert_eq!(p.next_run_at, Some(start + Duration::seconds(1)));
        // Ten seconds late with the default catch-up of one: the newest fires, nine missed.
        let now = start + Duration::milliseconds(9_500);
        let p = plan_due(&c, Tz::UTC, start, now, 1);
        assert_eq!(p.fire, vec![start + Duration::seconds(9)]);
        assert_eq!(p.missed.len(), 9);
        assert_eq!(p.missed[0], start);
        assert_eq!(p.next_run_at, Some(start + Duration::seconds(10)));
        // A catch-up of three fires the newest three.
        let p = plan_due(&c, Tz::UTC, start, now, 3);
        assert_eq!(p.fire.len(), 3);
        assert_eq!(p.missed.len(), 7);
        // A long outage lists the first MAX_MISSED_LISTED and summarises the rest.
        let now = start + Duration::seconds(5_000);
        let p = plan_due(&c, Tz::UTC, start, now, 1);
        assert_eq!(p.missed.len(), MAX_MISSED_LISTED);
        let u = p.unlisted.unwrap();
        assert_eq!(u.count, 5_000 - MAX_MISSED_LISTED as u64);
        assert!(u.complete);
        assert_eq!(p.fire, vec![now]);
        // Not due yet: nothing to do.
        let p = plan_due(&c, Tz::UTC, start, start - Duration::seconds(1), 1);
        assert!(p.fire.is_empty() && p.missed.is_empty());
        assert_eq!(p.next_run_at, Some(start));
    }

    #[test]
    fn plan_gives_up_walking_after_the_scan_limit() {
        let c = CronExpr::parse("* * * * * *").unwrap();
        let start = utc("2026-01-01T00:00:00Z");
        let now = start + Duration::days(30);
        let p = plan_due(&c, Tz::UTC, start, now, 1);
        assert!(p.fire.is_empty());
        assert_eq!(p.next_run_at, Some(now + Duration::seconds(1)));
        assert!(!p.unlisted.unwrap().complete);
    }

    #[test]
    fn tick_keys_are_stable() {
        let id = uuid::Uuid::nil();
        let t = Utc.with_ymd_and_hms(2026, 3, 29, 1, 0, 0).unwrap();
        assert_eq!(tick_key(id, t), format!("schedule:{id}:2026-03-29T01:00:00Z"));
    }
}
