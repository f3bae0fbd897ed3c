//! Gathering a drain: every message already waiting, in order. Messages
//! that need no group commit (barriers, snapshots, compaction, figures,
//! WAL reads, atomic releases) are handled on the way.

use rstmdb_wal::{ReaderIo, SegmentInfo};

use super::{
    AtomicMsg, HubMsg, PartAnswer, ShardLoop, ShardMsg, ShardStats, Telemetry, WalReadRequest,
};
use crate::atomic::{AtomicState, Vote};
use crate::commands::{Batch, Command, ShardWalStats};
use crate::error::ApiError;

/// A message that executes in a drain and waits for its commit.
pub(super) enum DrainItem {
    /// Commands from one connection's read cycle.
    Batch(Batch),
    /// [`AtomicMsg::Prepare`].
    Prepare {
        batch_id: String,
        commands: Vec<(u32, Command)>,
        reply_to: flume::Sender<(usize, Vote)>,
    },
    /// [`AtomicMsg::Commit`].
    Commit {
        batch_id: String,
        participants: Vec<u32>,
        reply_to: flume::Sender<PartAnswer>,
    },
    /// [`AtomicMsg::Abort`].
    Abort {
        batch_id: String,
        reply_to: flume::Sender<usize>,
    },
}

/// The messages of one group commit, in arrival order.
#[derive(Default)]
pub(super) struct Drain {
    pub(super) items: Vec<DrainItem>,
    /// Commands among them (bounded by `max_drain_commands`).
    commands: usize,
    /// Records they may write: the offsets to reserve.
    pub(super) writes: u64,
}

impl Drain {
    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds `item`, counting its commands and the records it may write.
    /// True when it ends the drain.
    fn add(&mut self, item: DrainItem, atomic: &AtomicState) -> bool {
        let ends_drain = match &item {
            DrainItem::Batch(b) => {
                self.commands += b.commands.len();
                self.writes += b.commands.iter().filter(|(_, c)| c.may_write()).count() as u64;
                false
            }
            DrainItem::Prepare { commands, .. } => {
                self.commands += commands.len();
                false
            }
            DrainItem::Commit { batch_id, .. } => {
                self.writes += atomic.prepared_writes(batch_id);
                // A commit ends its drain: the part's undo log is
                // everything after its mark.
                true
            }
            DrainItem::Abort { .. } => {
                self.writes += 1;
                false
            }
        };
        self.items.push(item);
        ends_drain
    }
}

