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

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_millis(2);
/// `next` of a closed region: every claim fails.
const CLOSED: usize = usize::MAX / 2;

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped for every region: the helpers' signal to come and claim.
    generation: AtomicUsize,
    /// The next task index to hand out (`CLOSED` between regions).
    next: AtomicUsize,
    /// Tasks of the open region.
    n: AtomicUsize,
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
            next: AtomicUsize::new(CLOSED),
            n: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            task: AtomicPtr::new(std::ptr::null_mut()),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            busy: AtomicBool::new(false),
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
        if n <= 1 || self.helpers == 0 || s.busy.swap(true, Acquire) {
            (0..n).for_each(f);
            return;
        }
        // SAFETY: only the lifetime is erased. The pointer is published for this region alone
        // and every dereference happens in a task claimed before `done` reaches `n`; this
        // function waits for that, then closes the region, before `f` goes out of scope.
        let task: Task<'static> = unsafe { std::mem::transmute::<Task<'_>, Task<'static>>(f) };
        s.task
            .store(&task as *const Task<'static> as *mut Task<'static>, Relaxed);
        s.n.store(n, Relaxed);
        s.done.store(0, Relaxed);
        s.next.store(0, Release); // opens the region
        s.generation.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        claim(s);
        while s.done.load(Acquire) < n {
            std::hint::spin_loop();
        }
        s.next.store(CLOSED, Relaxed);
        s.busy.store(false, Release);
    }
}

/// Claim and run the open region's tasks until none are left.
fn claim(s: &Shared) {
    loop {
        let i = s.next.fetch_add(1, AcqRel);
        // Reading `n` after the claim: a claim below `CLOSED` belongs to the region that the
        // store opening it published `n` and `task` for.
        if i >= s.n.load(Acquire) || i >= CLOSED {
            return;
        }
        // SAFETY: a successful claim happens before that region's `done` reaches `n`, so the
        // submitter is still inside `run` and the pointed-to reference alive.
        let f = unsafe { *s.task.load(Acquire) };
        f(i);
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
        for round in 0..2000 {
            let n = round % 37;
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            t.run(n, &|i| {
                hits[i].fetch_add(1, Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "round {round}");
            if round == 1000 {
                std::thread::sleep(SPIN * 3);
            }
        }
        let outer: Vec<usize> = map(8, |i| map(4, |j| i * j).iter().sum());
        assert_eq!(outer, (0..8).map(|i| 6 * i).collect::<Vec<_>>());
        let mut v = vec![0usize; 100];
        for_each_mut(&mut v, |i, x| *x = i + 1);
        assert_eq!(v, (1..=100).collect::<Vec<_>>());
    }
}
