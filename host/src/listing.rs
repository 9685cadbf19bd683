//! Listing invocations: the indexes behind `GET /invocations`, and how a
//! filtered page is read from them.
//!
//! Why indexes: an operator asks "what is stuck for this key" of a store
//! holding a million finished invocations, and the answer must not scan
//! them. Each invocation has a few rows in the replicated `listing` table,
//! `(facet, created ms, id)`, kept in step with its record by
//! `Tables::put_invocation` and removed with it:
//!
//! - `service:<service>`: by service;
//! - `key:<service>/<key>`: by object key or workflow id;
//! - `status:<class>`: by [`InvocationRecord::status_class`] (the one
//!   facet that moves, at most twice in an invocation's life). The
//!   unfinished classes ([`UNFINISHED`]) are also where recovery finds the
//!   invocations to resume.
//!
//! A page is read newest first from the most selective facet the filter
//! names (key, then status, then service), bounded by the creation-time
//! range; the filter's other conditions are checked on each record. A
//! page of every invocation merges the status facets ([`newest_first`]):
//! each invocation is under exactly one, so no facet of its own (`all`,
//! one more B-tree write per invocation, dropped on 2026-11-29) is needed.
//! At most [`SCAN_BUDGET`] index rows are read per page: a page may hold
//! fewer than `limit` invocations and still have a `next` cursor, which
//! the client follows (the way DynamoDB pages a filtered scan), so no
//! request holds the host for long.

use crate::ids::InvocationId;
use crate::records::InvocationRecord;

/// Index rows read at most for one page: a page whose filter matches
/// nothing it reads costs about 35 ms at this budget (each row checked
/// reads its invocation), within the 50 ms a page may take.
pub const SCAN_BUDGET: usize = 10_000;

/// The index rows of `record`: its facets.
pub fn facets(record: &InvocationRecord) -> Vec<String> {
    let target = &record.target;
    let mut facets = vec![
        format!("service:{}", target.service),
        status_facet(record.status_class()),
    ];
    if let Some(key) = &target.key {
        facets.push(format!("key:{}/{key}", target.service));
    }
    facets
}

/// The status classes of the invocations that have not completed: their
/// `status:` rows are also what recovery reads.
pub const UNFINISHED: [&str; 2] = ["unfinished", "paused"];

/// Every status class ([`InvocationRecord::status_class`]).
pub const CLASSES: [&str; 6] = [
    "unfinished",
    "paused",
    "succeeded",
    "failed",
    "killed",
    "cancelled",
];

/// The facet that stores written before 2026-11-29 kept for every
/// invocation; [`crate::store::Tables::upgrade_listing`] deletes its rows.
pub const RETIRED_FACET: &str = "all";

/// The facet of a status class.
pub fn status_facet(class: &str) -> String {
    format!("status:{class}")
}

/// What a page of invocations is filtered by; `None` matches anything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Service name.
    pub service: Option<String>,
    /// Handler name.
    pub handler: Option<String>,
    /// Object key or workflow id (with `service`).
    pub key: Option<String>,
    /// A status class (`unfinished`, `paused`, `succeeded`, `failed`,
    /// `killed`, `cancelled`) that the index answers; finer statuses are
    /// checked by the caller's predicate.
    pub class: Option<String>,
    /// Deployment id.
    pub deployment: Option<String>,
    /// Created at or after, ms since the epoch.
    pub created_after_ms: Option<u64>,
    /// Created before, ms since the epoch.
    pub created_before_ms: Option<u64>,
}

impl Filter {
    /// The facets a page is read from: the most selective one named, or,
    /// without any, every status class (merged by [`newest_first`]).
    pub fn facets(&self) -> Vec<String> {
        match (&self.service, &self.key, &self.class) {
            (Some(service), Some(key), _) => vec![format!("key:{service}/{key}")],
            (_, _, Some(class)) => vec![status_facet(class)],
            (Some(service), None, None) => vec![format!("service:{service}")],
            _ => CLASSES.map(status_facet).to_vec(),
        }
    }

    /// Whether `record` meets every condition (the facet's included).
    pub fn matches(&self, record: &InvocationRecord) -> bool {
        let t = &record.target;
        let created = record.created_ms;
        self.service.as_ref().is_none_or(|s| *s == t.service)
            && self.handler.as_ref().is_none_or(|h| *h == t.handler)
            && self.key.as_ref().is_none_or(|k| t.key.as_ref() == Some(k))
            && self
                .class
                .as_ref()
                .is_none_or(|c| c == record.status_class())
            && self
                .deployment
                .as_ref()
                .is_none_or(|d| d == record.deployment.as_str())
            && self.created_after_ms.is_none_or(|at| created >= at)
            && self.created_before_ms.is_none_or(|at| created < at)
    }
}

/// Where a page ended: the last index row read, `(created ms, id)`; the
/// next page starts strictly below it. Written `<ms>.<id>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    /// Its creation time.
    pub created_ms: u64,
    /// Its invocation id.
    pub id: String,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.created_ms, self.id)
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("not a cursor: {s:?} (pass back the next_cursor of a page)");
        let (ms, id) = s.split_once('.').ok_or_else(bad)?;
        let id: InvocationId = id.parse().map_err(|_| bad())?;
        Ok(Cursor {
            created_ms: ms.parse().map_err(|_| bad())?,
            id: id.to_string(),
        })
    }
}