impl ShardLoop {
    /// Gathers the drain `first` starts: every message already waiting, in
    /// order, until `max_drain_commands` commands or an atomic commit.
    pub(super) async fn gather_drain(&mut self, first: ShardMsg) -> Drain {
        let mut drain = Drain::default();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            let ends_drain = match self.handle_control(msg).await {
                Some(item) => drain.add(item, &self.atomic),
                None => false,
            };
            if !ends_drain && drain.commands < self.cfg.max_drain_commands {
                // What waited meanwhile (held back by an atomic batch, or
                // queued while a cluster drain awaited its commit) first,
                // in order, then the channel.
                next = self.ready.pop_front().or_else(|| self.rx.try_recv().ok());
            }
        }
        drain
    }

    /// Handles at once a message that needs no group commit; hands back
    /// one that does, as a drain item.
    async fn handle_control(&mut self, msg: ShardMsg) -> Option<DrainItem> {
        match msg {
            ShardMsg::Barrier(done) => {
                let _ = done.try_send(());
            }
            ShardMsg::Snapshot(req) => {
                self.snaps
                    .begin(
                        &self.cfg,
                        &mut self.engine,
                        &mut self.writer,
                        &self.seq,
                        &self.atomic,
                        req,
                    )
                    .await
            }
            ShardMsg::Compact(req) => self.snaps.compact(&self.cfg, &mut self.writer, req),
            ShardMsg::Stats(to) => self.send_stats(to),
            ShardMsg::Telemetry(to) => self.send_telemetry(to),
            ShardMsg::WalRead(req) => self.read_wal(req),
            ShardMsg::TransferLeader { to, reply_to } => {
                let outcome = self.transfer_leader(to).await;
                let _ = reply_to.try_send(outcome);
            }
            ShardMsg::Atomic(AtomicMsg::Release { batch_id }) => self.release_atomic(batch_id),
            ShardMsg::Peer(m) => self.on_peer(m).await,
            ShardMsg::Batch(b) => return Some(DrainItem::Batch(b)),
            ShardMsg::Atomic(AtomicMsg::Prepare {
                batch_id,
                commands,
                reply_to,
            }) => {
                return Some(DrainItem::Prepare {
                    batch_id,
                    commands,
                    reply_to,
                })
            }
            ShardMsg::Atomic(AtomicMsg::Commit {
                batch_id,
                participants,
                reply_to,
            }) => {
                return Some(DrainItem::Commit {
                    batch_id,
                    participants,
                    reply_to,
                })
            }
            ShardMsg::Atomic(AtomicMsg::Abort { batch_id, reply_to }) => {
                return Some(DrainItem::Abort { batch_id, reply_to })
            }
        }
        None
    }

    /// Figures for automatic compaction.
    fn send_stats(&self, to: flume::Sender<(usize, ShardStats)>) {
        let _ = to.try_send((
            self.cfg.id,
            ShardStats {
                records_since_snapshot: self.snaps.records_since,
                wal_bytes: self.writer.used_bytes(),
                wal_segments: self.writer.segments().len() as u64,
                snapshot_start: self.snaps.latest,
            },
        ));
    }

    /// Figures for the metrics endpoint.
    fn send_telemetry(&self, to: flume::Sender<(usize, Telemetry)>) {
        let _ = to.try_send((
            self.cfg.id,
            Telemetry {
                instances: self.engine.active_instances() as u64,
                machine_versions: self.engine.machine_versions() as u64,
                wal: self.wal_stats(),
            },
        ));
    }

    /// The WAL's figures, as WAL_STATS and the metrics endpoint show them.
    /// A cluster node's I/O includes its group's log: that is where its
    /// durable writes and syncs go (the WAL is written at apply, unsynced).
    pub(super) fn wal_stats(&self) -> ShardWalStats {
        let mut io = self.writer.io_stats();
        if let Some((writes, bytes, syncs)) = self.raft_log_io() {
            io.writes += writes;
            io.bytes_written += bytes;
            io.fsyncs += syncs;
        }
        ShardWalStats {
            entries: self.writer.records(),
            segments: self.writer.segments().len() as u64,
            used_bytes: self.writer.used_bytes(),
            io,
        }
    }

    /// Every part of an atomic batch is durable: its events go out, the
    /// hold on readers lifts, and the messages it held back may run.
    fn release_atomic(&mut self, batch_id: String) {
        let events = self.atomic.release(&batch_id);
        // Every participant's part is below the next offset.
        self.engine.note_committed(batch_id, self.seq.peek());
        // Events first, then lift the hold, then say so: the
        // hub must find them before the watermark passes them.
        if !events.is_empty() {
            self.cfg.events.send(HubMsg::Events(events));
        }
        self.seq.hold(self.cfg.id, self.atomic.hold_floor());
        self.cfg.events.send(HubMsg::Released);
        self.let_deferred_run();
    }

    /// Serves a WAL read off the loop — unless it starts below what a
    /// leader's snapshot replaced here (cluster mode), where this node's
    /// WAL has a hole: refused, never answered with a gap. (A read from 0,
    /// "from the start", gets what is retained, as after compaction.)
    fn read_wal(&self, req: WalReadRequest) {
        let from = req.range.from;
        if from > 0 && from < self.replaced_below {
            let error = ApiError::bad_request(format!(
                "records below offset {} on this node were replaced by a snapshot from the \
                     cluster's leader; read from {} on, or read older records on another node",
                self.replaced_below, self.replaced_below
            ));
            let _ = req.reply_to.try_send((self.cfg.id, Err(error)));
            return;
        }
        spawn_wal_read(
            self.cfg.id,
            self.cfg.wal.dir.clone(),
            self.writer.read_plan(from),
            self.writer.reader_io(),
            req,
        );
    }
}

/// Serves a WAL read on the blocking pool, so the shard loop keeps going.
/// The records below the watermark are already in the written part of the
/// segments listed now, which is never rewritten.
/// Its reads are counted into the writer's `io_stats` through `io`.
fn spawn_wal_read(
    shard: usize,
    dir: std::path::PathBuf,
    segments: Vec<SegmentInfo>,
    io: ReaderIo,
    req: WalReadRequest,
) {
    glommio::spawn_local(async move {
        let range = req.range;
        let result = glommio::executor()
            .spawn_blocking(move || rstmdb_wal::read(&dir, &segments, range))
            .await
            .inspect(|page| io.add(page))
            .map_err(ApiError::wal);
        let _ = req.reply_to.send_async((shard, result)).await;
    })
    .detach();
}
