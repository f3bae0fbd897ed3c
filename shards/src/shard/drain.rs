//! Running a drain: reserve its offsets, execute its items in arrival order
//! (later ones see the effects of earlier ones), write every staged record
//! with one commit (rolled back if that fails), release the offsets, and
//! only then the replies — reads included, so no reply reveals state a
//! crash could take back.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rstmdb_wal::WalError;

use super::gather::{Drain, DrainItem};
use super::{FsyncPolicy, HubMsg, PartAnswer, ShardLoop, ShardMsg};
use crate::atomic::Vote;
use crate::commands::{Batch, BatchReply, Command, Reply, ShardWalStats, BATCH_ANSWER_BYTES};
use crate::engine::{now_ms, Mark, Offsets};
use crate::error::ApiError;

/// Whether a drain is only reads a cluster node may answer from its own
/// applied state (see [`Batch::node_local`]).
fn node_local(items: &[DrainItem]) -> bool {
    items.iter().all(|i| match i {
        DrainItem::Batch(b) => b.node_local && b.commands.iter().all(|(_, c)| !c.may_write()),
        _ => false,
    })
}

/// The replies to one batch and where they go.
type Answer = (flume::Sender<BatchReply>, Vec<(u32, Reply)>);

/// A part executed in this drain, waiting for the drain's commit.
struct PartCommit {
    batch_id: String,
    replies: Vec<(u32, Reply)>,
    mark: Mark,
    first: Option<u64>,
    reply_to: flume::Sender<PartAnswer>,
}

/// What executing a drain leaves to do once its commit is decided.
struct AfterCommit {
    /// Each batch's replies, released after the commit.
    answers: Vec<Answer>,
    /// A batch asked for WAL_STATS (its figures are taken after the commit).
    stats_wanted: bool,
    /// The atomic part executed, if any.
    part: Option<PartCommit>,
    /// Atomic parts whose `batch_abort` record is staged, and who waits.
    aborts: Vec<(String, flume::Sender<usize>)>,
}

impl ShardLoop {
    /// Executes `drain` and group-commits it, then answers.
    pub(super) async fn run_drain(&mut self, drain: Drain) {
        let Drain { items, writes, .. } = drain;
        let local = node_local(&items);
        if let Some(error) = self.refusal(local) {
            self.refuse(items, error).await;
            return;
        }
        self.snaps.records_since += writes;
        let mut offsets = self.reserve_offsets(writes);
        let reserved = offsets.range();
        self.engine.collect_events = self.cfg.events.watching.load(Ordering::SeqCst);
        let now = now_ms();
        let after = self.execute_drain(items, &mut offsets, now);
        let failure = self.commit_staged(local, reserved).await.err();
        match &failure {
            None => self.keep_drain(after.part.as_ref()),
            Some(e) => self.roll_back(e, after.part.as_ref()),
        }
        if let Some(part) = after.part {
            self.answer_part(part, &failure);
        }
        self.finish_aborts(after.aborts);
        if writes > 0 {
            if let Some(m) = &self.cluster {
                // Offsets no committed entry owns (a drain that failed, or
                // that wrote nothing) go back: another leader may hand them
                // out, so readers must not pass them yet.
                self.seq.retract_to(m.applied_offset());
            }
            self.release_offsets();
        }
        self.release_replies(after.answers, after.stats_wanted, failure)
            .await;
    }

    /// In cluster mode, why this member cannot run a drain now (it does
    /// not lead, or not yet).
    fn refusal(&self, node_local: bool) -> Option<ApiError> {
        let m = self.cluster.as_ref()?;
        (!node_local && !m.can_serve()).then(|| m.not_serving())
    }

