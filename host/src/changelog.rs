//! The changelog: every change a write transaction makes to the store, as
//! data.
//!
//! Why: in cluster mode (`docs/scale-out.md`) a group commit goes to a
//! replicated Kafka log before it goes to the local redb, and a host that
//! takes a partition over rebuilds its redb from that log. Capturing the
//! changes at the lowest layer, the table write, keeps that rule mechanical:
//! no lifecycle code knows about the log, and a restored store holds exactly
//! the rows the original held.
//!
//! Format: a [`Change`]'s key is the table's one-byte id followed by the row
//! key as redb encodes it; its value is the row value as redb encodes it,
//! or nothing for a delete (a Kafka tombstone). A compacted topic therefore
//! keeps exactly the live rows, and applying a prefix of the log in order
//! (or the compacted log) rebuilds the store as of that prefix. Table ids
//! are part of the format and never reused; see `docs/design.md`.
//!
//! Lifecycle: [`Capture::on`] starts a buffer for one write transaction;
//! every [`Logged`] table of that transaction appends to it; the writer
//! takes the changes with [`Capture::take`] before it commits.

use crate::store::{StoreError, StoreResult};
use redb::{Key, Table, Value};
use std::borrow::Borrow;
use std::cell::RefCell;
use std::ops::{Deref, RangeBounds};
use std::rc::Rc;

/// One row written or deleted.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    /// The table id, then the encoded row key.
    pub key: Vec<u8>,
    /// The encoded row value; `None` deletes the row.
    pub value: Option<Vec<u8>>,
}

impl Change {
    /// The id of the table the row belongs to.
    pub fn table(&self) -> u8 {
        self.key[0]
    }

    /// The encoded row key.
    pub fn row(&self) -> &[u8] {
        &self.key[1..]
    }
}

/// A message for another partition (see [`crate::partition`]), written in
/// the same Kafka transaction as the changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// The receiving partition.
    pub partition: u32,
    /// The encoded [`crate::partition::Message`].
    pub payload: Vec<u8>,
}

/// What one write transaction wrote: its changes, and the messages it
/// sends to other partitions.
#[derive(Debug, Default)]
pub struct Captured {
    /// Rows written or deleted, in order.
    pub changes: Vec<Change>,
    /// Messages for other partitions, in order.
    pub outgoing: Vec<Outgoing>,
}

impl Captured {
    /// Nothing was written.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.outgoing.is_empty()
    }
}

/// The change buffer of one write transaction, shared by its tables; empty
/// (`Capture::off`) when nobody reads the changes (standalone mode).
#[derive(Clone, Default)]
pub struct Capture(Option<Rc<RefCell<Captured>>>);

impl Capture {
    /// Record nothing.
    pub fn off() -> Self {
        Capture(None)
    }

    /// Record every change.
    pub fn on() -> Self {
        Capture(Some(Rc::default()))
    }

    /// What was recorded so far, in order; the buffer is emptied.
    pub fn take(&self) -> Captured {
        self.0
            .as_ref()
            .map(|c| std::mem::take(&mut *c.borrow_mut()))
            .unwrap_or_default()
    }

    /// Send a message to another partition with this transaction; refused
    /// when nothing is captured (standalone mode has no other partition).
    pub fn send(&self, outgoing: Outgoing) -> StoreResult<()> {
        let captured = self.0.as_ref().ok_or_else(|| StoreError::Corrupt {
            table: "partitions",
            reason: format!(
                "a message for partition {} without a cluster",
                outgoing.partition
            ),
        })?;
        captured.borrow_mut().outgoing.push(outgoing);
        Ok(())
    }

    fn record(&self, table: u8, row: &[u8], value: Option<&[u8]>) {
        if let Some(captured) = &self.0 {
            let mut key = Vec::with_capacity(1 + row.len());
            key.push(table);
            key.extend_from_slice(row);
            captured.borrow_mut().changes.push(Change {
                key,
                value: value.map(<[u8]>::to_vec),
            });
        }
    }
}

