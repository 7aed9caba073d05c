//! One market's order book: price levels of FIFO queues, strict price-time priority.
//!
//! The book is a mechanism, not a policy: it stores resting orders and answers "what is the best
//! price, who is first in line", and [`Book::limit`] is a plain matching loop (used by the replay
//! benchmark). Fees, holds, self-trade prevention and events live in [`crate::engine`].
//!
//! Layout, chosen for speed (every order is touched a few times, every price level often):
//! * Orders live in an arena allocated up front (`capacity` slots, a free list), linked into a doubly
//!   linked FIFO per price level, so cancel is O(1). An [`OrderId`] maps to its slot through a hash
//!   map whose hash keeps consecutive ids in neighbouring buckets (`IdHasher`; ids are
//!   engine-assigned, not attacker-chosen).
//! * Price levels are addressed directly by price: pages of 4,096 levels allocated on first use,
//!   so a lookup is two array indexings, and memory grows with the prices actually used.
//! * Which prices are occupied is a 64-ary hierarchical bitmap (its bottom layer inside the pages),
//!   so finding the next best level after one empties costs a handful of `trailing_zeros`.
//! * One occupancy set serves both sides: the book is never crossed, so every occupied price below
//!   the best ask is a bid and every one above the best bid is an ask.
//!
//! Architecture invariant: the book is never crossed (`best_bid < best_ask`), the sum of a level's
//! order quantities equals the level's quantity, and a level is occupied iff its queue is non-empty.

use crate::units::{OrderId, Price, Qty, Side};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

const NIL: u32 = u32::MAX;

/// The hasher of the book's id index. Ids are engine-assigned and consecutive, and the orders
/// that rest are mostly recent ones, so the hash keeps the id in its low bits (the table's bucket:
/// recent ids share cache lines instead of being spread over the whole table) and puts a
/// multiplicative mix in the top 7 bits (the control tag the table compares first, so tags of
/// neighbouring ids differ). Not for keys an attacker chooses.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Not used by `OrderId` (it hashes as one `u64`); a plain mix for completeness.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    #[inline]
    fn finish(&self) -> u64 {
        const LOW: u64 = (1 << 57) - 1;
        (self.0 & LOW) | (self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) & !LOW)
    }
}
const PAGE_SHIFT: u32 = 12;
const PAGE_LEVELS: usize = 1 << PAGE_SHIFT;
const PAGE_WORDS: usize = PAGE_LEVELS / 64;

/// One price level: a FIFO of order slots and their total quantity.
#[derive(Clone, Copy, Debug)]
struct Level {
    head: u32,
    tail: u32,
    qty: u64,
}

const EMPTY_LEVEL: Level = Level {
    head: NIL,
    tail: NIL,
    qty: 0,
};

#[derive(Debug)]
struct Page {
    /// Bottom layer of the occupancy bitmap: bit `i` of word `w` is level `w * 64 + i`.
    words: [u64; PAGE_WORDS],
    /// `PAGE_LEVELS` levels, allocated on the heap directly (never built on the stack); a fixed
    /// size, so indexing by the low bits of a price needs no bounds check.
    levels: Box<[Level; PAGE_LEVELS]>,
    /// The next released page, while this one is kept for reuse ([`Levels::spare`]): a list
    /// through the pages themselves, so releasing and reusing allocate nothing.
    next_spare: Option<Box<Page>>,
}

/// A new empty page. Out of line and cold: pages are made once per 4,096 prices.
#[cold]
#[inline(never)]
fn new_page() -> Box<Page> {
    Box::new(Page {
        words: [0; PAGE_WORDS],
        levels: vec![EMPTY_LEVEL; PAGE_LEVELS]
            .into_boxed_slice()
            .try_into()
            .expect("PAGE_LEVELS levels"),
        next_spare: None,
    })
}

/// Price levels addressed by price, with a hierarchical occupancy bitmap. A page is in place
/// while one of its levels holds an order (taken when the first arrives, released to the spare
/// list when the last leaves, reused for any price): the pages a book holds are the most it had
/// occupied at once, bounded by the orders that rested at once, not every price ever used
/// (orders placed and cancelled at prices 4,096 apart kept a 64 KiB page each, for good). After
/// warm-up nothing is allocated.
#[derive(Debug)]
struct Levels {
    pages: Vec<Option<Box<Page>>>,
    /// Upper layers of the bitmap, dense: `upper[0]` has one bit per bottom-layer word.
    upper: Vec<Vec<u64>>,
    /// Released pages, every level empty and every bit clear, linked by `next_spare`.
    spare: Option<Box<Page>>,
}