    /// Answers every item of a drain that is not run with `error`.
    async fn refuse(&mut self, items: Vec<DrainItem>, error: ApiError) {
        for item in items {
            match item {
                DrainItem::Batch(b) => {
                    let replies = b
                        .commands
                        .into_iter()
                        .map(|(slot, _)| (slot, Reply::Error(error.clone())))
                        .collect();
                    let _ = b
                        .reply_to
                        .send_async(BatchReply {
                            shard: self.cfg.id,
                            replies,
                        })
                        .await;
                }
                DrainItem::Prepare {
                    commands, reply_to, ..
                } => {
                    let slot = commands.first().map_or(0, |c| c.0);
                    let vote = Vote::No {
                        slot,
                        error: error.clone(),
                    };
                    let _ = reply_to.try_send((self.cfg.id, vote));
                }
                DrainItem::Commit { reply_to, .. } => {
                    let _ = reply_to.try_send((self.cfg.id, Err(error.clone())));
                }
                DrainItem::Abort { batch_id, reply_to } => {
                    let _ = self.atomic.abort(&mut self.engine, &batch_id);
                    let _ = reply_to.try_send(self.cfg.id);
                }
            }
        }
    }

    /// Makes the drain's staged records durable: one WAL commit, or in
    /// cluster mode one entry of the group's log.
    async fn commit_staged(
        &mut self,
        node_local: bool,
        reserved: std::ops::Range<u64>,
    ) -> Result<(), ApiError> {
        if node_local && self.cluster.is_some() {
            // Reads this node answers from its own applied state.
            assert!(
                self.engine.take_staged().is_empty(),
                "a node-local drain writes nothing"
            );
            Ok(())
        } else if self.cluster.is_some() {
            self.replicate_staged(reserved).await
        } else {
            self.write_staged().await.map_err(|e| ApiError::wal(&e))
        }
    }

    /// Reserves an offset for every record the drain may write; with none,
    /// an empty range at the next offset. In cluster mode the range starts
    /// no lower than the group's next offset.
    fn reserve_offsets(&self, writes: u64) -> Offsets {
        if let Some(m) = &self.cluster {
            self.seq.advance_to(m.next_offset());
        }
        let base = if writes > 0 {
            self.seq.reserve(self.cfg.id, writes)
        } else {
            self.seq.peek()
        };
        Offsets::new(base, base + writes)
    }

    /// Executes the drain's items in arrival order, staging their records.
    fn execute_drain(
        &mut self,
        items: Vec<DrainItem>,
        offsets: &mut Offsets,
        now: i64,
    ) -> AfterCommit {
        let mut after = AfterCommit {
            answers: Vec::with_capacity(items.len()),
            stats_wanted: false,
            part: None,
            aborts: Vec::new(),
        };
        for item in items {
            match item {
                DrainItem::Batch(b) => self.execute_batch(b, offsets, now, &mut after),
                DrainItem::Prepare {
                    batch_id,
                    commands,
                    reply_to,
                } => self.prepare_part(batch_id, commands, reply_to, now),
                DrainItem::Commit {
                    batch_id,
                    participants,
                    reply_to,
                } => {
                    if let Some(part) =
                        self.execute_part(batch_id, &participants, reply_to, offsets, now)
                    {
                        after.part = Some(part);
                    }
                }
                DrainItem::Abort { batch_id, reply_to } => {
                    self.abort_part(batch_id, reply_to, offsets, &mut after.aborts)
                }
            }
        }
        after
    }

    /// Executes one connection's batch, unless a command touches an
    /// instance an atomic batch holds: then the whole batch waits.
    fn execute_batch(
        &mut self,
        b: Batch,
        offsets: &mut Offsets,
        now: i64,
        after: &mut AfterCommit,
    ) {
        if b.commands.iter().any(|(_, c)| self.atomic.conflicts(c)) {
            self.deferred.push_back(ShardMsg::Batch(b));
            return;
        }
        let mut replies = Vec::with_capacity(b.commands.len());
        let mut answer_bytes = 0usize;
        for (slot, cmd) in b.commands {
            if answer_bytes >= BATCH_ANSWER_BYTES {
                // Bounds what a connection's answers hold in
                // memory; the rest comes back later, in order.
                replies.push((slot, Reply::Deferred(cmd)));
                continue;
            }
            let reply = if matches!(cmd, Command::WalStats) {
                after.stats_wanted = true;
                Reply::WalStats(ShardWalStats::default())
            } else {
                self.engine.execute(cmd, offsets, now)
            };
            answer_bytes += reply.approx_bytes();
            replies.push((slot, reply));
        }
        after.answers.push((b.reply_to, replies));
    }

