//! Recurrence math: when the next occurrence of a recurring task is due.
//!
//! The rule is evaluated in the task's IANA time zone, starting at the completed occurrence's due
//! date, so "every Monday 09:00 in New York" stays at 09:00 local time across daylight-saving
//! changes. The next occurrence is the first instance strictly after that due date which is also
//! later than the completion time, so completing late does not leave a pile of overdue copies.
//! `COUNT` counts occurrences of the series (the first task is occurrence 1, the next one created
//! is n+1 however late the completion); `UNTIL` ends it.
//!
//! Every search is bounded, whatever the rule and the lateness: it starts in the rule's period
//! that holds the completion time (a whole number of `INTERVAL`s after the due date, so the
//! series keeps its phase), not at the due date, and it runs with rrule's iteration limit, so a
//! rule that never matches again gives up instead of walking to year 10000. `recurs_after` is the
//! same search, used to refuse such a rule when a task is created or rescheduled.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime, TimeZone as _, Timelike, Utc};
use rrule::{Frequency, RRule, RRuleSet, Tz, Validated};

use crate::values::{Recurrence, TimeZone};

/// What follows a completed occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextOccurrence {
    /// The next occurrence (number `occurrence`) is due at `due_at`.
    Due { due_at: DateTime<Utc>, occurrence: u32 },
    /// COUNT or UNTIL ended the series.
    SeriesEnded,
    /// The rule has no instance within the search's bound (rrule's iteration limit): it never
    /// matches again, or not for centuries (only possible for a rule stored before the check at
    /// create/update).
    GaveUp,
}

/// The occurrence after occurrence number `occurrence` (1-based), which was due at `due_at` and
/// completed at `completed_at`.
pub fn next_occurrence(rule: &Recurrence, timezone: TimeZone, due_at: DateTime<Utc>, completed_at: DateTime<Utc>, occurrence: u32) -> NextOccurrence {
    let after = due_at.max(completed_at);
    let Some(Pattern { rule: pattern, count, until, start }) = pattern(rule, timezone, due_at) else { return NextOccurrence::SeriesEnded };
    if count.is_some_and(|c| occurrence >= c) || until.is_some_and(|u| u <= after) {
        return NextOccurrence::SeriesEnded;
    }
    match first_after(pattern, start, after) {
        Some(next) if until.is_some_and(|u| next > u) => NextOccurrence::SeriesEnded,
        Some(due_at) => NextOccurrence::Due { due_at, occurrence: occurrence + 1 },
        None => NextOccurrence::GaveUp,
    }
}

/// Whether the rule has an instance after `due_at` (its first occurrence) within the search's
/// bound. `COUNT` and `UNTIL` are not held against it: they end a series on purpose (the last
/// occurrence of a series has none after it and is still a valid task); an `UNTIL` before
/// `due_at` fails the rule's validation against its start.
pub fn recurs_after(rule: &Recurrence, timezone: TimeZone, due_at: DateTime<Utc>) -> bool {
    pattern(rule, timezone, due_at).is_some_and(|p| first_after(p.rule, p.start, due_at).is_some())
}

/// A rule split into its repeating pattern and its ends.
struct Pattern {
    /// The rule without `COUNT` and `UNTIL`, validated against its start. Validation makes
    /// explicit what the start implies (the weekday of a weekly rule, the time of day of a daily
    /// one), so the search may start elsewhere.
    rule: RRule<Validated>,
    count: Option<u32>,
    until: Option<DateTime<Utc>>,
    /// The due date in the task's zone.
    start: DateTime<Tz>,
}

fn pattern(rule: &Recurrence, timezone: TimeZone, due_at: DateTime<Utc>) -> Option<Pattern> {
    let start = due_at.with_timezone(&Tz::Tz(timezone.tz()));
    let full = rule.as_ref().parse::<RRule<rrule::Unvalidated>>().ok()?.validate(start).ok()?;
    let repeating: Vec<&str> = rule.as_ref().split(';').filter(|part| !part.starts_with("COUNT=") && !part.starts_with("UNTIL=")).collect();
    Some(Pattern {
        rule: repeating.join(";").parse::<RRule<rrule::Unvalidated>>().ok()?.validate(start).ok()?,
        count: full.get_count(),
        until: full.get_until().map(|u| u.with_timezone(&Utc)),
        start,
    })
}