impl Drop for Levels {
    /// The spare list is unlinked a page at a time: dropped as it is, a long list would recurse
    /// once per page.
    fn drop(&mut self) {
        let mut next = self.spare.take();
        while let Some(mut p) = next {
            next = p.next_spare.take();
        }
    }
}

impl Levels {
    fn new(max_price: u64) -> Self {
        let prices = max_price as usize + 1;
        let pages = prices.div_ceil(PAGE_LEVELS);
        let mut upper = Vec::new();
        let mut bits = prices.div_ceil(64); // bottom-layer words
        loop {
            let words = bits.div_ceil(64);
            upper.push(vec![0u64; words]);
            if words == 1 {
                break;
            }
            bits = words;
        }
        Self {
            pages: (0..pages).map(|_| None).collect(),
            upper,
            spare: None,
        }
    }

    #[inline]
    fn level(&self, price: u64) -> &Level {
        match &self.pages[(price >> PAGE_SHIFT) as usize] {
            Some(p) => &p.levels[price as usize & (PAGE_LEVELS - 1)],
            None => &EMPTY_LEVEL,
        }
    }

    #[inline]
    fn level_mut(&mut self, price: u64) -> &mut Level {
        let i = (price >> PAGE_SHIFT) as usize;
        if self.pages[i].is_none() {
            let page = match self.spare.take() {
                Some(mut p) => {
                    self.spare = p.next_spare.take();
                    p
                }
                None => new_page(),
            };
            self.pages[i] = Some(page);
        }
        match &mut self.pages[i] {
            Some(p) => &mut p.levels[price as usize & (PAGE_LEVELS - 1)],
            None => unreachable!("made above"),
        }
    }

    /// The level at `price`, whose page exists (it holds or held an order).
    #[inline]
    fn level_existing(&mut self, price: u64) -> &mut Level {
        match &mut self.pages[(price >> PAGE_SHIFT) as usize] {
            Some(p) => &mut p.levels[price as usize & (PAGE_LEVELS - 1)],
            None => unreachable!("an order's level page exists"),
        }
    }

    /// Word `w` of layer `layer` (0 = bottom).
    #[inline]
    fn word(&self, layer: usize, w: usize) -> u64 {
        if layer == 0 {
            match &self.pages[w / PAGE_WORDS] {
                Some(p) => p.words[w % PAGE_WORDS],
                None => 0,
            }
        } else {
            self.upper[layer - 1][w]
        }
    }

    #[inline]
    fn layer_len(&self, layer: usize) -> usize {
        if layer == 0 {
            self.pages.len() * PAGE_WORDS
        } else {
            self.upper[layer - 1].len()
        }
    }

    fn set(&mut self, price: u64) {
        let w = (price >> 6) as usize;
        let page = self.pages[w / PAGE_WORDS]
            .as_mut()
            .expect("level page exists when set");
        let word = &mut page.words[w % PAGE_WORDS];
        let was_zero = *word == 0;
        *word |= 1 << (price & 63);
        if !was_zero {
            return;
        }
        let mut i = w;
        for layer in &mut self.upper {
            let word = &mut layer[i >> 6];
            let was_zero = *word == 0;
            *word |= 1 << (i & 63);
            if !was_zero {
                return;
            }
            i >>= 6;
        }
    }

    fn clear(&mut self, price: u64) {
        let w = (price >> 6) as usize;
        let page = self.pages[w / PAGE_WORDS]
            .as_mut()
            .expect("level page exists when cleared");
        let word = &mut page.words[w % PAGE_WORDS];
        *word &= !(1 << (price & 63));
        if *word != 0 {
            return;
        }
        // Its last occupied level emptied: the page goes to the spare list (its levels are all
        // empty, as `unlink` leaves an emptied level).
        if page.words.iter().all(|&x| x == 0) {
            if let Some(mut p) = self.pages[w / PAGE_WORDS].take() {
                p.next_spare = self.spare.take();
                self.spare = Some(p);
            }
        }
        let mut i = w;
        for layer in &mut self.upper {
            let word = &mut layer[i >> 6];
            *word &= !(1 << (i & 63));
            if *word != 0 {
                return;
            }
            i >>= 6;
        }
    }

