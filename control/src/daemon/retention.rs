//! Retention: which backups of a VM a prune keeps, as Proxmox Backup Server's prune decides.
//!
//! The rules run in the order keep-last, keep-hourly, keep-daily, keep-weekly, keep-monthly,
//! keep-yearly, each over the backups newest first. A rule `keep-X N` keeps the newest backup
//! of each of the N most recent periods (hours, days, ISO weeks from Monday, months, years)
//! that hold a backup and that no earlier rule has kept a backup in; keep-last's period is the
//! backup itself. The other backups of a period a rule covered are removed, and so is every
//! backup no rule kept. Periods are UTC, as schedules are ([`super::calendar`]).
//!
//! [`select`] only decides; [`Daemon::prune`] applies a decision to the repository: it
//! deletes the backups no rule keeps, then collects garbage. The repository has no
//! dependency between backups to guard: an incremental backup's manifest lists every chunk
//! of the disk (docs/repository.md), so deleting its parent takes nothing from it; and the
//! next incremental backup starts from the VM's newest backup, which a prune always keeps.

use std::collections::HashSet;
use std::fmt;

use super::calendar::{civil_from_days, days_from_civil, weekday};
use super::{Daemon, Error, Result};
use livesnap_repo as repo;

/// How many backups each rule keeps; 0: the rule is off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keep {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl Keep {
    /// No rule is on: such a retention would remove everything, and is refused.
    pub fn is_empty(&self) -> bool {
        self.rules().iter().all(|(_, n)| *n == 0)
    }

    fn rules(&self) -> [(Rule, u32); 6] {
        [
            (Rule::Last, self.last),
            (Rule::Hourly, self.hourly),
            (Rule::Daily, self.daily),
            (Rule::Weekly, self.weekly),
            (Rule::Monthly, self.monthly),
            (Rule::Yearly, self.yearly),
        ]
    }
}

impl fmt::Display for Keep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on: Vec<String> = self.rules().iter().filter(|(_, n)| *n > 0).map(|(r, n)| format!("{r} {n}")).collect();
        if on.is_empty() {
            f.write_str("no rule")
        } else {
            f.write_str(&on.join(", "))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Last => "keep-last",
            Rule::Hourly => "keep-hourly",
            Rule::Daily => "keep-daily",
            Rule::Weekly => "keep-weekly",
            Rule::Monthly => "keep-monthly",
            Rule::Yearly => "keep-yearly",
        }
    }

    /// The period `unix_us` falls in, as a number unique within the rule.
    fn period(self, id: usize, unix_us: u64) -> i64 {
        let secs = i64::try_from(unix_us / 1_000_000).unwrap_or(i64::MAX);
        let days = secs.div_euclid(86_400);
        let (y, m, _) = civil_from_days(days);
        match self {
            Rule::Last => id as i64,
            Rule::Hourly => secs.div_euclid(3600),
            Rule::Daily => days,
            Rule::Weekly => {
                // ISO 8601: a week belongs to the year of its Thursday; numbered by its Monday.
                days - i64::from(weekday(days))
            }
            Rule::Monthly => y * 12 + i64::from(m),
            Rule::Yearly => y,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a backup is kept: the rule, and which of its periods (`keep-daily 3/7`: the third of
/// seven days).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept {
    pub rule: Rule,
    pub n: u32,
    pub of: u32,
}

impl fmt::Display for Kept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.rule, self.n, self.of)
    }
}

/// A backup as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub created_unix_us: u64,
}

/// The decision for one backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub created_unix_us: u64,
    /// `None`: removed.
    pub kept: Option<Kept>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    Keep(Kept),
    Remove,
}