    /// Dry-runs an atomic batch's part, holds its instances and votes.
    fn prepare_part(
        &mut self,
        batch_id: String,
        commands: Vec<(u32, Command)>,
        reply_to: flume::Sender<(usize, Vote)>,
        now: i64,
    ) {
        // No waiting between atomic batches (two could wait for
        // each other across shards), and none ahead of commands
        // already waiting (they would starve): fail this one.
        let blocked = commands
            .iter()
            .find(|(_, c)| self.atomic.conflicts(c))
            .map(|(slot, _)| *slot);
        if let Some(slot) = blocked
            .or_else(|| (!self.deferred.is_empty()).then(|| commands.first().map_or(0, |c| c.0)))
        {
            let error = ApiError::bad_request(
                "an instance it touches is held by another atomic batch in progress; retry",
            );
            let _ = reply_to.try_send((self.cfg.id, Vote::No { slot, error }));
            return;
        }
        let vote = self
            .atomic
            .prepare(&mut self.engine, batch_id, commands, now);
        let _ = reply_to.try_send((self.cfg.id, vote));
    }

    /// Runs an atomic batch's part for real; it is answered after the
    /// drain's commit (or at once if it fails now).
    fn execute_part(
        &mut self,
        batch_id: String,
        participants: &[u32],
        reply_to: flume::Sender<PartAnswer>,
        offsets: &mut Offsets,
        now: i64,
    ) -> Option<PartCommit> {
        let executed = self
            .atomic
            .execute(&mut self.engine, &batch_id, participants, offsets, now);
        match executed {
            Ok((replies, mark, first)) => Some(PartCommit {
                batch_id,
                replies,
                mark,
                first,
                reply_to,
            }),
            Err(e) => {
                let _ = reply_to.try_send((self.cfg.id, Err(e)));
                None
            }
        }
    }

    /// Undoes an atomic batch's part. A written part needs a `batch_abort`
    /// record, staged here and acknowledged after the commit; a part only
    /// prepared is acknowledged at once.
    fn abort_part(
        &mut self,
        batch_id: String,
        reply_to: flume::Sender<usize>,
        offsets: &mut Offsets,
        aborts: &mut Vec<(String, flume::Sender<usize>)>,
    ) {
        match self.atomic.abort(&mut self.engine, &batch_id) {
            Some(entry) => {
                if let Err(e) = self.engine.stage_abort(offsets, entry) {
                    tracing::error!(shard = self.cfg.id, error = %e, "cannot stage batch abort");
                }
                aborts.push((batch_id, reply_to));
            }
            None => {
                self.let_deferred_run();
                let _ = reply_to.try_send(self.cfg.id);
            }
        }
    }

    /// Writes every staged record with one commit, synced when the fsync
    /// policy says. If the writer refuses a record, none is written.
    async fn write_staged(&mut self) -> Result<(), WalError> {
        let staged = self.engine.take_staged();
        if staged.is_empty() {
            return Ok(());
        }
        self.commit_records.record(staged.len() as f64);
        for s in &staged {
            if let Err(e) = self.writer.stage(s.offset, s.kind, &s.bytes) {
                self.writer.discard_staged();
                return Err(e);
            }
        }
        let sync = self.sync_due(staged.len() as u64);
        self.writer.commit(sync).await?;
        if sync {
            self.unsynced_records = 0;
            self.dirty_since = None;
        } else if self.dirty_since.is_none() {
            self.dirty_since = Some(Instant::now());
        }
        Ok(())
    }