    /// The lowest occupied price `>= price`.
    fn next_ge(&self, price: u64) -> Option<u64> {
        let layers = self.upper.len() + 1;
        let mut i = price as usize;
        let mut layer = 0;
        loop {
            if layer == layers {
                return None;
            }
            let w = i >> 6;
            if w >= self.layer_len(layer) {
                return None;
            }
            let m = self.word(layer, w) & (!0u64 << (i & 63));
            if m != 0 {
                i = (w << 6) | m.trailing_zeros() as usize;
                break;
            }
            i = w + 1;
            layer += 1;
        }
        while layer > 0 {
            layer -= 1;
            i = (i << 6) | self.word(layer, i).trailing_zeros() as usize;
        }
        Some(i as u64)
    }

    /// The highest occupied price `<= price`.
    fn prev_le(&self, price: u64) -> Option<u64> {
        let layers = self.upper.len() + 1;
        let mut i = price as usize;
        let mut layer = 0;
        loop {
            if layer == layers {
                return None;
            }
            let w = i >> 6;
            let m = self.word(layer, w) & (!0u64 >> (63 - (i & 63)));
            if m != 0 {
                i = (w << 6) | (63 - m.leading_zeros() as usize);
                break;
            }
            if w == 0 {
                return None;
            }
            i = w - 1;
            layer += 1;
        }
        while layer > 0 {
            layer -= 1;
            i = (i << 6) | (63 - self.word(layer, i).leading_zeros() as usize);
        }
        Some(i as u64)
    }
}

/// A resting order.
#[derive(Clone, Copy, Debug)]
pub struct Node<T> {
    /// Order id.
    pub id: OrderId,
    /// Limit price.
    pub price: Price,
    /// Open quantity.
    pub qty: Qty,
    /// Side.
    pub side: Side,
    prev: u32,
    next: u32,
    /// The owner's data (the engine keeps account, holds and options here).
    pub data: T,
}

/// The book has no free slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("order book is full")]
#[non_exhaustive]
pub struct BookFullError;

/// A fill reported by [`Book::limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fill {
    /// The resting order.
    pub maker: OrderId,
    /// The maker's price.
    pub price: Price,
    /// Quantity traded.
    pub qty: Qty,
}

/// One market's order book. `T` is per-order data kept inline with the order.
#[derive(Debug)]
pub struct Book<T> {
    nodes: Vec<Node<T>>,
    free: u32,
    len: u32,
    index: HashMap<OrderId, u32, BuildHasherDefault<IdHasher>>,
    levels: Levels,
    /// Best bid price, 0 when there is none (prices start at 1).
    best_bid: u64,
    /// Best ask price, `u64::MAX` when there is none.
    best_ask: u64,
    max_price: Price,
}

impl<T: Copy + Default> Book<T> {
    /// The bytes [`Book::new`] allocates up front for these arguments: the order arena, the page
    /// directory and the occupancy bitmap (pages and the id index's growth come later). Saturates.
    pub fn preallocated_bytes(max_price: Price, capacity: u32) -> u64 {
        let word = std::mem::size_of::<u64>() as u64;
        let prices = max_price.0.saturating_add(1);
        let mut bytes = prices
            .div_ceil(PAGE_LEVELS as u64)
            .saturating_mul(std::mem::size_of::<Option<Box<Page>>>() as u64);
        let mut bits = prices.div_ceil(64);
        loop {
            let words = bits.div_ceil(64);
            bytes = bytes.saturating_add(words.saturating_mul(word));
            if words <= 1 {
                break;
            }
            bits = words;
        }
        bytes.saturating_add(
            u64::from(capacity).saturating_mul(std::mem::size_of::<Node<T>>() as u64),
        )
    }

