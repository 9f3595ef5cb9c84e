//! What the calling thread has used so far: CPU time and voluntary context switches
//! (`getrusage(RUSAGE_THREAD)`). A thread whose voluntary switches went up between two readings
//! slept in between (waited for the disk, a backing read, a lock); one that was only preempted
//! did not. The queue runner counts a request that never slept by its CPU time, and a flush
//! brings in helper threads only once its own writebacks wait (they slept, and took long).
//!
//! Locking model: none (each reading is one system call about the calling thread).

use std::time::Duration;

/// CPU time and voluntary context switches of the calling thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadUsage {
    /// User and system CPU time.
    pub cpu: Duration,
    /// Voluntary context switches (the thread blocked).
    pub voluntary_switches: i64,
}

impl ThreadUsage {
    /// The calling thread's usage; `None` if the kernel does not say.
    pub fn now() -> Option<ThreadUsage> {
        // SAFETY: all-zero bytes are a valid `rusage` (plain integers).
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: RUSAGE_THREAD with a pointer to an `rusage` that outlives the call.
        if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
            return None;
        }
        let tv = |t: libc::timeval| {
            Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
                + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
        };
        Some(ThreadUsage {
            cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
            voluntary_switches: ru.ru_nvcsw,
        })
    }

    /// Whether the thread slept between the readings `before` and `after`; `true` where either
    /// is missing (the caller cannot tell, and must not assume it did not wait).
    pub fn slept_between(before: Option<ThreadUsage>, after: Option<ThreadUsage>) -> bool {
        match (before, after) {
            (Some(b), Some(a)) => a.voluntary_switches != b.voluntary_switches,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_user_plus_system_and_only_a_sleep_counts_as_sleeping() {
        let (before, after) = (ThreadUsage::now(), {
            std::thread::sleep(Duration::from_millis(2));
            ThreadUsage::now()
        });
        assert!(before.is_some() && after.is_some());
        assert!(ThreadUsage::slept_between(before, after));
        assert!(!ThreadUsage::slept_between(before, before));
        // CPU time is user plus system time: spend 30 ms of this thread's CPU mostly in system
        // calls, as the kernel's own clock counts it.
        let thread_cpu = || {
            // SAFETY: all-zero bytes are a valid `timespec` (plain integers).
            let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
            // SAFETY: a valid clock id and a pointer to a `timespec` that outlives the call.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            Duration::new(
                u64::try_from(ts.tv_sec).unwrap_or(0),
                u32::try_from(ts.tv_nsec).unwrap_or(0),
            )
        };
        let (start, usage) = (thread_cpu(), ThreadUsage::now().unwrap());
        while thread_cpu() - start < Duration::from_millis(30) {
            // SAFETY: getppid has no arguments and cannot fail.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
        let spent = ThreadUsage::now().unwrap().cpu.saturating_sub(usage.cpu);
        assert!(spent >= Duration::from_millis(20), "{spent:?} of 30 ms");
        // Unknown on either side counts as slept.
        assert!(ThreadUsage::slept_between(None, before));
        assert!(ThreadUsage::slept_between(before, None));
        assert!(!ThreadUsage::slept_between(
            before,
            Some(ThreadUsage {
                cpu: Duration::from_secs(1) + before.unwrap().cpu,
                voluntary_switches: before.unwrap().voluntary_switches,
            })
        ));
    }
}
