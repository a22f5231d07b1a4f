//! Version names and the `latest` rule.
//!
//! A version is 1 to 64 characters of `[A-Za-z0-9._+-]`, starting with a
//! letter or digit. When a caller asks for `latest`:
//!
//! 1. a version literally named `latest` (the reference service's default
//!    version name, kept by imports) is that version;
//! 2. otherwise, if every candidate parses as a semantic version (a leading
//!    `v` and missing minor/patch numbers are accepted: `v1.2` is `1.2.0`),
//!    the highest in semver order wins (`1.10.0` > `1.9.3`, `2.0.0` >
//!    `2.0.0-rc.1`), ties broken by creation time;
//! 3. otherwise the most recently created candidate wins.
//!
//! Which candidates take part (visible to the caller, pullable) is decided by
//! the caller of [`pick_latest`].

use std::cmp::Ordering;

use chrono::{DateTime, Utc};

/// The version name that is resolved rather than matched.
pub const LATEST: &str = "latest";

/// Longest accepted version name.
pub const MAX_VERSION_LEN: usize = 64;

/// Checks a version name (see the module docs).
pub fn validate_version(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > MAX_VERSION_LEN {
        return Err(format!("version {v:?} must be 1 to {MAX_VERSION_LEN} characters"));
    }
    let mut chars = v.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphanumeric()) {
        return Err(format!("version {v:?} must start with a letter or digit"));
    }
    if !v.chars().all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c)) {
        return Err(format!("version {v:?} may only contain letters, digits, '.', '_', '+' and '-'"));
    }
    Ok(())
}

/// Parses a version as semver, accepting a leading `v` and a missing minor
/// or patch number. `None` when it is not a semantic version.
pub fn parse_semver(v: &str) -> Option<semver::Version> {
    let v = v.strip_prefix('v').or_else(|| v.strip_prefix('V')).unwrap_or(v);
    if let Ok(s) = semver::Version::parse(v) {
        return Some(s);
    }
    // Pad `1` / `1.2` (with an optional pre-release or build suffix).
    let split = v.find(['-', '+']).unwrap_or(v.len());
    let (core, rest) = v.split_at(split);
    let parts = core.split('.').count();
    if core.is_empty() || parts >= 3 || !core.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let padded = format!("{core}{}{rest}", ".0".repeat(3 - parts));
    semver::Version::parse(&padded).ok()
}

/// Orders two versions of one catalog id for `latest`: `Greater` when `a`
/// is newer. Both semver: semver order, then creation time; otherwise
/// creation time. (Used within one candidate set; [`pick_latest`] applies the
/// all-or-nothing semver rule of the module docs.)
pub fn compare(a: (&str, DateTime<Utc>), b: (&str, DateTime<Utc>)) -> Ordering {
    match (parse_semver(a.0), parse_semver(b.0)) {
        (Some(x), Some(y)) => x.cmp(&y).then(a.1.cmp(&b.1)),
        _ => a.1.cmp(&b.1),
    }
}

/// A total-order key for listing versions oldest to newest: semantic versions after
/// the others and in semver order, then creation time, then the name.
pub fn sort_key(v: &str, created: DateTime<Utc>) -> (Option<semver::Version>, DateTime<Utc>, String) {
    (parse_semver(v), created, v.to_string())
}

