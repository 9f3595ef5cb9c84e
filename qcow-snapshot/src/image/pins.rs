//! Pins of planned reads on the image's own data clusters, and the quarantine that keeps a
//! freed cluster from being reused while a plan made before its free may still read it.
//!
//! A planned read (`BlockDev::plan_read`) names host offsets of the image's data clusters and
//! is executed by the caller later, on an io_uring, after the image's `gate` was released. A
//! flush meanwhile may free such a cluster (its guest cluster was discarded, or rewritten
//! somewhere else) and an allocation may hand it to another guest cluster, whose data the read
//! would then return. So every plan that names a data cluster carries a [`Pin`], and frees wait
//! in a quarantine until no pin that names them is left.
//!
//! A pin names the host clusters of its plan. A free is admitted ([`ReadPins::admit`], under
//! `gate` held exclusively) at once unless a live pin names its cluster; such a cluster waits
//! in the quarantine, checked again at every later admission. That is enough: a plan that
//! names a cluster was made before the cluster's free (after it, no mapping names the
//! cluster, and a quarantined cluster is not allocated again), and a plan made later cannot
//! name it until it was freed and allocated anew. Nothing ever waits for a pin: the queue
//! thread that drops them (when the reads complete) may itself be waiting for the flush that
//! admits frees, so a pinned cluster simply stays allocated until a later flush. Only a guest
//! that discards a range while its read of the range is in flight meets the quarantine at
//! all; a clean close with such a read still out (a live snapshot freezing the image under
//! it) leaves that cluster leaked, as a crash would.
//!
//! Locking: one leaf mutex, taken by plans (under `gate` shared), by dropped pins (no lock
//! held) and by [`ReadPins::admit`] (under `gate` exclusive, before `meta`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Default)]
struct State {
    /// Live pins per host cluster (no zero counts).
    live: HashMap<u64, usize>,
    /// Freed host clusters a live pin names.
    quarantine: Vec<u64>,
}

/// The pins of one image (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct ReadPins {
    state: Mutex<State>,
}

/// One plan's pin on the host clusters it names: while it lives, none of them is reused.
#[derive(Debug)]
pub(crate) struct Pin {
    pins: Arc<ReadPins>,
    clusters: Vec<u64>,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut st = self.pins.lock();
        for c in &self.clusters {
            if let Some(n) = st.live.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    st.live.remove(c);
                }
            }
        }
    }
}

impl ReadPins {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pin on `clusters` (host offsets of clusters) for a plan being made (call with `gate`
    /// held shared).
    pub(crate) fn pin(self: &Arc<Self>, clusters: Vec<u64>) -> Pin {
        let mut st = self.lock();
        for &c in &clusters {
            *st.live.entry(c).or_insert(0) += 1;
        }
        Pin {
            pins: Arc::clone(self),
            clusters,
        }
    }

    /// Takes `frees` (clusters no mapping names any more) and returns those that may be freed
    /// now, with the quarantined ones no live pin names any more; the rest wait. Call with
    /// `gate` held exclusively.
    pub(crate) fn admit(&self, frees: Vec<u64>) -> Vec<u64> {
        let mut st = self.lock();
        let mut waiting = std::mem::take(&mut st.quarantine);
        waiting.extend(frees);
        let (held, ready): (Vec<u64>, Vec<u64>) =
            waiting.into_iter().partition(|c| st.live.contains_key(c));
        st.quarantine = held;
        ready
    }

    /// Whether freed clusters wait in the quarantine.
    pub(crate) fn quarantined(&self) -> bool {
        !self.lock().quarantine.is_empty()
    }

    /// Live pins on clusters, counted per cluster (tests).
    #[cfg(test)]
    pub(crate) fn live(&self) -> usize {
        self.lock().live.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_waits_only_for_the_pins_that_name_its_cluster() {
        let pins = Arc::new(ReadPins::default());
        let a = pins.pin(vec![10, 11]);
        let b = pins.pin(vec![11]);
        assert_eq!(
            pins.admit(vec![10, 11, 12]),
            vec![12],
            "12 is named by no pin"
        );
        assert!(pins.quarantined());
        drop(a);
        assert_eq!(pins.admit(Vec::new()), vec![10], "11 is still named by `b`");
        drop(b);
        assert_eq!(pins.admit(vec![13]), vec![11, 13]);
        assert!(!pins.quarantined());
        assert_eq!(pins.live(), 0);
    }

    #[test]
    fn without_pins_frees_pass_at_once_and_in_order() {
        let pins = Arc::new(ReadPins::default());
        assert_eq!(pins.admit(vec![5, 6]), vec![5, 6]);
        drop(pins.pin(vec![5]));
        assert_eq!(pins.admit(vec![5, 7]), vec![5, 7]);
        assert!(!pins.quarantined());
    }
}
