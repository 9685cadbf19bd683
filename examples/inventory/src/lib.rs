//! Inventory: a virtual object per SKU runs a reservation state machine fed
//! by a Kafka stream in which events arrive late, early and twice.
//!
//! Per key, Cairn delivers records in offset order, one at a time, and each
//! record exactly once, so the handler only has to be right about the
//! *business* disorder of the stream, which it keeps in its state:
//! a confirm or release that arrives before its reserve is remembered and
//! applied when the reserve comes; a reserve, confirm, release or restock
//! seen twice is recognised and ignored. Invariants that hold after any
//! stream: the stock is never negative (it is unsigned and a reserve that
//! does not fit is rejected), and once both events of an order have arrived
//! its reservation is confirmed, released or rejected, never left open.
//!
//! The state machine is a plain function, [`Stock::apply`], so it is tested
//! without a host as well.

use cairn_sdk::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

/// An inventory event (the record's value; the key is the SKU).
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StockEvent {
    /// Units arrived; `id` makes a repeated restock recognisable.
    Restock {
        /// Unique id of the delivery.
        id: String,
        /// Units.
        qty: u32,
    },
    /// Hold units for an order.
    Reserve {
        /// The order.
        order: String,
        /// Units.
        qty: u32,
    },
    /// The order was paid: the held units are sold.
    Confirm {
        /// The order.
        order: String,
    },
    /// The order was dropped: the held units return to stock.
    Release {
        /// The order.
        order: String,
    },
}

/// Where an order's reservation is.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Reservation {
    /// Units held, awaiting confirm or release.
    Reserved {
        /// Units held.
        qty: u32,
    },
    /// Sold.
    Confirmed {
        /// Units sold.
        qty: u32,
    },
    /// Released (or released before it was reserved).
    Released,
    /// The reserve did not fit in the stock; `closed` once the order's
    /// confirm or release (now moot) has arrived too.
    Rejected {
        /// Whether the closing event was seen.
        closed: bool,
    },
    /// A confirm came before its reserve.
    ConfirmedEarly,
    /// A release came before its reserve.
    ReleasedEarly,
}

/// One SKU's stock.
#[derive(serde::Serialize, serde::Deserialize, Default, Clone, Debug, PartialEq)]
pub struct Stock {
    /// Units free to reserve (never negative: unsigned).
    pub available: u32,
    /// Reservations by order.
    pub orders: BTreeMap<String, Reservation>,
    /// Restock ids already applied.
    pub restocks: BTreeSet<String>,
    /// Events handled, duplicates included.
    pub events: u64,
    /// Events recognised as duplicates and ignored.
    pub duplicates: u64,
}

impl Stock {
    /// Apply one event.
    pub fn apply(&mut self, event: &StockEvent) {
        use Reservation::*;
        self.events += 1;
        let duplicate = match event {
            StockEvent::Restock { id, qty } => {
                let new = self.restocks.insert(id.clone());
                if new {
                    self.available += qty;
                }
                !new
            }
            StockEvent::Reserve { order, qty } => match self.orders.get(order).copied() {
                None | Some(ConfirmedEarly) => {
                    let fits = *qty <= self.available;
                    let early = self.orders.contains_key(order);
                    let next = match (fits, early) {
                        (false, closed) => Rejected { closed },
                        (true, false) => Reserved { qty: *qty },
                        (true, true) => Confirmed { qty: *qty },
                    };
                    if fits {
                        self.available -= qty;
                    }
                    self.orders.insert(order.clone(), next);
                    false
                }
                Some(ReleasedEarly) => {
                    self.orders.insert(order.clone(), Released);
                    false
                }
                Some(_) => true,
            },
            StockEvent::Confirm { order } => {
                self.close(order, ConfirmedEarly, |qty| (Confirmed { qty }, 0))
            }
            StockEvent::Release { order } => {
                self.close(order, ReleasedEarly, |qty| (Released, qty))
            }
        };
        if duplicate {
            self.duplicates += 1;
        }
    }

    /// Apply an order's closing event (confirm or release): remembered as
    /// `early` when it comes before the reserve, applied to a reservation by
    /// `apply` (its next state, and the units that go back to stock), or
    /// recognised as a repeat (returns true).
    fn close(
        &mut self,
        order: &str,
        early: Reservation,
        apply: impl FnOnce(u32) -> (Reservation, u32),
    ) -> bool {
        use Reservation::*;
        let next = match self.orders.get(order).copied() {
            None => early,
            Some(Reserved { qty }) => {
                let (next, back) = apply(qty);
                self.available += back;
                next
            }
            Some(Rejected { closed: false }) => Rejected { closed: true },
            Some(_) => return true,
        };
        self.orders.insert(order.to_string(), next);
        false
    }
}

/// A SKU's inventory.
pub struct Sku;

#[cairn_sdk::object]
impl Sku {
    /// Apply one event to this SKU's stock; returns the units available.
    pub fn apply(ctx: &Context, event: StockEvent) -> HandlerResult<u32> {
        let mut stock = ctx.get::<Stock>("stock")?.unwrap_or_default();
        stock.apply(&event);
        ctx.set("stock", &stock);
        Ok(stock.available)
    }

    /// The stock as it is.
    #[shared]
    pub fn snapshot(ctx: &Context) -> HandlerResult<Stock> {
        Ok(ctx.get("stock")?.unwrap_or_default())
    }
}

cairn_sdk::export!(Sku);

#[cfg(test)]
mod tests {
    use super::*;

    fn run(events: &[StockEvent]) -> Stock {
        let mut stock = Stock::default();
        events.iter().for_each(|e| stock.apply(e));
        stock
    }

    fn restock(id: &str, qty: u32) -> StockEvent {
        StockEvent::Restock { id: id.into(), qty }
    }
    fn reserve(order: &str, qty: u32) -> StockEvent {
        StockEvent::Reserve {
            order: order.into(),
            qty,
        }
    }
    fn confirm(order: &str) -> StockEvent {
        StockEvent::Confirm {
            order: order.into(),
        }
    }
    fn release(order: &str) -> StockEvent {
        StockEvent::Release {
            order: order.into(),
        }
    }

    #[test]
    fn early_confirms_and_releases_wait_for_their_reserve() {
        let s = run(&[
            confirm("a"),
            release("b"),
            restock("r", 5),
            reserve("a", 2),
            reserve("b", 2),
        ]);
        assert_eq!(s.orders["a"], Reservation::Confirmed { qty: 2 });
        assert_eq!(s.orders["b"], Reservation::Released);
        assert_eq!(s.available, 3);
    }

    #[test]
    fn duplicates_change_nothing() {
        let once = run(&[restock("r", 5), reserve("a", 2), release("a")]);
        let twice = run(&[
            restock("r", 5),
            restock("r", 5),
            reserve("a", 2),
            reserve("a", 2),
            release("a"),
            release("a"),
            reserve("a", 2),
        ]);
        assert_eq!(
            (once.available, &once.orders),
            (twice.available, &twice.orders)
        );
        assert_eq!(twice.duplicates, 4);
    }

    #[test]
    fn a_reserve_that_does_not_fit_is_rejected() {
        let s = run(&[restock("r", 1), reserve("a", 2), confirm("a"), confirm("a")]);
        assert_eq!(s.orders["a"], Reservation::Rejected { closed: true });
        assert_eq!((s.available, s.duplicates), (1, 1));
    }
}