    /// Whether a commit of `records` more records syncs, by the fsync
    /// policy (`every_n` counts them).
    pub(super) fn sync_due(&mut self, records: u64) -> bool {
        match self.cfg.fsync {
            FsyncPolicy::EveryWrite => true,
            FsyncPolicy::EveryN(n) => {
                self.unsynced_records += records;
                self.unsynced_records >= n
            }
            // Under steady load the loop never idles long enough for the
            // timer in `wait_for_message`: sync here once the oldest
            // unsynced write is due.
            FsyncPolicy::EveryMs(ms) => self
                .dirty_since
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(ms)),
            FsyncPolicy::Never => false,
        }
    }

    /// The commit held: the engine drops the drain's undo log; an atomic
    /// part keeps its own until release or abort.
    fn keep_drain(&mut self, part: Option<&PartCommit>) {
        if let Some(p) = part {
            self.atomic
                .written(&mut self.engine, p.batch_id.clone(), p.mark, p.first);
            // Hold readers below the part until it is released.
            self.seq.hold(self.cfg.id, self.atomic.hold_floor());
        }
        self.engine.commit_done();
    }

    /// The commit failed: the undo log takes back everything the drain
    /// did, and an atomic part in it fails (its holds go).
    fn roll_back(&mut self, e: &ApiError, part: Option<&PartCommit>) {
        tracing::error!(shard = self.cfg.id, error = %e.message, "group commit failed; rolling back the drain");
        self.engine.rollback();
        if let Some(p) = part {
            self.atomic.failed(&p.batch_id);
        }
    }

    /// Answers the coordinator of the part executed in this drain: its
    /// replies once durable, or the commit's error.
    fn answer_part(&self, p: PartCommit, failure: &Option<ApiError>) {
        let answer = match failure {
            None => Ok(p.replies),
            Some(e) => Err(e.clone()),
        };
        let _ = p.reply_to.try_send((self.cfg.id, answer));
    }

    /// Aborts whose record this drain wrote (or tried to) are done: the
    /// holds lift and what they held back may run.
    fn finish_aborts(&mut self, aborts: Vec<(String, flume::Sender<usize>)>) {
        for (batch_id, reply_to) in aborts {
            let _ = self.atomic.release(&batch_id);
            self.seq.hold(self.cfg.id, self.atomic.hold_floor());
            let _ = reply_to.try_send(self.cfg.id);
            self.let_deferred_run();
        }
    }

    /// Releases the drain's offsets. Its events go to the hubs first, so
    /// they are in the channel before the watermark can pass them.
    fn release_offsets(&mut self) {
        let events = self.engine.take_events();
        let announce = self.engine.collect_events;
        if !events.is_empty() {
            self.cfg.events.send(HubMsg::Events(events));
        }
        // Everything reserved is written (or will never be): readers may
        // pass these offsets now.
        self.seq.release(self.cfg.id);
        if announce {
            self.cfg.events.send(HubMsg::Released);
        }
    }

    /// Sends each batch its replies, now that the commit is decided: every
    /// reply of a failed drain becomes its error, and WAL_STATS gets the
    /// figures after the commit.
    async fn release_replies(
        &self,
        answers: Vec<Answer>,
        stats_wanted: bool,
        failure: Option<ApiError>,
    ) {
        let stats = stats_wanted.then(|| self.wal_stats());
        for (to, mut replies) in answers {
            for (_, r) in replies.iter_mut() {
                if matches!(r, Reply::Deferred(_)) {
                    // Never executed: not touched by the drain's outcome.
                } else if let Some(err) = &failure {
                    // Every answer of a failed drain, errors included, was
                    // computed against state that has been rolled back.
                    *r = Reply::Error(err.clone());
                } else if let Reply::WalStats(s) = r {
                    *s = stats.expect("stats computed when requested");
                }
            }
            // A vanished connection is not the shard's problem.
            let _ = to
                .send_async(BatchReply {
                    shard: self.cfg.id,
                    replies,
                })
                .await;
        }
    }
}