    /// A book for prices `1..=max_price` with room for `capacity` resting orders. The order arena
    /// is allocated now; the id index for up to 65,536 orders (it grows past that); a page of
    /// 4,096 price levels when an order first rests in it (two allocations, once per page).
    pub fn new(max_price: Price, capacity: u32) -> Self {
        assert!(
            max_price.0 >= 1 && max_price.0 <= u64::from(u32::MAX),
            "max_price out of range"
        );
        let nodes = (0..capacity)
            .map(|i| Node {
                id: OrderId(0),
                price: Price(0),
                qty: Qty(0),
                side: Side::Buy,
                prev: NIL,
                next: if i + 1 < capacity { i + 1 } else { NIL },
                data: T::default(),
            })
            .collect();
        // Sized for a busy book (65,536 orders), not the limit: a table sized for a million
        // orders spreads a small book's ids over megabytes and makes lookups cache misses. Past
        // that it grows (a rehash on the order path, amortised) and then stays.
        let mut index = HashMap::default();
        index.reserve((capacity as usize).min(1 << 16));
        Self {
            nodes,
            free: if capacity > 0 { 0 } else { NIL },
            len: 0,
            index,
            levels: Levels::new(max_price.0),
            best_bid: 0,
            best_ask: u64::MAX,
            max_price,
        }
    }
}

impl<T: Copy> Book<T> {
    /// The highest price this book accepts.
    pub fn max_price(&self) -> Price {
        self.max_price
    }

    /// Number of resting orders.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True when no order rests.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when `n` more orders fit.
    pub fn has_room(&self, n: u32) -> bool {
        self.len as usize + n as usize <= self.nodes.len()
    }

    /// Best (highest) bid price.
    #[inline]
    pub fn best_bid(&self) -> Option<Price> {
        (self.best_bid != 0).then_some(Price(self.best_bid))
    }

    /// Best (lowest) ask price.
    #[inline]
    pub fn best_ask(&self) -> Option<Price> {
        (self.best_ask != u64::MAX).then_some(Price(self.best_ask))
    }

    /// Best price on `side`.
    #[inline]
    pub fn best(&self, side: Side) -> Option<Price> {
        match side {
            Side::Buy => self.best_bid(),
            Side::Sell => self.best_ask(),
        }
    }

    /// The slot of an order.
    #[inline]
    pub fn slot(&self, id: OrderId) -> Option<u32> {
        self.index.get(&id).copied()
    }

    /// The order in `slot`.
    #[inline]
    pub fn node(&self, slot: u32) -> &Node<T> {
        &self.nodes[slot as usize]
    }

    /// The order data in `slot`, mutable.
    #[inline]
    pub fn data_mut(&mut self, slot: u32) -> &mut T {
        &mut self.nodes[slot as usize].data
    }

    /// The first order in line at `price`, if the level is occupied.
    #[inline]
    pub fn front(&self, price: Price) -> Option<u32> {
        let h = self.levels.level(price.0).head;
        (h != NIL).then_some(h)
    }

    /// The order behind `slot` at the same price.
    #[inline]
    pub fn next_in_level(&self, slot: u32) -> Option<u32> {
        let n = self.nodes[slot as usize].next;
        (n != NIL).then_some(n)
    }

    /// Total open quantity at `price` (zero when the level is empty).
    #[inline]
    pub fn level_qty(&self, price: Price) -> Qty {
        Qty(self.levels.level(price.0).qty)
    }

    /// The next occupied price on `side` after `price`, moving away from the spread.
    #[inline]
    pub fn next_level(&self, side: Side, price: Price) -> Option<Price> {
        match side {
            Side::Buy => price.0.checked_sub(1).and_then(|p| self.levels.prev_le(p)),
            Side::Sell => self.levels.next_ge(price.0 + 1),
        }
        .filter(|&p| p != 0)
        .map(Price)
    }

