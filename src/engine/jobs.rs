//! Background jobs: a small scheduler, and the engine's jobs on it (`Engine::persist_loop`).
//!
//! A `Job` has a name (for logs), a cadence, a concurrency limit (how many of its runs may be
//! in progress at once) and optionally a wake-up `Notify` that starts a run before the cadence
//! is up. The `Scheduler` drives every job until the stop signal: a run starts once one of the
//! job's slots is free and then either the cadence has passed (counted from the moment the slot
//! was free: with a limit of one, from the end of the previous run) or the wake-up was notified.
//! Once stopped, no run starts, and `Scheduler::run` returns when the runs in progress have
//! finished: a run is never cancelled halfway. A run that panics is logged; its job goes on.
//!
//! The engine runs three jobs: "persist" (persisting, then sorting buffered runs) and "compact"
//! (`compact`: merging a partition's files, one partition after another, at most one run at a
//! time; the merge itself runs on a low-priority thread). Views refresh in a task of their own
//! (`views::Views::refresh_loop`, which plans SQL) and alerts in theirs. The "retention" job
//! (`retention`, every minute and whenever a retention is set) expires files past their
//! table's retention and deletes the files replaced or expired whose grace period is over.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::{Notify, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

use super::Engine;

/// How often the engine's jobs look for work when nothing wakes them.
const TICK: Duration = Duration::from_secs(1);

/// How often the "retention" job expires files (and deletes replaced ones) when no new
/// retention setting wakes it.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// How long the persist job waits after a failed persist before it may run again: doubling
/// from the first to the last with each failure in a row (a store that is down is not
/// hammered), with up to half of it again as jitter, and back to the first after a success.
const PERSIST_BACKOFF_FIRST: Duration = Duration::from_secs(1);
const PERSIST_BACKOFF_MAX: Duration = Duration::from_secs(60);

impl Engine {
    /// Background persistence: everything every `persist_interval`; the largest partitions
    /// whenever the buffer passes a quarter of its limit.
    ///
    /// One job on the `Scheduler`, "persist", run every second and whenever a write finds the
    /// buffer above a quarter of its limit (`persist_wakeup`): it persists (everything every
    /// `persist_interval`, else the largest partitions down to an eighth of the limit) and then
    /// sorts buffered runs (`sort_buffers`), one after the other as the loop it replaced did, so
    /// the two never compete for the cores with ingest at once. Beside it, the "compact" job
    /// (every `--compaction-interval`, unless zero). Returns once `shutdown` is cancelled and
    /// the runs in progress have finished (a compaction stops at its next batch).
    pub async fn persist_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut last_full = Instant::now();
        let failures = Arc::new(std::sync::atomic::AtomicU32::new(0));
        // A full persist that failed is retried as a full one at the next run (after the
        // backoff), not only when the next interval is up: a store that comes back gets
        // everything at once.
        let full_pending = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = shutdown.clone();
        let high_water = self.config.buffer_bytes_max / 4;
        let persist_interval = self.config.persist_interval;

        let engine = self.clone();
        let persist = Job::new("persist", TICK, move || {
            // Decided when the run starts, as the loop this replaces did after each wait.
            let full = last_full.elapsed() >= persist_interval
                || full_pending.load(std::sync::atomic::Ordering::Relaxed);
            if full {
                last_full = Instant::now();
            }
            let engine = engine.clone();
            let failures = failures.clone();
            let full_pending = full_pending.clone();
            let stop = stop.clone();
            async move {
                let result = if full {
                    engine.persist_all().await.map(|_| ())
                } else if engine.buffered_bytes() > high_water {
                    engine.persist_down_to(high_water / 2).await
                } else {
                    Ok(())
                };
                if full {
                    full_pending.store(result.is_err(), std::sync::atomic::Ordering::Relaxed);
                }
                match result {
                    Ok(()) => failures.store(0, std::sync::atomic::Ordering::Relaxed),
                    Err(error) => {
                        let n = failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let wait = backoff(n);
                        tracing::error!(
                            %error,
                            retry_in_ms = wait.as_millis() as u64,
                            "persist failed; rows stay buffered and in the WAL"
                        );
                        // A stop does not wait out the backoff.
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = stop.cancelled() => {}
                        }
                    }
                }
                if let Err(error) = engine.sort_buffers().await {
                    tracing::error!(%error, "sorting buffered rows failed; they stay as they were");
                }
            }
        })
        .concurrency(1)
        .woken_by(self.persist_wakeup.clone());

        let engine = self.clone();
        let retention = Job::new("retention", RETENTION_EVERY, move || {
            let engine = engine.clone();
            async move {
                engine.expire_all().await;
            }
        })
        .concurrency(1)
        .woken_by(self.retention_wakeup.clone());

        let mut scheduler = Scheduler::default().with(persist).with(retention);
        let interval = self.config.compaction.interval;
        if !interval.is_zero() {
            let engine = self.clone();
            let stop = shutdown.clone();
            let compact = Job::new("compact", interval, move || {
                let engine = engine.clone();
                let stop = stop.clone();
                async move { engine.compact_all(&stop).await }
            });
            scheduler = scheduler.with(compact);
        }
        scheduler.run(shutdown).await;
    }
}

/// The wait after the `n`th failure in a row (0 for the first).
fn backoff(n: u32) -> Duration {
    let base = PERSIST_BACKOFF_FIRST.saturating_mul(1 << n.min(16)).min(PERSIST_BACKOFF_MAX);
    let [byte] = crate::random_bytes::<1>();
    base + base.mul_f64(f64::from(byte) / 510.0)
}

