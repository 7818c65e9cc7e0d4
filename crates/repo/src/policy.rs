//! Which snapshots a retention policy keeps: restic's model, so `strata backup
//! prune` and `restic forget` keep the same snapshots of the same repository.
//!
//! The snapshots of one group are walked newest first. Each rule (`last`,
//! `hourly`, `daily`, `weekly`, `monthly`, `yearly`) has a count and puts every
//! snapshot in a bucket: its position for `last`, its hour, day, ISO week, month
//! or year otherwise, read in the time zone the snapshot's time was written in. A
//! rule keeps a snapshot when the snapshot opens a bucket the rule has not seen
//! yet and the rule's count is not used up; keeping uses one of the count. A
//! snapshot no rule keeps is removed. So `daily 7` keeps the newest snapshot of
//! each of the 7 most recent days that have snapshots, however far apart those
//! days are; several rules may keep the same snapshot (each names itself a
//! reason and uses its own count). An empty policy keeps everything.
//!
//! (Proxmox Backup Server's model differs in one way: a snapshot one rule keeps
//! is skipped by the later rules. restic's was chosen because restic reads the
//! same repositories and its `forget` must not disagree with strata's prune.)

use crate::time::{days_from_civil, Timestamp};

/// How many snapshots each rule keeps (0: the rule is off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl Policy {
    /// No rule is set.
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// A rule of a [`Policy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    /// The words restic uses for the rule in its reasons.
    pub fn reason(self) -> &'static str {
        match self {
            Rule::Last => "last snapshot",
            Rule::Hourly => "hourly snapshot",
            Rule::Daily => "daily snapshot",
            Rule::Weekly => "weekly snapshot",
            Rule::Monthly => "monthly snapshot",
            Rule::Yearly => "yearly snapshot",
        }
    }

    /// The bucket of a snapshot taken at local date-time `t` (the `nr`th newest).
    fn bucket(self, t: &Local, nr: usize) -> i64 {
        match self {
            Rule::Last => nr as i64,
            Rule::Hourly => ((t.year * 100 + t.month) * 100 + t.day) * 100 + t.hour,
            Rule::Daily => (t.year * 100 + t.month) * 100 + t.day,
            Rule::Weekly => {
                let (y, w) = t.iso_week();
                y * 100 + w
            }
            Rule::Monthly => t.year * 100 + t.month,
            Rule::Yearly => t.year,
        }
    }
}

/// A snapshot's time: the instant and the zone offset it was written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotTime {
    pub at: Timestamp,
    /// Seconds east of UTC.
    pub offset: i64,
}

impl SnapshotTime {
    /// From a snapshot's RFC 3339 time (the epoch in UTC when it does not parse).
    pub fn parse(s: &str) -> SnapshotTime {
        let (at, offset) =
            Timestamp::parse_with_offset(s).unwrap_or((Timestamp { secs: 0, nanos: 0 }, 0));
        SnapshotTime { at, offset }
    }
}

/// Calendar fields in the snapshot's own zone.
struct Local {
    days: i64,
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
}

impl Local {
    fn of(t: &SnapshotTime) -> Local {
        let local = Timestamp {
            secs: t.at.secs.saturating_add(t.offset),
            nanos: 0,
        };
        let (y, mo, d, h, _, _) = local.civil();
        Local {
            days: local.secs.div_euclid(86_400),
            year: y,
            month: i64::from(mo),
            day: i64::from(d),
            hour: i64::from(h),
        }
    }

    /// ISO 8601 year and week: weeks start on Monday, and week 1 is the one
    /// holding the year's first Thursday.
    fn iso_week(&self) -> (i64, i64) {
        let weekday = (self.days + 3).rem_euclid(7); // 0 = Monday
        let thursday = self.days - weekday + 3;
        let (y, _, _, _, _, _) = Timestamp {
            secs: thursday * 86_400,
            nanos: 0,
        }
        .civil();
        (y, (thursday - days_from_civil(y, 1, 1)) / 7 + 1)
    }
}

/// The verdict on one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub keep: bool,
    /// The rules that keep it (empty when it is removed, or when the policy is empty).
    pub reasons: Vec<Rule>,
}