/// Decides, for each of `backups` (any order), whether `keep` keeps it; the decisions come
/// oldest first. With at least one rule on, the newest backup is always kept; with none,
/// every backup is (a retention without rules removes nothing, as PBS's does).
pub fn select(backups: &[Candidate], keep: &Keep) -> Vec<Decision> {
    let mut order: Vec<usize> = (0..backups.len()).collect();
    // Newest first; the id breaks ties so that the result does not depend on the input order.
    order.sort_by(|&a, &b| {
        (backups[b].created_unix_us, &backups[b].id).cmp(&(backups[a].created_unix_us, &backups[a].id))
    });
    let mut marks: Vec<Option<Mark>> = vec![None; backups.len()];
    if keep.is_empty() {
        marks.iter_mut().for_each(|m| *m = Some(Mark::Keep(Kept { rule: Rule::Last, n: 0, of: 0 })));
    }
    for (rule, n) in keep.rules() {
        if n == 0 {
            continue;
        }
        let period = |i: usize| rule.period(i, backups[i].created_unix_us);
        // Periods a previous rule kept a backup in are not this rule's to count.
        let already: HashSet<i64> =
            order.iter().filter(|&&i| matches!(marks[i], Some(Mark::Keep(_)))).map(|&i| period(i)).collect();
        let mut included: HashSet<i64> = HashSet::new();
        for &i in &order {
            if marks[i].is_some() {
                continue;
            }
            let p = period(i);
            if already.contains(&p) {
                continue;
            }
            if included.contains(&p) {
                marks[i] = Some(Mark::Remove);
                continue;
            }
            if included.len() >= n as usize {
                break;
            }
            included.insert(p);
            marks[i] = Some(Mark::Keep(Kept { rule, n: included.len() as u32, of: n }));
        }
    }
    let mut out: Vec<Decision> = order
        .iter()
        .rev()
        .map(|&i| Decision {
            id: backups[i].id.clone(),
            created_unix_us: backups[i].created_unix_us,
            kept: match marks[i] {
                Some(Mark::Keep(k)) => Some(k),
                _ => None,
            },
        })
        .collect();
    // The newest is always kept (the rules above keep it already: this only guards).
    if let Some(newest) = out.last_mut() {
        if newest.kept.is_none() {
            newest.kept = Some(Kept { rule: Rule::Last, n: 1, of: 1 });
        }
    }
    out
}

/// What a prune is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneRequest {
    pub vm: String,
    /// `None`: the retention of the VM's schedule.
    pub keep: Option<Keep>,
    /// Decide and report, delete nothing.
    pub dry_run: bool,
}

/// What a prune decided and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneOutcome {
    pub keep: Keep,
    /// Every backup of the VM, oldest first, with why it is kept.
    pub decisions: Vec<Decision>,
    pub dry_run: bool,
    /// Deleted, oldest first (none on a dry run).
    pub deleted: Vec<String>,
    /// The garbage collection after the deletes; `None` when nothing was deleted, or when it
    /// was deferred.
    pub gc: Option<repo::GcReport>,
    /// Why the collection was left for a later prune (a backup was being written).
    pub gc_deferred: Option<String>,
}