/// A background job: what one run does, how often it runs, how many runs may overlap.
pub(crate) struct Job {
    name: &'static str,
    /// Time from a free slot to the next run, unless the wake-up comes first.
    cadence: Duration,
    /// Runs of this job that may be in progress at once (at least one).
    concurrency: usize,
    /// Notified, it starts a run without waiting for the cadence.
    wakeup: Option<Arc<Notify>>,
    /// Makes the future of one run; called as the run starts.
    run: Box<dyn FnMut() -> BoxFuture<'static, ()> + Send>,
}

impl Job {
    /// A job that runs `run` every `cadence`, one run at a time, with no wake-up.
    pub(crate) fn new<F, Fut>(name: &'static str, cadence: Duration, mut run: F) -> Job
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Job {
            name,
            cadence,
            concurrency: 1,
            wakeup: None,
            run: Box::new(move || -> BoxFuture<'static, ()> { Box::pin(run()) }),
        }
    }

    /// Lets up to `limit` runs (at least one) be in progress at once.
    pub(crate) fn concurrency(mut self, limit: usize) -> Job {
        self.concurrency = limit.max(1);
        self
    }

    /// Also starts a run when `wakeup` is notified. A notification that comes while no slot is
    /// free starts the next run as soon as one is (`Notify` keeps one permit).
    pub(crate) fn woken_by(mut self, wakeup: Arc<Notify>) -> Job {
        self.wakeup = Some(wakeup);
        self
    }
}

/// Runs jobs, each on its own schedule, until a stop signal.
#[derive(Default)]
pub(crate) struct Scheduler {
    jobs: Vec<Job>,
}

impl Scheduler {
    /// Adds a job.
    pub(crate) fn with(mut self, job: Job) -> Scheduler {
        self.jobs.push(job);
        self
    }

    /// Runs every job until `stop` is cancelled, then waits for the runs in progress.
    pub(crate) async fn run(self, stop: CancellationToken) {
        futures::future::join_all(self.jobs.into_iter().map(|job| drive(job, stop.clone()))).await;
    }
}

/// One job's loop: wait for a free slot, then for the cadence or the wake-up, start a run on
/// its own task; once stopped, wait for the runs in progress.
async fn drive(job: Job, stop: CancellationToken) {
    let Job { name, cadence, concurrency, wakeup, mut run } = job;
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut runs = JoinSet::new();
    loop {
        let slot = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => {
                slot.expect("a job's semaphore is never closed")
            }
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = woken(wakeup.as_deref()) => {}
            _ = tokio::time::sleep(cadence) => {}
        }
        let future = run();
        runs.spawn(async move {
            future.await;
            drop(slot);
        });
        while let Some(done) = runs.try_join_next() {
            report(name, done);
        }
    }
    while let Some(done) = runs.join_next().await {
        report(name, done);
    }
}

/// Completes when `wakeup` is notified; never without one.
async fn woken(wakeup: Option<&Notify>) {
    match wakeup {
        Some(wakeup) => wakeup.notified().await,
        None => std::future::pending().await,
    }
}

/// Logs a run that panicked (or was aborted).
fn report(name: &'static str, done: Result<(), JoinError>) {
    if let Err(error) = done {
        tracing::error!(job = name, %error, "background job run failed");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Waits, up to ten seconds, until `done` holds.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn runs_on_its_cadence_and_once_per_wakeup() {
        let wakeup = Arc::new(Notify::new());
        let (woke, mut woken_runs) = tokio::sync::mpsc::unbounded_channel();
        // A cadence too slow to come up during the test: every run of this job is woken.
        let woken_job = Job::new("woken", Duration::from_secs(3600), move || {
            let woke = woke.clone();
            async move {
                let _ = woke.send(());
            }
        })
        .woken_by(wakeup.clone());
        let ticks = Arc::new(AtomicUsize::new(0));
        let counter = ticks.clone();
        let ticking = Job::new("ticking", Duration::from_millis(5), move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async {}
        });
        let stop = CancellationToken::new();
        let scheduler =
            tokio::spawn(Scheduler::default().with(woken_job).with(ticking).run(stop.clone()));
        for _ in 0..3 {
            wakeup.notify_one();
            tokio::time::timeout(Duration::from_secs(10), woken_runs.recv())
                .await
                .expect("a run soon after the wake-up")
                .expect("the job is scheduled");
        }
        until("the ticking job ran three times", || ticks.load(Ordering::SeqCst) >= 3).await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), scheduler)
            .await
            .expect("the scheduler stops")
            .expect("the scheduler did not panic");
        assert!(woken_runs.try_recv().is_err(), "one run per wake-up, none after the stop");
    }

    #[tokio::test]
    async fn at_most_the_limit_at_once_and_stop_waits_for_runs() {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (r, m) = (running.clone(), most.clone());
        let job = Job::new("slow", Duration::from_millis(1), move || {
            let (r, m) = (r.clone(), m.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                r.fetch_sub(1, Ordering::SeqCst);
            }
        })
        .concurrency(2);
        let stop = CancellationToken::new();
        let scheduler = tokio::spawn(Scheduler::default().with(job).run(stop.clone()));
        until("two runs are in progress", || running.load(Ordering::SeqCst) == 2).await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), scheduler)
            .await
            .expect("the scheduler stops")
            .expect("the scheduler did not panic");
        assert_eq!(running.load(Ordering::SeqCst), 0, "stopping waited for the runs in progress");
        assert_eq!(most.load(Ordering::SeqCst), 2, "never more runs at once than the limit");
    }
}
