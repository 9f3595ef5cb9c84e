//! The background flusher thread and the dirty budget that wakes it.

use super::*;

impl Inner {
    pub(super) fn kick_flusher(&self) {
        if self.has_flusher && !self.kick.swap(true, Ordering::AcqRel) {
            let _g = lock(&self.flusher_lock);
            self.flusher_cv.notify_one();
        }
    }

    pub(super) fn flusher_main(&self) {
        let interval = self.cfg.writeback_interval;
        let tick = (interval / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut last_full = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            {
                let g = lock(&self.flusher_lock);
                if !self.kick.load(Ordering::Acquire) && !self.stop.load(Ordering::SeqCst) {
                    drop(
                        self.flusher_cv
                            .wait_timeout(g, tick)
                            .unwrap_or_else(PoisonError::into_inner),
                    );
                }
            }
            let kicked = self.kick.swap(false, Ordering::AcqRel);
            let dirty = self.dirty_folios.load(Ordering::Acquire);
            if dirty == 0 {
                last_full = Instant::now();
                continue;
            }
            let periodic = last_full.elapsed() >= interval;
            if !(kicked || periodic || dirty * 2 >= self.max_dirty) {
                continue;
            }
            let target = if periodic { 0 } else { self.max_dirty / 4 };
            while !self.stop.load(Ordering::SeqCst) {
                match self.writeback_some(WRITEBACK_BATCH) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        log::warn!("background writeback failed, will retry: {e}");
                        break;
                    }
                }
                if self.dirty_folios.load(Ordering::Acquire) <= target {
                    break;
                }
            }
            if periodic {
                last_full = Instant::now();
            }
        }
    }
}