/// The first instance strictly after `after` of `pattern` started at `start`, or `None` when
/// rrule's iteration limit (100 000 periods in a row without an instance) or its last year is
/// reached first.
fn first_after(pattern: RRule<Validated>, start: DateTime<Tz>, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let from = search_start(&pattern, start, after);
    // `all` applies rrule's iteration limit; its `after` is inclusive, hence two.
    let found = RRuleSet::new(from).rrule(pattern).after(after.with_timezone(&from.timezone())).all(2);
    found.dates.iter().map(|d| d.with_timezone(&Utc)).find(|d| *d > after)
}

/// Where the search for the first instance after `after` starts: the beginning of the rule's
/// period (year, month, week from WKST, day, hour, minute or second, in local time, as rrule
/// counts them) that holds `after`, rounded down to a whole number of `INTERVAL`s from `start`'s
/// period so the series keeps its phase. Every instance after `after` is at or after it, so only
/// the instances of about one period are passed over, however late the completion.
fn search_start(pattern: &RRule<Validated>, start: DateTime<Tz>, after: DateTime<Utc>) -> DateTime<Tz> {
    let tz = start.timezone();
    let freq = pattern.get_freq();
    let wkst = pattern.get_week_start();
    // A clock turned back within the next day shows times before `after`'s local time later on.
    let local = after.with_timezone(&tz).naive_local();
    let target = local.min((after + Duration::days(1)).with_timezone(&tz).naive_local() - Duration::days(1));
    let first = period_start(freq, wkst, start.naive_local());
    let interval = i64::from(pattern.get_interval().max(1));
    let mut k = periods_between(freq, first, period_start(freq, wkst, target)).div_euclid(interval);
    // A period start that does not exist in the zone (skipped by a clock change): one more back.
    for _ in 0..3 {
        if k <= 0 {
            break;
        }
        let candidate = advance(freq, first, k * interval).and_then(|n| tz.from_local_datetime(&n).earliest());
        if let Some(s) = candidate.filter(|s| s.with_timezone(&Utc) <= after) {
            return s;
        }
        k -= 1;
    }
    start
}

fn period_start(freq: Frequency, wkst: chrono::Weekday, at: NaiveDateTime) -> NaiveDateTime {
    let date = at.date();
    let (h, m, s) = (at.hour(), at.minute(), at.second());
    let midnight = |d: NaiveDate| d.and_time(NaiveTime::MIN);
    let time = |h, m, s| date.and_time(NaiveTime::from_hms_opt(h, m, s).expect("a valid time"));
    match freq {
        Frequency::Yearly => midnight(date.with_ordinal(1).expect("every year has a first day")),
        Frequency::Monthly => midnight(date.with_day(1).expect("every month has a first day")),
        Frequency::Weekly => midnight(date - Duration::days(i64::from(date.weekday().days_since(wkst)))),
        Frequency::Daily => midnight(date),
        Frequency::Hourly => time(h, 0, 0),
        Frequency::Minutely => time(h, m, 0),
        Frequency::Secondly => time(h, m, s),
    }
}

/// Whole periods from the period starting at `from` to the one starting at `to`.
fn periods_between(freq: Frequency, from: NaiveDateTime, to: NaiveDateTime) -> i64 {
    let months = |d: NaiveDateTime| i64::from(d.year()) * 12 + i64::from(d.month0());
    match freq {
        Frequency::Yearly => i64::from(to.year() - from.year()),
        Frequency::Monthly => months(to) - months(from),
        Frequency::Weekly => (to - from).num_days() / 7,
        Frequency::Daily => (to - from).num_days(),
        Frequency::Hourly => (to - from).num_hours(),
        Frequency::Minutely => (to - from).num_minutes(),
        Frequency::Secondly => (to - from).num_seconds(),
    }
}

