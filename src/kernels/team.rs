//! A team of threads that spin between the many tiny parallel regions of a decoding step.
//!
//! One decoded token runs ~125 parallel regions (the quantized products of 30 layers, their
//! attention), each a few tens of microseconds of work. Rayon's idle workers sleep on a futex
//! between regions and the next region waits for them to wake: a profile of decoding showed ~16%
//! of the cycles in the kernel's futex and scheduler paths. The team's helpers instead spin on an
//! atomic for a short while after each region (as llama.cpp's threads do), then park, so a
//! decoding step pays a cache-line hop, not a wake-up, per region. Work is handed out by an atomic
//! counter; the calling thread works too. A region submitted while the team is busy (from
//! another thread, or from inside a task) runs on the calling thread alone.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_millis(2);
/// `next` and `job` pack a region's number (the high bits) with a task index or count (the low
/// `INDEX_BITS`), so that a claim can tell its region from the next one.
const INDEX_BITS: u32 = 24;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped for every region: the helpers' signal to come and claim.
    generation: AtomicUsize,
    /// The open region's number and the next task index to hand out.
    next: AtomicU64,
    /// The open region's number and its task count.
    job: AtomicU64,
    /// Regions run so far.
    regions: AtomicU64,
    /// Tasks of the open region finished.
    done: AtomicUsize,
    /// The open region's task, a pointer to the submitter's `&dyn Fn` (on its stack, valid
    /// until every task has finished: `run` returns only then).
    task: AtomicPtr<Task<'static>>,
    /// Helpers parked on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// A region is open (submissions while it is run alone).
    busy: AtomicBool,
    /// A task of the open region panicked (on whichever thread): the submitter panics too.
    panicked: AtomicBool,
}

/// The process's team: as many threads as rayon's pool (`RAYON_NUM_THREADS`), the caller
/// included.
pub struct Team {
    shared: Arc<Shared>,
    helpers: usize,
}

impl Team {
    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            next: AtomicU64::new(0),
            job: AtomicU64::new(0),
            regions: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            task: AtomicPtr::new(std::ptr::null_mut()),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            busy: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        });
        let helpers = threads.saturating_sub(1);
        for i in 0..helpers {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("refrag-team-{i}"))
                .spawn(move || helper(&s))
                .expect("spawning a team thread");
        }
        Self { shared, helpers }
    }

    /// Run `f(0) .. f(n - 1)` over the team; returns when all have.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        if n <= 1 || n as u64 > INDEX_MASK / 2 || self.helpers == 0 || s.busy.swap(true, Acquire) {
            (0..n).for_each(f);
            return;
        }
        // SAFETY: only the lifetime is erased. The pointer is published for this region alone
        // and every dereference happens in a good claim of it, before `done` reaches `n`; this
        // function waits for that before `f` goes out of scope.
        let task: Task<'static> = unsafe { std::mem::transmute::<Task<'_>, Task<'static>>(f) };
        s.task
            .store(&task as *const Task<'static> as *mut Task<'static>, Relaxed);
        let region = s.regions.fetch_add(1, Relaxed) + 1;
        s.done.store(0, Relaxed);
        s.job.store((region << INDEX_BITS) | n as u64, Relaxed);
        s.next.store(region << INDEX_BITS, Release); // opens the region
        s.generation.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        claim(s);
        while s.done.load(Acquire) < n {
            std::hint::spin_loop();
        }
        let panicked = s.panicked.swap(false, Acquire);
        s.busy.store(false, Release);
        if panicked {
            panic!("a task of a parallel region panicked");
        }
    }
}

/// Claim and run the open region's tasks until none are left.
fn claim(s: &Shared) {
    loop {
        let c = s.next.fetch_add(1, AcqRel);
        // The claim is good only when it is below the task count of the same region: a helper
        // late from one region may read the next one's `job` (or the reverse), and must then
        // leave without running anything or counting it done.
        let job = s.job.load(Acquire);
        let i = c & INDEX_MASK;
        if job >> INDEX_BITS != c >> INDEX_BITS || i >= job & INDEX_MASK {
            return;
        }
        // SAFETY: a good claim happens before that region's `done` reaches its count, so the
        // submitter is still inside `run` and the pointed-to reference alive (the claim
        // acquired the store that opened the region, which came after `task` was written).
        let f = unsafe { *s.task.load(Acquire) };
        // A panicking task still counts as done (else the submitter would wait forever); the
        // submitter reports it.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i as usize))).is_err() {
            s.panicked.store(true, Release);
        }
        s.done.fetch_add(1, Release);
    }
}

fn helper(s: &Shared) {
    let mut seen = s.generation.load(Acquire);
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let g = s.generation.load(Acquire);
            if g != seen {
                seen = g;
                claim(s);
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                park(s, seen);
                break;
            }
            std::hint::spin_loop();
        }
    }
}

/// Sleep until the generation moves past `seen`.
fn park(s: &Shared, seen: usize) {
    let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
    s.sleepers.fetch_add(1, SeqCst);
    while s.generation.load(SeqCst) == seen {
        g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
    }
    s.sleepers.fetch_sub(1, SeqCst);
}

/// The process's team, started on first use.
pub fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| Team::new(rayon::current_num_threads()))
}

/// `f(i, &mut items[i])` for every item, over the team.
pub fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(usize, &mut T) + Sync) {
    let base = items.as_mut_ptr() as usize;
    let n = items.len();
    team().run(n, &|i| {
        // SAFETY: `run` hands each index in 0..n out exactly once, so the references are to
        // distinct elements of `items`, which is borrowed mutably for the whole call.
        let item = unsafe { &mut *(base as *mut T).add(i) };
        f(i, item)
    });
}

/// `(0..n).map(f).collect()`, over the team.
pub fn map<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for_each_mut(&mut out, |i, slot| *slot = Some(f(i)));
    out.into_iter()
        .map(|r| r.expect("every task ran"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every index runs once, over many regions in a row (the helpers' claims racing the
    /// submitter's), including after the helpers have parked; nested regions run inline.
    #[test]
    fn every_task_runs_once() {
        let t = Team::new(3);
        for round in 0..20_000 {
            let n = round % 37;
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            t.run(n, &|i| {
                hits[i].fetch_add(1, Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "round {round}");
            if round == 10_000 {
                std::thread::sleep(SPIN * 3);
            }
        }
        let outer: Vec<usize> = map(8, |i| map(4, |j| i * j).iter().sum());
        assert_eq!(outer, (0..8).map(|i| 6 * i).collect::<Vec<_>>());
        let caught = std::panic::catch_unwind(|| {
            t.run(16, &|i| {
                assert_ne!(i, 7, "task 7 fails");
            })
        });
        assert!(caught.is_err(), "a task's panic reaches the submitter");
        t.run(3, &|_| {});
        let mut v = vec![0usize; 100];
        for_each_mut(&mut v, |i, x| *x = i + 1);
        assert_eq!(v, (1..=100).collect::<Vec<_>>());
    }
}
