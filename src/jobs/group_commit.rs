//! Group commit: many callers' small writes in one transaction (issue 11). The queue and its writer tasks, shared by
//! every batched write of the hot path: recording transfers ([`super::transfer_batch`]) and starting succeeded
//! payments ([`super::start_batch`]).
//!
//! A caller hands its item to its context's [`GroupCommit`] and waits for the answer. Writer tasks take what is
//! queued, up to [`BatchWrite::BATCH_MAX`] items at a time, and write it in one transaction, until the queue is empty;
//! a caller that queues starts another writer while fewer than [`WRITERS_MAX`] run. So a quiet process writes each
//! item at once (as many writers as items, up to the bound: no wait for a sibling's batch), and a busy one writes
//! many per transaction (every writer busy, the queue grows between its turns). A writer is a task of its own, so no
//! caller carries the others' work (a job's timeout never cancels a batch it did not own) and a dropped caller only
//! gives up waiting.
//!
//! A batch only ever takes the plain case: each item's answer is `Some` (written) or `None` (not taken: the caller
//! does it alone, on the path it had before batching). A failed batch, and a writer dropped before it answered (the
//! runtime shutting down, a panic), answer `None` to every item of it: nothing a batch could not write is lost.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::app::AppContext;
use crate::store::StoreError;

/// Writer tasks (each a transaction, on a connection of the pool) a context runs at once at most, per kind of batch.
/// Measured in burn-down (issue 11): two writers made 1,026 and 1,102 transfers/s, three 933 and 957 (smaller
/// batches, more statements for the same rows), one 881 and 925 (fewest statements, but a payment waits for the one
/// writer: the CPU was not used up); idle latency was the same with two or three.
pub const WRITERS_MAX: usize = 2;

/// One kind of batched write.
pub trait BatchWrite: Send + Sync + Sized + 'static {
    type Item: Send + 'static;
    type Answer: Send + 'static;
    /// The kind's name in `splitpay_group_commit_items_total`.
    const KIND: &'static str;
    /// Items one transaction takes at most.
    const BATCH_MAX: usize;
    /// This kind's queue in a context.
    fn of(ctx: &AppContext) -> &Arc<GroupCommit<Self>>;
    /// The batch, named for a warning (its ids).
    fn describe(batch: &[Self::Item]) -> String;
    /// Writes the batch in one transaction: all of what it takes, or nothing (an error). One answer per item, in
    /// order: `Some` written, `None` not taken.
    fn write(
        ctx: &AppContext,
        batch: &[Self::Item],
    ) -> impl Future<Output = Result<Vec<Option<Self::Answer>>, StoreError>> + Send;
}

/// One context's queue of items of kind `W` (see the module's comment).
pub struct GroupCommit<W: BatchWrite> {
    state: Mutex<State<W>>,
}

/// A queued item and where its answer goes.
type Waiting<W> = (
    <W as BatchWrite>::Item,
    oneshot::Sender<Option<<W as BatchWrite>::Answer>>,
);

struct State<W: BatchWrite> {
    queue: Vec<Waiting<W>>,
    /// Writer tasks running.
    writers: usize,
}

impl<W: BatchWrite> Default for GroupCommit<W> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                queue: Vec::new(),
                writers: 0,
            }),
        }
    }
}

impl<W: BatchWrite> std::fmt::Debug for GroupCommit<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

/// A writer's slot, taken before its task is spawned and ended however the writer ends: a writer dropped before it
/// ran or mid-batch (the runtime shutting down, a panic) gives its slot back, answers every queued item `None` by
/// dropping it when no other writer is left to take it, and lets the next item start a writer, so no caller waits for
/// nobody. The batch it was writing is answered the same way, by dropping it.
struct Slot<W: BatchWrite> {
    queue: Arc<GroupCommit<W>>,
    done: bool,
}

impl<W: BatchWrite> Drop for Slot<W> {
    fn drop(&mut self) {
        if !self.done {
            let mut state = self.queue.state.lock().unwrap_or_else(|p| p.into_inner());
            state.writers -= 1;
            if state.writers == 0 {
                state.queue.clear();
            }
        }
    }
}

impl<W: BatchWrite> GroupCommit<W> {
    /// Writes `item` in a batch with whatever else is waiting, through `ctx`'s queue of kind `W`. `Some`: written.
    /// `None`: the batch did not take it, and the caller must do it alone.
    pub async fn submit(ctx: &AppContext, item: W::Item) -> Option<W::Answer> {
        let this = W::of(ctx);
        let (done, answer) = oneshot::channel();
        let start_writer = {
            let mut state = this.state.lock().unwrap_or_else(|p| p.into_inner());
            state.queue.push((item, done));
            let start = state.writers < WRITERS_MAX;
            if start {
                state.writers += 1;
            }
            start
        };
        if start_writer {
            let slot = Slot {
                queue: this.clone(),
                done: false,
            };
            tokio::spawn(write_until_empty(ctx.clone(), slot));
        }
        answer.await.unwrap_or(None)
    }
}

/// The writer task, in its slot: batches until the queue is empty.
async fn write_until_empty<W: BatchWrite>(ctx: AppContext, mut slot: Slot<W>) {
    loop {
        let batch: Vec<Waiting<W>> = {
            let mut state = slot.queue.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.queue.is_empty() {
                state.writers -= 1;
                slot.done = true;
                return;
            }
            let n = state.queue.len().min(W::BATCH_MAX);
            state.queue.drain(..n).collect()
        };
        let (items, senders): (Vec<W::Item>, Vec<_>) = batch.into_iter().unzip();
        let result = W::write(&ctx, &items).await;
        let written = match &result {
            Ok(answers) if answers.len() == items.len() => answers.iter().filter(|a| a.is_some()).count(),
            _ => 0,
        };
        // How many items the batches took, and how many went back to be done alone: a rise of the latter means the
        // hot path is falling back to its slower way (contention, or a batch that keeps failing).
        metrics::counter!("splitpay_group_commit_items_total", "kind" => W::KIND, "written" => "true")
            .increment(written as u64);
        metrics::counter!("splitpay_group_commit_items_total", "kind" => W::KIND, "written" => "false")
            .increment((items.len() - written) as u64);
        match result {
            Ok(answers) if answers.len() == items.len() => {
                // An answer whose caller is gone is dropped: an answer that must not be lost (a started payment)
                // acts on its own drop.
                for (done, answer) in senders.into_iter().zip(answers) {
                    let _ = done.send(answer);
                }
            }
            Ok(answers) => {
                // A writer's bug: it committed, but its answers do not match. `None` makes each caller do its item
                // alone, which finds what was written (every lone path is idempotent); an answer that acts on its own
                // drop (a started payment drives its transfers) still does, and the lone way then finds the payment
                // started and drives nothing.
                tracing::error!(
                    batch = W::describe(&items),
                    answers = answers.len(),
                    "a batch answered the wrong count"
                );
                for done in senders {
                    let _ = done.send(None);
                }
            }
            Err(e) => {
                // Nothing was written: each caller does its item alone (and retries or hands over from there).
                tracing::warn!(batch = W::describe(&items), error = %e, "batch write failed: each item is done alone");
                for done in senders {
                    let _ = done.send(None);
                }
            }
        }
    }
}