/// The start of the period `n` periods after the one starting at `from`.
fn advance(freq: Frequency, from: NaiveDateTime, n: i64) -> Option<NaiveDateTime> {
    let months = |n: i64| from.checked_add_months(chrono::Months::new(u32::try_from(n).ok()?));
    match freq {
        Frequency::Yearly => months(n.checked_mul(12)?),
        Frequency::Monthly => months(n),
        Frequency::Weekly => from.checked_add_signed(Duration::try_weeks(n)?),
        Frequency::Daily => from.checked_add_signed(Duration::try_days(n)?),
        Frequency::Hourly => from.checked_add_signed(Duration::try_hours(n)?),
        Frequency::Minutely => from.checked_add_signed(Duration::try_minutes(n)?),
        Frequency::Secondly => from.checked_add_signed(Duration::try_seconds(n)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
    }
    fn rule(s: &str) -> Recurrence {
        Recurrence::parse(s.into()).unwrap()
    }
    fn zone(s: &str) -> TimeZone {
        TimeZone::parse(s.into()).unwrap()
    }

    /// given a rule in a zone, when occurrence `n` due at `due` is completed at `done`, then ...
    struct Given {
        rule: Recurrence,
        zone: TimeZone,
    }
    fn given(r: &str, z: &str) -> Given {
        Given { rule: rule(r), zone: zone(z) }
    }
    impl Given {
        #[track_caller]
        fn when_completed(&self, n: u32, due: DateTime<Utc>, done: DateTime<Utc>) -> NextOccurrence {
            next_occurrence(&self.rule, self.zone, due, done, n)
        }
        #[track_caller]
        fn then_next(&self, n: u32, due: DateTime<Utc>, done: DateTime<Utc>, want: DateTime<Utc>) {
            assert_eq!(self.when_completed(n, due, done), NextOccurrence::Due { due_at: want, occurrence: n + 1 });
        }
    }

    #[test]
    fn daily_on_time_and_early() {
        let g = given("FREQ=DAILY", "UTC");
        g.then_next(1, utc(2026, 3, 1, 9, 0), utc(2026, 3, 1, 8, 0), utc(2026, 3, 2, 9, 0));
        g.then_next(1, utc(2026, 3, 1, 9, 0), utc(2026, 2, 20, 8, 0), utc(2026, 3, 2, 9, 0));
    }

    #[test]
    fn daily_with_interval() {
        given("FREQ=DAILY;INTERVAL=3", "UTC").then_next(1, utc(2026, 3, 1, 9, 0), utc(2026, 3, 1, 9, 0), utc(2026, 3, 4, 9, 0));
    }

    #[test]
    fn weekly_byday_picks_the_next_listed_day() {
        let g = given("FREQ=WEEKLY;BYDAY=MO,TH", "UTC");
        // 2026-03-02 is a Monday.
        g.then_next(1, utc(2026, 3, 2, 9, 0), utc(2026, 3, 2, 10, 0), utc(2026, 3, 5, 9, 0));
        g.then_next(2, utc(2026, 3, 5, 9, 0), utc(2026, 3, 5, 10, 0), utc(2026, 3, 9, 9, 0));
    }

    #[test]
    fn monthly_bymonthday_and_month_end() {
        given("FREQ=MONTHLY;BYMONTHDAY=15", "UTC").then_next(1, utc(2026, 1, 15, 9, 0), utc(2026, 1, 15, 9, 0), utc(2026, 2, 15, 9, 0));
        // The last day of every month.
        let last = given("FREQ=MONTHLY;BYMONTHDAY=-1", "UTC");
        last.then_next(1, utc(2026, 1, 31, 9, 0), utc(2026, 1, 31, 9, 0), utc(2026, 2, 28, 9, 0));
        last.then_next(2, utc(2026, 2, 28, 9, 0), utc(2026, 2, 28, 9, 0), utc(2026, 3, 31, 9, 0));
        // RFC 5545: a month without the 31st is skipped.
        given("FREQ=MONTHLY", "UTC").then_next(1, utc(2026, 1, 31, 9, 0), utc(2026, 1, 31, 9, 0), utc(2026, 3, 31, 9, 0));
        // Leap years.
        given("FREQ=MONTHLY;BYMONTHDAY=-1", "UTC").then_next(1, utc(2028, 1, 31, 9, 0), utc(2028, 1, 31, 9, 0), utc(2028, 2, 29, 9, 0));
    }

    #[test]
    fn yearly_including_february_29() {
        given("FREQ=YEARLY", "UTC").then_next(1, utc(2026, 6, 1, 9, 0), utc(2026, 6, 1, 9, 0), utc(2027, 6, 1, 9, 0));
        given("FREQ=YEARLY", "UTC").then_next(1, utc(2028, 2, 29, 9, 0), utc(2028, 2, 29, 9, 0), utc(2032, 2, 29, 9, 0));
    }

    #[test]
    fn weekly_nine_am_new_york_keeps_local_time_across_both_dst_changes() {
        let g = given("FREQ=WEEKLY;BYDAY=MO", "America/New_York");
        // 2026-03-02 09:00 EST = 14:00Z; DST starts 2026-03-08; 2026-03-09 09:00 EDT = 13:00Z.
        g.then_next(1, utc(2026, 3, 2, 14, 0), utc(2026, 3, 2, 15, 0), utc(2026, 3, 9, 13, 0));
        // 2026-10-26 09:00 EDT = 13:00Z; DST ends 2026-11-01; 2026-11-02 09:00 EST = 14:00Z.
        g.then_next(5, utc(2026, 10, 26, 13, 0), utc(2026, 10, 26, 13, 30), utc(2026, 11, 2, 14, 0));
    }

    #[test]
    fn late_completion_skips_missed_instances() {
        let g = given("FREQ=DAILY", "UTC");
        // Due 1 March, completed 5 March 12:00: the next is 6 March, not 2 March.
        g.then_next(1, utc(2026, 3, 1, 9, 0), utc(2026, 3, 5, 12, 0), utc(2026, 3, 6, 9, 0));
        given("FREQ=WEEKLY;BYDAY=MO", "Europe/Berlin").then_next(1, utc(2026, 3, 2, 8, 0), utc(2026, 3, 20, 8, 0), utc(2026, 3, 23, 8, 0));
    }

    #[test]
    fn count_ends_the_series() {
        let g = given("FREQ=DAILY;COUNT=3", "UTC");
        g.then_next(1, utc(2026, 3, 1, 9, 0), utc(2026, 3, 1, 9, 0), utc(2026, 3, 2, 9, 0));
        g.then_next(2, utc(2026, 3, 2, 9, 0), utc(2026, 3, 2, 9, 0), utc(2026, 3, 3, 9, 0));
        assert_eq!(g.when_completed(3, utc(2026, 3, 3, 9, 0), utc(2026, 3, 3, 9, 0)), NextOccurrence::SeriesEnded);
    }

    #[test]
    fn until_ends_the_series() {
        let g = given("FREQ=DAILY;UNTIL=20260303T090000Z", "UTC");
        g.then_next(1, utc(2026, 3, 2, 9, 0), utc(2026, 3, 2, 9, 0), utc(2026, 3, 3, 9, 0));
        assert_eq!(g.when_completed(2, utc(2026, 3, 3, 9, 0), utc(2026, 3, 3, 9, 0)), NextOccurrence::SeriesEnded);
        // Completed so late that every remaining instance has passed.
        assert_eq!(g.when_completed(1, utc(2026, 3, 2, 9, 0), utc(2026, 4, 1, 9, 0)), NextOccurrence::SeriesEnded);
    }

    #[test]
    fn late_completion_of_a_minutely_or_secondly_series_continues_it() {
        // Due 80 days before the completion: the next instance is the first one after it.
        let done = Utc.with_ymd_and_hms(2026, 5, 20, 10, 3, 10).unwrap();
        let due = done - chrono::Duration::days(80) - chrono::Duration::minutes(3) - chrono::Duration::seconds(10);
        given("FREQ=MINUTELY", "UTC").then_next(1, due, done, utc(2026, 5, 20, 10, 4));
        given("FREQ=SECONDLY", "UTC").then_next(1, due, done, done + chrono::Duration::seconds(1));
        // The phase of INTERVAL is kept: every 7 minutes from the due date.
        let minutes = (done - due).num_minutes() / 7 * 7 + 7;
        given("FREQ=MINUTELY;INTERVAL=7", "UTC").then_next(1, due, done, due + chrono::Duration::minutes(minutes));
        // Years late, in a zone with daylight saving time.
        let due = Utc.with_ymd_and_hms(2016, 1, 4, 8, 0, 0).unwrap();
        given("FREQ=SECONDLY;INTERVAL=15", "Europe/Berlin").then_next(3, due, done, utc(2026, 5, 20, 10, 3) + chrono::Duration::seconds(15));
    }

    #[test]
    fn a_rule_that_never_matches_gives_up_within_rrules_iteration_limit() {
        // February never has a 30th; without a bound the search walks to year 10000.
        for r in ["FREQ=DAILY;BYMONTH=2;BYMONTHDAY=30", "FREQ=MINUTELY;BYMONTH=2;BYMONTHDAY=30"] {
            let due = utc(2026, 3, 1, 0, 0);
            assert_eq!(given(r, "UTC").when_completed(1, due, due), NextOccurrence::GaveUp, "{r}");
        }
    }

    #[test]
    fn the_search_starts_in_the_period_of_the_completion_however_late() {
        // Only the instances of about one period are passed over: none for a minutely or secondly
        // rule 80 days (or ten years) late, at most two for every third day.
        let done = Utc.with_ymd_and_hms(2026, 5, 20, 10, 3, 10).unwrap();
        let start_for = |r: &str, due: DateTime<Utc>| {
            let p = pattern(&rule(r), zone("Europe/Berlin"), due).unwrap();
            search_start(&p.rule, p.start, done).with_timezone(&Utc)
        };
        for late in [chrono::Duration::days(80), chrono::Duration::days(3653)] {
            let due = done - late - chrono::Duration::seconds(130);
            assert_eq!(start_for("FREQ=MINUTELY", due), utc(2026, 5, 20, 10, 3), "{late}");
            assert_eq!(start_for("FREQ=SECONDLY", due), done, "{late}");
            let daily = start_for("FREQ=DAILY;INTERVAL=3", due);
            assert!(daily <= done && done - daily < chrono::Duration::days(3), "{daily} {late}");
        }
        // A clock turned back the next night (Berlin, 2026-10-25 03:00 CEST -> 02:00 CET): the
        // hour after it shows local times before the completion's, so the search starts earlier.
        let done = Utc.with_ymd_and_hms(2026, 10, 25, 0, 30, 0).unwrap();
        let p = pattern(&rule("FREQ=MINUTELY"), zone("Europe/Berlin"), done - chrono::Duration::days(80)).unwrap();
        let start = search_start(&p.rule, p.start, done).with_timezone(&Utc);
        assert!(start <= done - chrono::Duration::hours(1) && start > done - chrono::Duration::hours(2), "{start}");
    }

    /// The old way, without a bound: every instance from the due date on.
    fn stepping(r: &str, z: &str, due: DateTime<Utc>, done: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let start = due.with_timezone(&Tz::Tz(zone(z).tz()));
        let set = r.parse::<RRule<rrule::Unvalidated>>().unwrap().build(start).unwrap();
        set.into_iter().map(|d| d.with_timezone(&Utc)).find(|d| *d > due.max(done))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        /// Starting the search at the completion finds what stepping from the due date finds.
        #[test]
        fn starting_at_the_completion_finds_what_stepping_finds(
            (r, max_late) in proptest::sample::select(vec![
                ("FREQ=SECONDLY;INTERVAL=7", 3_000i64),
                // (rrule 0.14 itself loses the phase of an INTERVAL that does not divide 60 when
                // BYHOUR skips hours, so stepping is no reference for such a rule.)
                ("FREQ=MINUTELY;INTERVAL=15;BYHOUR=9,10,22", 200_000),
                ("FREQ=MINUTELY;BYSECOND=5,50", 200_000),
                ("FREQ=HOURLY;INTERVAL=5;BYMINUTE=0,30", 5_000_000),
                ("FREQ=DAILY;INTERVAL=3;BYHOUR=1,2,3", 100_000_000),
                ("FREQ=WEEKLY;INTERVAL=2;BYDAY=MO,SU;WKST=SU", 300_000_000),
                ("FREQ=MONTHLY;BYDAY=-1FR", 300_000_000),
                ("FREQ=MONTHLY;INTERVAL=5;BYMONTHDAY=31", 300_000_000),
                ("FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=29", 300_000_000),
                ("FREQ=YEARLY;INTERVAL=3;BYWEEKNO=1;BYDAY=MO;BYSETPOS=1", 300_000_000),
            ]),
            z in proptest::sample::select(vec!["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]),
            due_s in 1_700_000_000i64..1_900_000_000,
            late_frac in 0.0f64..1.0,
        ) {
            let due = DateTime::from_timestamp(due_s, 0).unwrap();
            let done = due + chrono::Duration::seconds((late_frac * max_late as f64) as i64);
            let want = stepping(r, z, due, done).map_or(NextOccurrence::SeriesEnded, |d| NextOccurrence::Due { due_at: d, occurrence: 2 });
            proptest::prop_assert_eq!(next_occurrence(&rule(r), zone(z), due, done, 1), want);
        }
    }
}
