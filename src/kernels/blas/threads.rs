//! The BLAS's own thread count, read and set at run time where the BLAS is OpenBLAS.
//!
//! Many small products (a BERT forward over one batch of passages) scale badly over OpenBLAS's
//! threads on few cores: its threads spin between calls while the elementwise work between the
//! products waits. Running whole batches side by side on as many workers as the BLAS had
//! threads, each product on one, uses the cores for the whole forward. OpenBLAS's
//! `openblas_{get,set}_num_threads` are looked up by name in the running process, so a binary
//! linked to another BLAS (Accelerate, reference BLAS) finds none and runs as before.

use std::os::raw::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};

type GetThreads = unsafe extern "C" fn() -> c_int;
type SetThreads = unsafe extern "C" fn(c_int);

/// OpenBLAS's thread-count functions, when the process has them.
fn openblas() -> Option<(GetThreads, SetThreads)> {
    static FNS: OnceLock<Option<(GetThreads, SetThreads)>> = OnceLock::new();
    *FNS.get_or_init(|| {
        // SAFETY: dlsym with RTLD_DEFAULT only looks symbols up; a non-null result for these
        // names is OpenBLAS's function of exactly these signatures (`openblas_config.h`).
        unsafe {
            let get = libc::dlsym(libc::RTLD_DEFAULT, c"openblas_get_num_threads".as_ptr());
            let set = libc::dlsym(libc::RTLD_DEFAULT, c"openblas_set_num_threads".as_ptr());
            if get.is_null() || set.is_null() {
                return None;
            }
            Some((
                std::mem::transmute::<*mut libc::c_void, GetThreads>(get),
                std::mem::transmute::<*mut libc::c_void, SetThreads>(set),
            ))
        }
    })
}

/// The threads the BLAS runs each product on (`OPENBLAS_NUM_THREADS`, else the cores), or
/// `None` when it cannot be read (not OpenBLAS).
pub fn threads() -> Option<usize> {
    // SAFETY: OpenBLAS's getter takes nothing and reads a global.
    openblas().map(|(get, _)| unsafe { get() }.max(1) as usize)
}

/// The workers [`side_by_side`] runs on: the BLAS's thread count before any [`OneThread`] guard
/// took it to one (so the same answer while a guard is alive), or 1 when it cannot be read.
pub fn workers() -> usize {
    let held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    if held.0 > 0 {
        held.1.max(1) as usize
    } else {
        // Read under the lock, so no guard can take the count to one meanwhile.
        threads().unwrap_or(1)
    }
}

/// How many [`OneThread`] guards are alive, and the thread count the first one found.
static HELD: Mutex<(usize, c_int)> = Mutex::new((0, 0));

/// While alive, the BLAS runs every product on the calling thread; when the last guard alive
/// drops, the thread count the first one found comes back. Global to the process: hold it only
/// while the BLAS's callers are the workers that replace its threads.
pub struct OneThread {
    set: SetThreads,
}

impl Drop for OneThread {
    fn drop(&mut self) {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        held.0 -= 1;
        if held.0 == 0 {
            // SAFETY: OpenBLAS's setter with the count its getter returned.
            unsafe { (self.set)(held.1) }
        }
    }
}

/// Put the BLAS on one thread per call: `Some((workers, guard))`, `workers` the threads it had
/// (at least 2, else there is nothing to gain and `None`), or `None` when it cannot be set.
pub fn one_thread() -> Option<(usize, OneThread)> {
    let (get, set) = openblas()?;
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    if held.0 == 0 {
        // SAFETY: OpenBLAS's getter of its global thread count.
        let before = unsafe { get() };
        if before < 2 {
            return None;
        }
        // SAFETY: OpenBLAS's setter of its global thread count.
        unsafe { set(1) };
        held.1 = before;
    }
    held.0 += 1;
    Some((held.1 as usize, OneThread { set }))
}

/// Run `work` on items `0..n` side by side, one item per worker and as many workers as the BLAS
/// had threads, each product on its worker's thread ([`one_thread`]); `done` gets each result
/// on the caller's thread as it comes (in any order) and may stop the run with an error. Where
/// the BLAS's threads cannot be set, or `n < 2`, the items run one by one in order.
pub fn side_by_side<T: Send>(
    n: usize,
    work: impl Fn(usize) -> T + Sync,
    mut done: impl FnMut(usize, T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let guard = if n > 1 { one_thread() } else { None };
    let Some((workers, _one_thread)) = guard else {
        for i in 0..n {
            done(i, work(i))?;
        }
        return Ok(());
    };
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| -> anyhow::Result<()> {
        for _ in 0..workers.min(n) {
            let tx = tx.clone();
            let (next, work) = (&next, &work);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                // A closed channel means the caller stopped at an error: stop too.
                if i >= n || tx.send((i, work(i))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for (i, r) in rx {
            done(i, r)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_restores_the_count() {
        if threads().is_none() {
            return; // not OpenBLAS: nothing to set
        }
        // Other tests may hold a guard at the same time: the count is 1 while any is alive and
        // comes back when the last goes.
        let Some((workers, a)) = one_thread() else {
            return; // one BLAS thread already: nothing to gain
        };
        let (_, b) = one_thread().expect("a second guard while one is alive");
        assert_eq!(threads(), Some(1));
        drop(a);
        assert_eq!(threads(), Some(1), "one guard is still alive");
        drop(b);
        let others = HELD.lock().unwrap();
        assert!(others.0 > 0 || threads() == Some(workers));
    }

    #[test]
    fn side_by_side_gives_every_result_once_and_stops_at_an_error() {
        let mut got = vec![0usize; 9];
        side_by_side(
            9,
            |i| i * i,
            |i, v| {
                got[i] += 1;
                assert_eq!(v, i * i);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got, vec![1; 9]);
        let e = side_by_side(
            9,
            |i| i,
            |i, _| {
                anyhow::ensure!(i != 4, "item 4");
                Ok(())
            },
        );
        assert_eq!(e.unwrap_err().to_string(), "item 4");
    }
}