/// Picks the newest of `candidates` (each given as version name and creation
/// time) by the rule in the module docs. Returns its index.
pub fn pick_latest<T>(candidates: &[T], key: impl Fn(&T) -> (&str, DateTime<Utc>)) -> Option<usize> {
    if let Some(i) = candidates.iter().position(|c| key(c).0 == LATEST) {
        return Some(i);
    }
    let all_semver = candidates.iter().all(|c| parse_semver(key(c).0).is_some());
    let mut best: Option<usize> = None;
    for (i, c) in candidates.iter().enumerate() {
        let newer = match best {
            None => true,
            Some(b) => {
                let (x, y) = (key(c), key(&candidates[b]));
                let ord = if all_semver { compare(x, y) } else { x.1.cmp(&y.1).then_with(|| x.0.cmp(y.0)) };
                ord == Ordering::Greater
            }
        };
        if newer {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap()
    }

    fn latest(list: &[(&str, i64)]) -> String {
        let v: Vec<(&str, DateTime<Utc>)> = list.iter().map(|(n, s)| (*n, t(*s))).collect();
        v[pick_latest(&v, |c| (c.0, c.1)).unwrap()].0.to_string()
    }

    #[test]
    fn semver_order_beats_string_and_creation_order() {
        let cases: &[(&[(&str, i64)], &str)] = &[
            (&[("1.9.3", 3), ("1.10.0", 1), ("1.2.0", 2)], "1.10.0"),
            (&[("2.0.0-rc.1", 5), ("2.0.0", 1)], "2.0.0"),
            (&[("v1.2", 1), ("1.1.9", 2)], "v1.2"),
            (&[("1", 1), ("0.9.9", 2)], "1"),
            (&[("10.0.0", 1), ("9.0.0", 2)], "10.0.0"),
            // Same semver (1.2 == 1.2.0): the later one.
            (&[("1.2", 1), ("1.2.0", 2)], "1.2.0"),
        ];
        for (list, want) in cases {
            assert_eq!(latest(list), *want, "{list:?}");
        }
    }

    #[test]
    fn non_semver_versions_fall_back_to_creation_time() {
        assert_eq!(latest(&[("nightly-a", 1), ("nightly-b", 3), ("nightly-c", 2)]), "nightly-b");
        // One non-semver version makes the whole set use creation time.
        assert_eq!(latest(&[("2.0.0", 1), ("1.0.0", 2), ("beta", 0)]), "1.0.0");
    }

    #[test]
    fn listing_order_is_total_even_for_mixed_versions() {
        // A mix that has no consistent "compare" order (semver says 2.0.0 > 1.0.0, times
        // say otherwise, beta sits between) still sorts deterministically.
        let mut v = [("1.0.0", t(5)), ("beta", t(3)), ("2.0.0", t(1)), ("1.10.0", t(2)), ("alpha", t(4))];
        for _ in 0..3 {
            v.sort_by_key(|(n, c)| sort_key(n, *c));
            let names: Vec<&str> = v.iter().map(|x| x.0).collect();
            assert_eq!(names, ["beta", "alpha", "1.0.0", "1.10.0", "2.0.0"]);
            v.reverse();
        }
    }

    #[test]
    fn a_version_named_latest_is_itself() {
        assert_eq!(latest(&[("9.9.9", 5), ("latest", 1)]), "latest");
    }

    #[test]
    fn empty_set_has_no_latest() {
        let v: Vec<(&str, DateTime<Utc>)> = vec![];
        assert_eq!(pick_latest(&v, |c| (c.0, c.1)), None);
    }

    #[test]
    fn semver_parsing_is_lenient_only_where_safe() {
        assert_eq!(parse_semver("v1.2").unwrap(), semver::Version::new(1, 2, 0));
        assert_eq!(parse_semver("3").unwrap(), semver::Version::new(3, 0, 0));
        assert!(parse_semver("1.2-beta").unwrap().pre.as_str() == "beta");
        for bad in ["latest", "1..2", "1.2.3.4", "a1", "", "1.x"] {
            assert!(parse_semver(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn version_names_are_validated() {
        for good in ["1.0.0", "latest", "v2", "2024-01-01", "1.0.0+build.5", "a_b"] {
            assert!(validate_version(good).is_ok(), "{good}");
        }
        for bad in ["", ".1", "-1", "1/2", "1 2", "é", &"1".repeat(65)] {
            assert!(validate_version(bad).is_err(), "{bad:?}");
        }
    }
}