/// Merge sequences that are each in descending order into one in
/// descending order (an error comes out as soon as it is at a head).
pub fn newest_first<K: Ord, E>(
    mut sources: Vec<impl Iterator<Item = Result<K, E>>>,
) -> impl Iterator<Item = Result<K, E>> {
    let mut heads: Vec<Option<Result<K, E>>> = sources.iter_mut().map(Iterator::next).collect();
    std::iter::from_fn(move || {
        let (i, _) = heads
            .iter()
            .enumerate()
            .filter_map(|(i, head)| head.as_ref().map(|h| (i, h)))
            .max_by(|(_, a), (_, b)| match (a, b) {
                (Ok(a), Ok(b)) => a.cmp(b),
                (Err(_), _) => std::cmp::Ordering::Greater,
                (_, Err(_)) => std::cmp::Ordering::Less,
            })?;
        std::mem::replace(&mut heads[i], sources[i].next())
    })
}

/// One page: invocations newest first, and where to go on from (`None`
/// when the index holds nothing further).
#[derive(Debug, Default)]
pub struct Page {
    /// The invocations found.
    pub invocations: Vec<InvocationRecord>,
    /// Pass as `cursor` for the next page.
    pub next: Option<Cursor>,
}

/// Merge the pages of several partitions (each newest first, as the admin
/// API answers them: `(invocations, next_cursor)`) into one page of at
/// most `limit`. Every partition has been read down to its cursor, so the
/// merged page keeps only what lies above the highest of them, and goes on
/// from there: nothing is skipped and nothing repeats.
pub fn merge(
    pages: Vec<(Vec<serde_json::Value>, Option<Cursor>)>,
    limit: usize,
) -> (Vec<serde_json::Value>, Option<Cursor>) {
    let key = |v: &serde_json::Value| Cursor {
        created_ms: v["created_at_ms"].as_u64().unwrap_or(0),
        id: v["id"].as_str().unwrap_or_default().to_string(),
    };
    let read_down_to = pages.iter().filter_map(|(_, next)| next.clone()).max();
    let mut merged: Vec<serde_json::Value> = pages
        .into_iter()
        .flat_map(|(invocations, _)| invocations)
        .filter(|v| read_down_to.as_ref().is_none_or(|low| key(v) >= *low))
        .collect();
    merged.sort_by_key(|v| std::cmp::Reverse(key(v)));
    if merged.len() > limit {
        merged.truncate(limit);
        let next = merged.last().map(key);
        return (merged, next);
    }
    (merged, read_down_to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(ms: u64, id: &str) -> serde_json::Value {
        serde_json::json!({ "created_at_ms": ms, "id": id })
    }

    fn at(ms: u64, id: &str) -> Cursor {
        Cursor {
            created_ms: ms,
            id: id.into(),
        }
    }

    #[test]
    fn facets_read_newest_first_merge_into_one_descending_sequence() {
        let desc = |v: &[u32]| v.iter().map(|&k| Ok::<_, String>(k)).collect::<Vec<_>>();
        let sources = vec![
            desc(&[9, 4, 1]).into_iter(),
            desc(&[]).into_iter(),
            desc(&[8, 7, 2]).into_iter(),
            desc(&[5]).into_iter(),
        ];
        let merged: Result<Vec<u32>, String> = newest_first(sources).collect();
        assert_eq!(merged.unwrap(), [9, 8, 7, 5, 4, 2, 1]);
        let failing = vec![
            desc(&[3]).into_iter(),
            vec![Err("bad page".into())].into_iter(),
        ];
        let first = newest_first(failing).next();
        assert_eq!(first, Some(Err("bad page".to_string())));
    }

    #[test]
    fn a_merged_page_stops_where_the_least_read_partition_stopped() {
        // Partition A read down to 50 (its budget ran out); B read all.
        let a = (vec![item(90, "a1"), item(60, "a2")], Some(at(50, "a9")));
        let b = (vec![item(80, "b1"), item(40, "b2"), item(10, "b3")], None);
        let (page, next) = merge(vec![a, b], 10);
        let ids: Vec<_> = page.iter().map(|v| v["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["a1", "b1", "a2"], "b2 and b3 wait for the next page");
        assert_eq!(next, Some(at(50, "a9")));
    }

    #[test]
    fn a_full_merged_page_goes_on_from_its_last_item() {
        let a = (vec![item(90, "a1"), item(60, "a2")], None);
        let b = (vec![item(80, "b1"), item(70, "b2")], None);
        let (page, next) = merge(vec![a, b], 3);
        assert_eq!(page.len(), 3);
        assert_eq!(next, Some(at(70, "b2")));
        let (rest, next) = merge(vec![(vec![item(60, "a2")], None), (vec![], None)], 3);
        assert_eq!(rest.len(), 1);
        assert_eq!(next, None, "everything was read");
    }

    #[test]
    fn cursors_read_back_what_they_wrote() {
        let c = at(
            1_700_000_000_123,
            "inv_0000000100000000000000000000000000000001",
        );
        assert_eq!(c.to_string().parse::<Cursor>(), Ok(c));
        assert!("junk".parse::<Cursor>().is_err());
    }
}
