//! Prompt pickup for every queue: one LISTEN connection per worker process wakes the queue a job was inserted
//! into, and [`Woken`] fetches again after every wakeup a fetch already under way could have missed.
//!
//! Why not apalis-postgres's own `with_pubsub()`: each queue opened its own LISTEN connection, and its wakeup was
//! consumed whenever the worker was polled, even while a fetch that began *before* the job committed was still
//! running; that fetch then came back empty and the job waited for the next poll (the ~650 ms idle hops of
//! issue 11). Here every notification bumps the queue's sequence number; a fetch remembers the number it started
//! at, and the worker fetches again whenever the number has moved since. A job committed before the number was
//! read is seen by the fetch (it starts later); one committed after bumps the number again. So no wakeup is lost,
//! and a burst of notifications during one fetch costs one more fetch, not one each.
//!
//! The poll interval stays as the fallback: delayed jobs (NOTIFY fires only for jobs due when inserted), jobs
//! that failed and may be retried, orphans put back by a heartbeat, and notifications lost while the LISTEN
//! connection was down (a reconnect wakes every queue too).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{Backend, WorkerContext};
use apalis_core::backend::{BackendConfig, WireFormatBackend};
use apalis_postgres::{Config, PgTask, PostgresStorage};
use futures_util::future::BoxFuture;
use futures_util::task::AtomicWaker;
use futures_util::FutureExt;
use sqlx::postgres::PgListener;
use sqlx::PgPool;

use super::queue::Queue;

/// apalis-postgres's insert trigger notifies this channel with `{"job_type": …, "id": …, "run_at": …}`.
pub const CHANNEL: &str = "apalis::job::insert";

/// One queue's wakeups: a counter of notifications and the waker of the worker waiting on it.
#[derive(Debug, Default)]
pub struct Signal {
    seq: AtomicU64,
    waker: AtomicWaker,
}

impl Signal {
    pub fn bump(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        self.waker.wake();
    }

    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }
}