    /// Occupied levels of `side` from the best outward: `(price, total qty)`.
    pub fn levels(&self, side: Side) -> impl Iterator<Item = (Price, Qty)> + '_ {
        let mut cur = self.best(side);
        std::iter::from_fn(move || {
            let p = cur?;
            cur = self.next_level(side, p);
            Some((p, self.level_qty(p)))
        })
    }

    /// The orders at `price` in time priority.
    pub fn orders_at(&self, price: Price) -> impl Iterator<Item = &Node<T>> + '_ {
        let mut cur = self.levels.level(price.0).head;
        std::iter::from_fn(move || {
            if cur == NIL {
                return None;
            }
            let n = &self.nodes[cur as usize];
            cur = n.next;
            Some(n)
        })
    }

    /// Adds an order at the back of its price level. The caller has matched it first: a bid must
    /// be below the best ask, an ask above the best bid.
    pub fn insert(
        &mut self,
        id: OrderId,
        side: Side,
        price: Price,
        qty: Qty,
        data: T,
    ) -> Result<u32, BookFullError> {
        debug_assert!(price.0 >= 1 && price <= self.max_price);
        debug_assert!(!qty.is_zero());
        debug_assert!(match side {
            Side::Buy => price.0 < self.best_ask,
            Side::Sell => price.0 > self.best_bid,
        });
        let slot = self.free;
        if slot == NIL {
            return Err(BookFullError);
        }
        self.free = self.nodes[slot as usize].next;
        let tail = self.link_back(slot, price, qty);
        self.nodes[slot as usize] = Node {
            id,
            price,
            qty,
            side,
            prev: tail,
            next: NIL,
            data,
        };
        let previous = self.index.insert(id, slot);
        debug_assert!(previous.is_none(), "order id reused");
        self.len += 1;
        match side {
            Side::Buy if price.0 > self.best_bid => self.best_bid = price.0,
            Side::Sell if price.0 < self.best_ask => self.best_ask = price.0,
            _ => {}
        }
        Ok(slot)
    }

    /// Removes the order in `slot` and returns it.
    pub fn remove(&mut self, slot: u32) -> Node<T> {
        let node = self.nodes[slot as usize];
        self.unlink(slot);
        self.index.remove(&node.id);
        self.nodes[slot as usize].next = self.free;
        self.nodes[slot as usize].prev = NIL;
        self.free = slot;
        self.len -= 1;
        node
    }

    /// Moves the order in `slot` to the back of the queue at `price` with open quantity `qty`
    /// (a price change or a quantity increase: it loses its time priority), keeping its slot and
    /// id. The caller has checked that `price` does not cross the other side.
    #[inline]
    pub fn relocate(&mut self, slot: u32, price: Price, qty: Qty) {
        // Only the side: copying the whole node (with the owner's data) costs more than the move.
        let side = self.nodes[slot as usize].side;
        debug_assert!(!qty.is_zero() && price.0 >= 1 && price <= self.max_price);
        debug_assert!(match side {
            Side::Buy => price.0 < self.best_ask,
            Side::Sell => price.0 > self.best_bid,
        });
        self.unlink(slot);
        let tail = self.link_back(slot, price, qty);
        let n = &mut self.nodes[slot as usize];
        n.price = price;
        n.qty = qty;
        n.prev = tail;
        n.next = NIL;
        match side {
            Side::Buy if price.0 > self.best_bid => self.best_bid = price.0,
            Side::Sell if price.0 < self.best_ask => self.best_ask = price.0,
            _ => {}
        }
    }

    /// Appends `slot` to the queue at `price` (its level's quantity and occupancy follow) and
    /// returns the previous tail (`NIL` when the level was empty). The node's own fields are the
    /// caller's to set.
    #[inline(always)]
    fn link_back(&mut self, slot: u32, price: Price, qty: Qty) -> u32 {
        let level = self.levels.level_mut(price.0);
        let tail = level.tail;
        if tail == NIL {
            level.head = slot;
        }
        level.tail = slot;
        level.qty += qty.0;
        if tail == NIL {
            self.levels.set(price.0);
        } else {
            self.nodes[tail as usize].next = slot;
        }
        tail
    }

    /// Takes the order in `slot` out of its level (the level's quantity, occupancy and the best
    /// prices follow), leaving the slot and the index untouched.
    #[inline]
    fn unlink(&mut self, slot: u32) {
        // The links, price and quantity only (not the owner's data).
        let n = &self.nodes[slot as usize];
        let (prev, next, price, qty) = (n.prev, n.next, n.price.0, n.qty.0);
        if prev != NIL {
            self.nodes[prev as usize].next = next;
        }
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        }
        let level = self.levels.level_existing(price);
        if prev == NIL {
            level.head = next;
        }
        if next == NIL {
            level.tail = prev;
        }
        level.qty -= qty;
        let emptied = level.head == NIL;
        debug_assert!(!emptied || level.qty == 0);
        if emptied {
            self.levels.clear(price);
            if price == self.best_bid {
                self.best_bid = price
                    .checked_sub(1)
                    .and_then(|p| self.levels.prev_le(p))
                    .filter(|&p| p < self.best_ask)
                    .unwrap_or(0);
            } else if price == self.best_ask {
                self.best_ask = self
                    .levels
                    .next_ge(price + 1)
                    .filter(|&p| p > self.best_bid)
                    .unwrap_or(u64::MAX);
            }
        }
    }

    /// Lowers the open quantity of the order in `slot` by `by` (a fill or an amend down), keeping
    /// its place in line. Removes it when nothing is left; returns true then.
    #[inline]
    pub fn reduce(&mut self, slot: u32, by: Qty) -> bool {
        let node = &mut self.nodes[slot as usize];
        debug_assert!(by <= node.qty);
        if by == node.qty {
            self.remove(slot);
            return true;
        }
        node.qty.0 -= by.0;
        let price = node.price.0;
        self.levels.level_existing(price).qty -= by.0;
        false
    }

    /// A plain limit order: matches against the other side at prices no worse than `price`
    /// (strict price-time priority, trades at the maker's price), reports each fill to `on_fill`,
    /// and rests what is left. No fees, holds or self-trade rules: the engine adds those.
    pub fn limit(
        &mut self,
        id: OrderId,
        side: Side,
        price: Price,
        mut qty: Qty,
        data: T,
        mut on_fill: impl FnMut(Fill),
    ) -> Result<(), BookFullError> {
        while !qty.is_zero() {
            let best = match side {
                Side::Buy if self.best_ask <= price.0 => self.best_ask,
                Side::Sell if self.best_bid >= price.0 && self.best_bid != 0 => self.best_bid,
                _ => break,
            };
            let head = self.levels.level(best).head;
            let maker = &self.nodes[head as usize];
            let fill = maker.qty.min(qty);
            on_fill(Fill {
                maker: maker.id,
                price: Price(best),
                qty: fill,
            });
            qty.0 -= fill.0;
            self.reduce(head, fill);
        }
        if !qty.is_zero() {
            self.insert(id, side, price, qty, data)?;
        }
        Ok(())
    }

    /// Cancels an order by id; returns it, or `None` when it is not resting.
    pub fn cancel(&mut self, id: OrderId) -> Option<Node<T>> {
        let slot = self.slot(id)?;
        Some(self.remove(slot))
    }

    /// Checks the book's structure (tests and debug builds): levels match their queues, the book is
    /// not crossed, the index matches the arena. O(orders); panics on a broken invariant.
    pub fn check_invariants(&self) {
        assert!(self.best_bid < self.best_ask, "crossed book");
        let mut count = 0usize;
        for side in [Side::Buy, Side::Sell] {
            let mut prev: Option<Price> = None;
            for (price, qty) in self.levels(side) {
                if let Some(p) = prev {
                    match side {
                        Side::Buy => assert!(price < p),
                        Side::Sell => assert!(price > p),
                    }
                }
                prev = Some(price);
                let mut sum = 0u64;
                for n in self.orders_at(price) {
                    assert_eq!(n.side, side);
                    assert_eq!(n.price, price);
                    assert!(!n.qty.is_zero());
                    assert_eq!(
                        self.index.get(&n.id).map(|&s| self.nodes[s as usize].id),
                        Some(n.id)
                    );
                    sum += n.qty.0;
                    count += 1;
                }
                assert_eq!(sum, qty.0, "level quantity");
                assert!(sum > 0);
            }
        }
        assert_eq!(count, self.len as usize);
        assert_eq!(self.index.len(), self.len as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_finds_neighbours_across_pages_and_layers() {
        let mut l = Levels::new(10_000_000);
        for p in [5u64, 64, 4095, 4096, 70_000, 9_999_999] {
            l.level_mut(p);
            l.set(p);
        }
        assert_eq!(l.next_ge(0), Some(5));
        assert_eq!(l.next_ge(6), Some(64));
        assert_eq!(l.next_ge(65), Some(4095));
        assert_eq!(l.next_ge(4097), Some(70_000));
        assert_eq!(l.next_ge(70_001), Some(9_999_999));
        assert_eq!(l.next_ge(10_000_000), None);
        assert_eq!(l.prev_le(10_000_000), Some(9_999_999));
        assert_eq!(l.prev_le(9_999_998), Some(70_000));
        assert_eq!(l.prev_le(4095), Some(4095));
        assert_eq!(l.prev_le(63), Some(5));
        assert_eq!(l.prev_le(4), None);
        l.clear(4096);
        l.clear(4095);
        assert_eq!(l.next_ge(65), Some(70_000));
        assert_eq!(l.prev_le(69_999), Some(64));
    }

    /// Review finding: a page of levels, once made, was never released, so orders placed and
    /// cancelled at prices 4,096 apart (a cheap bid far below the market, an ask far above)
    /// kept a 64 KiB page each: with the default price range about 16 GB an account could make
    /// the engine allocate, an order at a time. A page goes when its last order leaves; a few
    /// are kept for reuse (failed on the old code: 1,000 pages kept by an empty book).
    #[test]
    fn pages_of_emptied_levels_are_released() {
        let mut b: Book<()> = Book::new(Price(1_000_000_000), 16);
        let pages = |b: &Book<()>| b.levels.pages.iter().filter(|p| p.is_some()).count();
        for k in 0..1_000u64 {
            let s = b
                .insert(OrderId(k + 1), Side::Buy, Price(1 + k * 4096), Qty(1), ())
                .unwrap();
            b.remove(s);
        }
        assert!(b.is_empty());
        assert_eq!(pages(&b), 0, "an empty book keeps no page in place");
        let mut spare = 0;
        let mut next = &b.levels.spare;
        while let Some(p) = next {
            spare += 1;
            next = &p.next_spare;
        }
        assert_eq!(spare, 1, "one page held: the most in place at once");
        // A page with orders at two prices stays while either rests, and a reused page is
        // empty: the book finds exactly what rests.
        let a = b
            .insert(OrderId(5_001), Side::Sell, Price(8_193), Qty(2), ())
            .unwrap();
        b.insert(OrderId(5_002), Side::Sell, Price(8_200), Qty(3), ())
            .unwrap();
        b.remove(a);
        assert_eq!(pages(&b), 1);
        assert_eq!(b.best_ask(), Some(Price(8_200)));
        assert_eq!(b.level_qty(Price(8_193)), Qty(0));
        assert_eq!(b.level_qty(Price(8_200)), Qty(3));
        b.check_invariants();
        b.cancel(OrderId(5_002)).unwrap();
        assert_eq!((pages(&b), b.best_ask()), (0, None));
        b.check_invariants();
    }

    #[test]
    fn limit_matches_in_price_time_order_at_maker_price() {
        let mut b: Book<()> = Book::new(Price(100_000), 16);
        b.limit(OrderId(1), Side::Sell, Price(101), Qty(5), (), |_| panic!())
            .unwrap();
        b.limit(OrderId(2), Side::Sell, Price(100), Qty(5), (), |_| panic!())
            .unwrap();
        b.limit(OrderId(3), Side::Sell, Price(100), Qty(5), (), |_| panic!())
            .unwrap();
        let mut fills = vec![];
        b.limit(OrderId(4), Side::Buy, Price(101), Qty(12), (), |f| {
            fills.push(f)
        })
        .unwrap();
        assert_eq!(
            fills,
            vec![
                Fill {
                    maker: OrderId(2),
                    price: Price(100),
                    qty: Qty(5)
                },
                Fill {
                    maker: OrderId(3),
                    price: Price(100),
                    qty: Qty(5)
                },
                Fill {
                    maker: OrderId(1),
                    price: Price(101),
                    qty: Qty(2)
                },
            ]
        );
        assert_eq!(b.best_ask(), Some(Price(101)));
        assert_eq!(b.level_qty(Price(101)), Qty(3));
        assert_eq!(b.best_bid(), None);
        b.check_invariants();
        b.limit(OrderId(5), Side::Buy, Price(99), Qty(1), (), |_| panic!())
            .unwrap();
        assert!(b.cancel(OrderId(1)).is_some());
        assert!(b.cancel(OrderId(1)).is_none());
        assert_eq!(b.best_ask(), None);
        assert_eq!(b.best_bid(), Some(Price(99)));
        b.check_invariants();
    }

    #[test]
    fn full_book_is_an_error_not_a_panic() {
        let mut b: Book<()> = Book::new(Price(10), 1);
        b.limit(OrderId(1), Side::Buy, Price(5), Qty(1), (), |_| {})
            .unwrap();
        assert_eq!(
            b.limit(OrderId(2), Side::Buy, Price(4), Qty(1), (), |_| {}),
            Err(BookFullError)
        );
        assert!(b.cancel(OrderId(1)).is_some());
        b.limit(OrderId(2), Side::Buy, Price(4), Qty(1), (), |_| {})
            .unwrap();
        b.check_invariants();
    }
}