impl Daemon {
    /// Applies retention to `req.vm`'s backups (see the module's documentation): the
    /// request's rules, or those of the VM's schedule.
    pub async fn prune(&self, req: PruneRequest) -> Result<PruneOutcome> {
        self.vm_config(&req.vm)?;
        let keep = match req.keep {
            Some(k) if k.is_empty() => {
                return Err(Error::InvalidArgument(
                    "A prune needs a rule that keeps at least one backup (keep-last, keep-daily, …)".into(),
                ))
            }
            Some(k) => k,
            None => self.config.schedule_of(&req.vm).and_then(|s| s.keep).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "VM {} has no retention configured (a [[schedule]] with keep): give the rules to keep by",
                    req.vm
                ))
            })?,
        };
        let (vm, dry_run) = (req.vm, req.dry_run);
        self.blocking(move |repo, store| {
            let candidates: Vec<Candidate> = repo
                .list(Some(&vm))?
                .into_iter()
                .map(|b| Candidate { id: b.id, created_unix_us: b.created_unix_us })
                .collect();
            let decisions = select(&candidates, &keep);
            let mut out = PruneOutcome { keep, decisions, dry_run, deleted: Vec::new(), gc: None, gc_deferred: None };
            if dry_run {
                return Ok(out);
            }
            let remove: Vec<String> = out.decisions.iter().filter(|d| d.kept.is_none()).map(|d| d.id.clone()).collect();
            super::live::refuse_if_restoring(store, &vm, &remove)?;
            for id in remove {
                repo.delete(&vm, &id)?;
                store.remove_backups(&vm, std::slice::from_ref(&id))?;
                out.deleted.push(id);
            }
            if !out.deleted.is_empty() {
                match repo.gc() {
                    Ok(r) => out.gc = Some(r),
                    Err(repo::Error::Busy) => {
                        out.gc_deferred = Some("a backup is being written: the next prune collects".into());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            tracing::info!(
                vm = %vm,
                keep = %keep,
                deleted = out.deleted.len(),
                kept = out.decisions.len() - out.deleted.len(),
                chunks_removed = out.gc.as_ref().map_or(0, |g| g.chunks_removed),
                gc_deferred = out.gc_deferred.is_some(),
                "pruned"
            );
            Ok(out)
        })
        .await
        .inspect(|out| {
            // The repository gauges follow what was removed.
            if !out.deleted.is_empty() {
                self.metrics.recount();
            }
        })
    }

    /// After a successful backup of `vm`: the retention of its schedule, if it has one. A
    /// failure is logged; the backup stays a success.
    pub(crate) async fn retain_after_backup(&self, vm: &str) {
        if self.config.schedule_of(vm).and_then(|s| s.keep).is_none() {
            return;
        }
        let req = PruneRequest { vm: vm.to_owned(), keep: None, dry_run: false };
        if let Err(e) = self.prune(req).await {
            tracing::error!(vm, error = %livesnap_proto::error::chain(&e), "retention after the backup failed");
        }
    }
}

/// Seconds since the epoch of a UTC date and time (for tests and docs).
pub fn unix(y: i64, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
    days_from_civil(y, mo, d) * 86_400 + i64::from(h * 3600 + mi * 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backups(times: &[(i64, u32, u32, u32, u32)]) -> Vec<Candidate> {
        times
            .iter()
            .map(|&(y, mo, d, h, mi)| Candidate {
                id: format!("{y:04}-{mo:02}-{d:02}T{h:02}{mi:02}"),
                created_unix_us: unix(y, mo, d, h, mi) as u64 * 1_000_000,
            })
            .collect()
    }

    /// (id, why kept or "remove"), oldest first.
    fn run(b: &[Candidate], keep: Keep) -> Vec<(String, String)> {
        select(b, &keep)
            .into_iter()
            .map(|d| (d.id, d.kept.map_or_else(|| "remove".to_owned(), |k| k.to_string())))
            .collect()
    }

    fn kept(b: &[Candidate], keep: Keep) -> Vec<String> {
        select(b, &keep).into_iter().filter(|d| d.kept.is_some()).map(|d| d.id).collect()
    }

    #[test]
    fn keep_last_keeps_the_newest_n() {
        let b = backups(&[(2026, 1, 1, 0, 0), (2026, 1, 1, 1, 0), (2026, 1, 1, 2, 0), (2026, 1, 1, 3, 0)]);
        assert_eq!(
            run(&b, Keep { last: 2, ..Keep::default() }),
            [
                ("2026-01-01T0000".into(), "remove".into()),
                ("2026-01-01T0100".into(), "remove".into()),
                ("2026-01-01T0200".into(), "keep-last 2/2".into()),
                ("2026-01-01T0300".into(), "keep-last 1/2".into()),
            ]
        );
    }

    #[test]
    fn keep_daily_keeps_the_newest_of_each_day() {
        // Two a day for four days.
        let mut t = Vec::new();
        for d in 1..=4 {
            t.push((2026, 3, d, 2, 0));
            t.push((2026, 3, d, 14, 0));
        }
        let b = backups(&t);
        assert_eq!(
            run(&b, Keep { daily: 3, ..Keep::default() }),
            [
                ("2026-03-01T0200".into(), "remove".into()),
                ("2026-03-01T1400".into(), "remove".into()),
                ("2026-03-02T0200".into(), "remove".into()),
                ("2026-03-02T1400".into(), "keep-daily 3/3".into()),
                ("2026-03-03T0200".into(), "remove".into()),
                ("2026-03-03T1400".into(), "keep-daily 2/3".into()),
                ("2026-03-04T0200".into(), "remove".into()),
                ("2026-03-04T1400".into(), "keep-daily 1/3".into()),
            ]
        );
    }

    /// keep-last covers the newest three; keep-daily counts only the days before them: the
    /// day keep-last already kept a backup of is skipped, its older backup removed.
    #[test]
    fn a_later_rule_counts_only_periods_the_earlier_rules_left() {
        let mut t = Vec::new();
        for d in 1..=5 {
            t.push((2026, 3, d, 2, 0));
            t.push((2026, 3, d, 14, 0));
        }
        let b = backups(&t);
        let want: Vec<(String, String)> = [
            ("2026-03-01T0200", "remove"),
            ("2026-03-01T1400", "remove"),
            ("2026-03-02T0200", "remove"),
            ("2026-03-02T1400", "keep-daily 2/2"),
            ("2026-03-03T0200", "remove"),
            ("2026-03-03T1400", "keep-daily 1/2"),
            ("2026-03-04T0200", "remove"),
            ("2026-03-04T1400", "keep-last 3/3"),
            ("2026-03-05T0200", "keep-last 2/3"),
            ("2026-03-05T1400", "keep-last 1/3"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(run(&b, Keep { last: 3, daily: 2, ..Keep::default() }), want);
    }

    /// One backup a day over the new year: ISO week 2026-W53 runs from Monday 28 December to
    /// Sunday 3 January. keep-weekly removes the other days of the weeks it keeps, so
    /// keep-monthly's December is the 27th, not the 31st (PBS does the same).
    #[test]
    fn weeks_are_iso_weeks_across_the_new_year_and_removals_bind_later_rules() {
        let mut t: Vec<(i64, u32, u32, u32, u32)> = (20..=31).map(|d| (2026, 12, d, 1, 0)).collect();
        t.extend((1..=5).map(|d| (2027, 1, d, 1, 0)));
        let b = backups(&t);
        let keep = Keep { weekly: 2, monthly: 3, ..Keep::default() };
        let why: Vec<(String, String)> = run(&b, keep).into_iter().filter(|(_, w)| w != "remove").collect();
        let want: Vec<(String, String)> = [
            ("2026-12-27T0100", "keep-monthly 1/3"),
            ("2027-01-03T0100", "keep-weekly 2/2"),
            ("2027-01-05T0100", "keep-weekly 1/2"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(why, want);
    }

    #[test]
    fn hourly_monthly_and_yearly_keep_the_newest_of_each_period() {
        let b = backups(&[
            (2024, 5, 1, 0, 0),
            (2024, 11, 1, 0, 0),
            (2025, 2, 1, 0, 0),
            (2025, 2, 20, 0, 0),
            (2025, 3, 1, 10, 5),
            (2025, 3, 1, 10, 55),
            (2025, 3, 1, 11, 30),
        ]);
        assert_eq!(kept(&b, Keep { hourly: 2, ..Keep::default() }), ["2025-03-01T1055", "2025-03-01T1130"]);
        assert_eq!(
            kept(&b, Keep { monthly: 3, ..Keep::default() }),
            ["2024-11-01T0000", "2025-02-20T0000", "2025-03-01T1130"]
        );
        assert_eq!(kept(&b, Keep { yearly: 5, ..Keep::default() }), ["2024-11-01T0000", "2025-03-01T1130"]);
    }

    #[test]
    fn the_newest_is_always_kept_and_no_rule_keeps_everything() {
        let b = backups(&[(2025, 1, 1, 0, 0), (2025, 1, 2, 0, 0)]);
        for keep in [
            Keep { last: 1, ..Keep::default() },
            Keep { yearly: 1, ..Keep::default() },
            Keep { hourly: 1, weekly: 1, ..Keep::default() },
        ] {
            assert_eq!(kept(&b, keep).last().map(String::as_str), Some("2025-01-02T0000"), "{keep}");
        }
        assert_eq!(kept(&b, Keep::default()).len(), 2);
        assert!(select(&[], &Keep { last: 1, ..Keep::default() }).is_empty());
        // The order given does not matter.
        let mut rev = b.clone();
        rev.reverse();
        assert_eq!(
            select(&rev, &Keep { last: 1, ..Keep::default() }),
            select(&b, &Keep { last: 1, ..Keep::default() })
        );
    }
}