/// The signals of every queue of one process, by queue name.
#[derive(Debug, Clone)]
pub struct Signals(Arc<HashMap<&'static str, Arc<Signal>>>);

impl Default for Signals {
    fn default() -> Self {
        Self(Arc::new(
            Queue::ALL.iter().map(|q| (q.name(), Arc::default())).collect(),
        ))
    }
}

impl Signals {
    pub fn of(&self, queue: Queue) -> Arc<Signal> {
        self.0[queue.name()].clone()
    }

    fn bump(&self, job_type: &str) {
        if let Some(signal) = self.0.get(job_type) {
            signal.bump();
        }
    }

    fn bump_all(&self) {
        self.0.values().for_each(|s| s.bump());
    }
}

/// Listens on [`CHANNEL`] until dropped (abort the task), reconnecting after a lost connection. Every (re)connect
/// wakes every queue: notifications sent while nobody listened are lost, so the queues look for themselves.
pub async fn listen(pool: PgPool, signals: Signals) {
    #[derive(serde::Deserialize)]
    struct Inserted {
        job_type: String,
    }
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        let mut listener = match connected {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN for new jobs failed; the queues poll until it is back");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        signals.bump_all();
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => match serde_json::from_str::<Inserted>(n.payload()) {
                    Ok(ev) => signals.bump(&ev.job_type),
                    Err(_) => signals.bump_all(), // unreadable: wake everyone rather than miss one
                },
                // The connection was lost; the next call reconnects (and listens again). Whatever was sent in
                // between is lost: look.
                Ok(None) => signals.bump_all(),
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

enum Fetch {
    /// Waiting for a reason to fetch.
    Idle,
    /// A fetch under way, started when the queue's signal read `.1`.
    Running(BoxFuture<'static, Result<Vec<PgTask>, apalis_postgres::Error>>, u64),
    /// Fetched tasks (locked to this worker) not yet handed to the worker.
    Buffered(VecDeque<PgTask>),
    /// Shutting down: buffered tasks being handed back.
    Returning(BoxFuture<'static, Result<(), apalis_postgres::Error>>),
}

/// A [`PostgresStorage`] whose fetches are driven by the queue's [`Signal`] and a fallback poll. Registration,
/// heartbeats, orphan recovery and acks stay apalis-postgres's own (its `poll_ready`/`poll_close`, which this
/// delegates); only when to fetch is decided here, with apalis-postgres's own fetch query.
pub struct Woken {
    inner: PostgresStorage<serde_json::Value>,
    pool: PgPool,
    config: Config,
    signal: Arc<Signal>,
    poll: Pin<Box<tokio::time::Sleep>>,
    poll_interval: Duration,
    state: Fetch,
    /// The signal's value the last completed fetch started at: anything notified up to it was seen.
    covered: Option<u64>,
    /// The last fetch filled its batch: there is probably more.
    more: bool,
}

impl Woken {
    pub fn new(pool: &PgPool, config: Config, signal: Arc<Signal>, poll_interval: Duration) -> Self {
        Self {
            inner: PostgresStorage::new(pool).with_config(config.clone()),
            pool: pool.clone(),
            config,
            signal,
            poll: Box::pin(tokio::time::sleep(poll_interval)),
            poll_interval,
            state: Fetch::Idle,
            covered: None,
            more: false,
        }
    }

    fn start_fetch(&mut self, worker: &WorkerContext, seq: u64) {
        let (pool, config, worker) = (self.pool.clone(), self.config.clone(), worker.clone());
        let fut = async move {
            let mut conn = pool.acquire().await?;
            apalis_postgres::queries::fetch_next(&mut *conn, &config, &worker).await
        }
        .boxed();
        self.state = Fetch::Running(fut, seq);
    }
}

impl Backend for Woken {
    type Task = PgTask;
    type Error = apalis_postgres::Error;

    fn poll_ready(&mut self, cx: &mut Context<'_>, worker: &WorkerContext) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx, worker)
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        loop {
            match &mut self.state {
                Fetch::Buffered(tasks) => match tasks.pop_front() {
                    Some(task) => return Poll::Ready(Some(Ok(task))),
                    None => self.state = Fetch::Idle,
                },
                Fetch::Running(fut, seq) => match fut.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(tasks)) => {
                        self.covered = Some(*seq);
                        self.more = tasks.len() >= self.config.batch_size.max(1);
                        self.state = if tasks.is_empty() {
                            Fetch::Idle
                        } else {
                            Fetch::Buffered(tasks.into())
                        };
                    }
                    Poll::Ready(Err(e)) => {
                        self.state = Fetch::Idle;
                        self.more = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                Fetch::Idle => {
                    let polled = self.poll.as_mut().poll(cx).is_ready();
                    if polled {
                        let next = tokio::time::Instant::now() + self.poll_interval;
                        self.poll.as_mut().reset(next);
                    }
                    // Register before reading the sequence: a bump after the read wakes this task.
                    self.signal.waker.register(cx.waker());
                    let seq = self.signal.seq();
                    if polled || std::mem::take(&mut self.more) || self.covered != Some(seq) {
                        self.start_fetch(worker, seq);
                        continue;
                    }
                    return Poll::Pending; // the timer and the signal both hold this task's waker
                }
                Fetch::Returning(_) => return Poll::Pending,
            }
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>, worker: &WorkerContext) -> Poll<Result<(), Self::Error>> {
        loop {
            match &mut self.state {
                // A fetch under way may lock tasks: let it finish, then hand them back.
                Fetch::Running(fut, _) => match fut.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(tasks)) => self.state = Fetch::Buffered(tasks.into()),
                    Poll::Ready(Err(_)) => self.state = Fetch::Idle,
                },
                Fetch::Buffered(tasks) if !tasks.is_empty() => {
                    let ids: Vec<String> = tasks
                        .drain(..)
                        .filter_map(|t| t.task_id().map(|id| id.to_string()))
                        .collect();
                    let (pool, queue, name) = (
                        self.pool.clone(),
                        self.config.queue.to_string(),
                        worker.name().to_owned(),
                    );
                    let fut = async move {
                        let mut conn = pool.acquire().await?;
                        apalis_postgres::queries::reenqueue_abandoned(&mut *conn, &queue, &name, &ids).await?;
                        Ok(())
                    }
                    .boxed();
                    self.state = Fetch::Returning(fut);
                }
                Fetch::Buffered(_) => self.state = Fetch::Idle,
                Fetch::Returning(fut) => match fut.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => {
                        if let Err(e) = r {
                            // Not fatal: the tasks stay locked to this worker and come back as orphans.
                            tracing::warn!(error = %e, "could not hand prefetched jobs back at shutdown");
                        }
                        self.state = Fetch::Idle;
                    }
                },
                Fetch::Idle => return self.inner.poll_close(cx, worker),
            }
        }
    }
}

impl BackendConfig for Woken {
    type Args = <PostgresStorage<serde_json::Value> as BackendConfig>::Args;
    type Id = <PostgresStorage<serde_json::Value> as BackendConfig>::Id;
    type Kind = <PostgresStorage<serde_json::Value> as BackendConfig>::Kind;
    type Config = <PostgresStorage<serde_json::Value> as BackendConfig>::Config;
    type Layer = <PostgresStorage<serde_json::Value> as BackendConfig>::Layer;

    fn config(&self) -> &Self::Config {
        BackendConfig::config(&self.inner)
    }

    fn middleware(&mut self, worker: &mut WorkerContext) -> Self::Layer {
        self.inner.middleware(worker)
    }
}

impl WireFormatBackend for Woken {
    type Codec = <PostgresStorage<serde_json::Value> as WireFormatBackend>::Codec;
    type Compact = <PostgresStorage<serde_json::Value> as WireFormatBackend>::Compact;

    fn codec(&self) -> &Self::Codec {
        self.inner.codec()
    }
}