/// A table of a write transaction whose writes are recorded in its
/// transaction's [`Capture`] (unless the table is local to this host, `id`
/// `None`). Reads go to the table itself through `Deref`; there is no
/// `DerefMut`, so no write can bypass the log.
pub struct Logged<'txn, K: Key + 'static, V: Value + 'static> {
    table: Table<'txn, K, V>,
    id: Option<u8>,
    capture: Capture,
}

impl<'txn, K: Key + 'static, V: Value + 'static> Logged<'txn, K, V> {
    /// Wrap `table`; `id` is its changelog id, `None` for a local table.
    pub fn new(table: Table<'txn, K, V>, id: Option<u8>, capture: Capture) -> Self {
        Logged { table, id, capture }
    }

    fn record(&self, key: &K::SelfType<'_>, value: Option<&V::SelfType<'_>>) {
        if let Some(id) = self.id {
            let value = value.map(|v| V::as_bytes(v));
            self.capture.record(
                id,
                K::as_bytes(key).as_ref(),
                value.as_ref().map(AsRef::as_ref),
            );
        }
    }

    /// Insert or replace a row.
    pub fn insert<'k, 'v>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        value: impl Borrow<V::SelfType<'v>>,
    ) -> StoreResult<()> {
        self.record(key.borrow(), Some(value.borrow()));
        self.table
            .insert(key, value)
            .map(drop)
            .map_err(StoreError::redb)
    }

    /// Delete a row; `false` if there was none.
    pub fn remove<'k>(&mut self, key: impl Borrow<K::SelfType<'k>>) -> StoreResult<bool> {
        let removed = self
            .table
            .remove(key.borrow())
            .map_err(StoreError::redb)?
            .is_some();
        if removed {
            self.record(key.borrow(), None);
        }
        Ok(removed)
    }

    /// Delete the rows in `range` for which `keep` says `false`.
    pub fn retain_in<'a, KR>(
        &mut self,
        range: impl RangeBounds<KR> + 'a,
        keep: impl for<'f> FnMut(K::SelfType<'f>, V::SelfType<'f>) -> bool,
    ) -> StoreResult<()>
    where
        KR: Borrow<K::SelfType<'a>> + 'a,
    {
        let keep = self.recording(keep);
        self.table.retain_in(range, keep).map_err(StoreError::redb)
    }

    /// Delete every row.
    pub fn clear(&mut self) -> StoreResult<()> {
        let keep = self.recording(|_, _| false);
        self.table.retain(keep).map_err(StoreError::redb)
    }

    /// `keep`, recording a delete for every row it does not keep.
    fn recording(
        &self,
        mut keep: impl for<'f> FnMut(K::SelfType<'f>, V::SelfType<'f>) -> bool,
    ) -> impl for<'f> FnMut(K::SelfType<'f>, V::SelfType<'f>) -> bool {
        let (id, capture) = (self.id, self.capture.clone());
        move |k, v| {
            let row = id.map(|_| K::as_bytes(&k).as_ref().to_vec());
            let kept = keep(k, v);
            if let (false, Some(id), Some(row)) = (kept, id, row) {
                capture.record(id, &row, None);
            }
            kept
        }
    }

    /// Apply a change read from the log: not recorded again, unless
    /// `recorded` (a change copied from another partition's log, which
    /// this partition's log must hold too).
    pub fn apply(&mut self, row: &[u8], value: Option<&[u8]>, recorded: bool) -> StoreResult<()> {
        if let (Some(id), true) = (self.id, recorded) {
            self.capture.record(id, row, value);
        }
        let key = K::from_bytes(row);
        match value {
            Some(value) => self.table.insert(key, V::from_bytes(value)).map(drop),
            None => self.table.remove(key).map(drop),
        }
        .map_err(StoreError::redb)
    }
}

impl<'txn, K: Key + 'static, V: Value + 'static> Deref for Logged<'txn, K, V> {
    type Target = Table<'txn, K, V>;

    fn deref(&self) -> &Self::Target {
        &self.table
    }
}