/// Apply `policy` to the snapshots of one group taken at `times` (any order);
/// the decisions come back in the order of `times`. Snapshots with equal times
/// are taken in the order given.
pub fn apply(policy: &Policy, times: &[SnapshotTime]) -> Vec<Decision> {
    let mut out = vec![
        Decision {
            keep: policy.is_empty(),
            reasons: Vec::new(),
        };
        times.len()
    ];
    if policy.is_empty() {
        return out;
    }
    let mut order: Vec<usize> = (0..times.len()).collect();
    order.sort_by(|&a, &b| times[b].at.cmp(&times[a].at)); // stable: newest first
    let mut rules = [
        (Rule::Last, policy.last, None),
        (Rule::Hourly, policy.hourly, None),
        (Rule::Daily, policy.daily, None),
        (Rule::Weekly, policy.weekly, None),
        (Rule::Monthly, policy.monthly, None),
        (Rule::Yearly, policy.yearly, None),
    ];
    for (nr, &i) in order.iter().enumerate() {
        let local = Local::of(&times[i]);
        for (rule, left, last) in rules.iter_mut() {
            if *left == 0 {
                continue;
            }
            let b = rule.bucket(&local, nr);
            if *last != Some(b) {
                *last = Some(b);
                *left -= 1;
                out[i].keep = true;
                out[i].reasons.push(*rule);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> SnapshotTime {
        let parsed = SnapshotTime::parse(s);
        assert_ne!(parsed.at.secs, 0, "bad test time {s}");
        parsed
    }

    fn kept(policy: Policy, times: &[&str]) -> Vec<&'static str> {
        let times: Vec<SnapshotTime> = times.iter().map(|s| t(s)).collect();
        apply(&policy, &times)
            .iter()
            .map(|d| match d.reasons.as_slice() {
                _ if !d.keep => "-",
                [] => "keep",
                [r, ..] => r.reason(),
            })
            .collect()
    }

    const HOURS: [&str; 6] = [
        "2024-03-10T09:05:00Z",
        "2024-03-10T09:55:00Z",
        "2024-03-10T10:10:00Z",
        "2024-03-10T11:00:00Z",
        "2024-03-11T08:00:00Z",
        "2024-03-12T23:59:59Z",
    ];

    #[test]
    fn each_rule_keeps_the_newest_snapshot_of_its_most_recent_buckets() {
        let table: [(Policy, [&str; 6]); 6] = [
            (
                Policy {
                    last: 2,
                    ..Policy::default()
                },
                ["-", "-", "-", "-", "last snapshot", "last snapshot"],
            ),
            (
                Policy {
                    hourly: 4,
                    ..Policy::default()
                },
                [
                    "-",
                    "-",
                    "hourly snapshot",
                    "hourly snapshot",
                    "hourly snapshot",
                    "hourly snapshot",
                ],
            ),
            (
                Policy {
                    hourly: 10,
                    ..Policy::default()
                },
                [
                    "-",
                    "hourly snapshot",
                    "hourly snapshot",
                    "hourly snapshot",
                    "hourly snapshot",
                    "hourly snapshot",
                ],
            ),
            (
                Policy {
                    daily: 2,
                    ..Policy::default()
                },
                ["-", "-", "-", "-", "daily snapshot", "daily snapshot"],
            ),
            (
                Policy {
                    daily: 3,
                    ..Policy::default()
                },
                [
                    "-",
                    "-",
                    "-",
                    "daily snapshot",
                    "daily snapshot",
                    "daily snapshot",
                ],
            ),
            (
                Policy {
                    // 2024-03-10 is a Sunday: the 11th opens a new ISO week.
                    weekly: 5,
                    ..Policy::default()
                },
                ["-", "-", "-", "weekly snapshot", "-", "weekly snapshot"],
            ),
        ];
        for (policy, want) in table {
            assert_eq!(kept(policy, &HOURS), want, "{policy:?}");
        }
    }

    #[test]
    fn rules_share_snapshots_and_each_counts_its_own() {
        let p = Policy {
            last: 1,
            daily: 2,
            ..Policy::default()
        };
        let times: Vec<SnapshotTime> = HOURS.iter().map(|s| t(s)).collect();
        let d = apply(&p, &times);
        assert_eq!(d[5].reasons, vec![Rule::Last, Rule::Daily]);
        assert_eq!(d[4].reasons, vec![Rule::Daily]);
        assert!(d[..4].iter().all(|d| !d.keep));
    }

    #[test]
    fn months_and_years_are_calendar_buckets_and_gaps_do_not_count() {
        let times = [
            "2019-12-31T23:00:00Z",
            "2021-01-01T00:00:00Z",
            "2021-01-31T12:00:00Z",
            "2021-02-01T00:00:00Z",
            "2023-06-15T00:00:00Z",
        ];
        let monthly = Policy {
            monthly: 3,
            ..Policy::default()
        };
        assert_eq!(
            kept(monthly, &times),
            [
                "-",
                "-",
                "monthly snapshot",
                "monthly snapshot",
                "monthly snapshot"
            ]
        );
        let yearly = Policy {
            yearly: 3,
            ..Policy::default()
        };
        assert_eq!(
            kept(yearly, &times),
            [
                "yearly snapshot",
                "-",
                "-",
                "yearly snapshot",
                "yearly snapshot"
            ]
        );
    }

    #[test]
    fn buckets_are_read_in_the_zone_the_time_was_written_in() {
        // The same instant is still the 10th in New York but the 11th in UTC.
        let times = ["2024-03-10T22:00:00-04:00", "2024-03-11T01:00:00Z"];
        let daily = Policy {
            daily: 5,
            ..Policy::default()
        };
        assert_eq!(kept(daily, &times), ["daily snapshot", "daily snapshot"]);
        let times = ["2024-03-11T02:00:00+00:00", "2024-03-11T01:00:00Z"];
        assert_eq!(kept(daily, &times), ["daily snapshot", "-"]);
    }

    #[test]
    fn iso_weeks_cross_year_ends() {
        // 2020-12-31 (Thu) is in 2020-W53, 2021-01-03 (Sun) too, 2021-01-04 is W1.
        let weeks: Vec<(i64, i64)> = ["2020-12-31", "2021-01-03", "2021-01-04", "2019-12-30"]
            .iter()
            .map(|d| Local::of(&t(&format!("{d}T12:00:00Z"))).iso_week())
            .collect();
        assert_eq!(weeks, [(2020, 53), (2020, 53), (2021, 1), (2020, 1)]);
    }

    #[test]
    fn an_empty_policy_keeps_everything_and_input_order_is_kept() {
        let times = ["2024-03-12T00:00:00Z", "2024-03-10T00:00:00Z"];
        assert_eq!(kept(Policy::default(), &times), ["keep", "keep"]);
        let last = Policy {
            last: 1,
            ..Policy::default()
        };
        assert_eq!(kept(last, &times), ["last snapshot", "-"]);
    }
}
