//! The shard loop itself: take a message, gather the drain it starts,
//! execute and group-commit that drain; stop once every sender is gone.

use std::time::{Duration, Instant};

use futures_lite::future;
use rstmdb_wal::WalError;

use super::snapshots::{BUSY_SNAPSHOT_STEP, IDLE_SNAPSHOT_STEP};
use super::{FsyncPolicy, ShardLoop, ShardMsg, SnapshotOutcome};
use crate::snapshot::Step;

/// What an idle turn with a snapshot running came to.
enum Idle {
    /// A message arrived, or (`None`) every sender is gone.
    Woke(Option<ShardMsg>),
    /// Nothing yet: look again.
    Again,
}

impl ShardLoop {
    /// Runs the loop until every sender is gone, then syncs the WAL.
    pub(super) async fn serve(mut self) -> Result<(), WalError> {
        while let Some(first) = self.next_message().await {
            let drain = self.gather_drain(first).await;
            if drain.is_empty() {
                continue;
            }
            self.run_drain(drain).await;
            // Under load the loop never idles: a running snapshot advances a
            // slice per drain, which bounds the pause it adds to any request.
            if self.snaps.job.is_some() {
                self.snaps
                    .step(&self.cfg, &mut self.engine, BUSY_SNAPSHOT_STEP);
            }
        }
        self.shut_down().await
    }

    /// The message that starts the next drain; `None` once every sender is
    /// gone. Messages a released atomic batch let through come first. While
    /// a snapshot runs, an idle shard gives it the time instead of waiting.
    async fn next_message(&mut self) -> Option<ShardMsg> {
        loop {
            if let Some(m) = self.ready.pop_front() {
                return Some(m);
            }
            if self.snaps.job.is_none() {
                return self.wait_for_message().await;
            }
            match self.rx.try_recv() {
                Ok(m) => return Some(m),
                Err(flume::TryRecvError::Disconnected) => return None,
                Err(flume::TryRecvError::Empty) => {
                    if let Idle::Woke(m) = self.idle_snapshot_turn().await {
                        return m;
                    }
                }
            }
        }
    }

    /// One idle turn with a snapshot running: the `every_ms` timer, then a
    /// slice of the snapshot. Only a snapshot blocked on its writer waits
    /// for a message (at most 1 ms); otherwise the executor gets a turn.
    async fn idle_snapshot_turn(&mut self) -> Idle {
        // The every_ms timer lives in `wait_for_message`, which an idle
        // shard with a snapshot running does not reach.
        if let (FsyncPolicy::EveryMs(ms), Some(since)) = (self.cfg.fsync, self.dirty_since) {
            if since.elapsed() >= Duration::from_millis(ms) {
                self.timed_sync().await;
            }
        }
        // Idle: give the snapshot the time, but wake for work.
        if matches!(
            self.snaps
                .step(&self.cfg, &mut self.engine, IDLE_SNAPSHOT_STEP),
            Step::Blocked
        ) {
            let rx = &self.rx;
            let woke = future::or(async { Some(rx.recv_async().await.ok()) }, async {
                glommio::timer::sleep(Duration::from_millis(1)).await;
                None
            })
            .await;
            match woke {
                Some(m) => Idle::Woke(m),
                None => Idle::Again,
            }
        } else {
            // Let the executor's other tasks and I/O run.
            future::yield_now().await;
            Idle::Again
        }
    }

    /// Waits for the next message, running the `every_ms` timer meanwhile.
    /// `None` when every sender is gone.
    async fn wait_for_message(&mut self) -> Option<ShardMsg> {
        loop {
            let sync_at = match (self.cfg.fsync, self.dirty_since) {
                (FsyncPolicy::EveryMs(ms), Some(since)) => Some(since + Duration::from_millis(ms)),
                _ => None,
            };
            // In cluster mode the group's clock ticks too.
            let deadline = match (sync_at, self.next_tick()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let Some(deadline) = deadline else {
                return self.rx.recv_async().await.ok();
            };
            enum Woke {
                Msg(Option<ShardMsg>),
                Timer,
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            let rx = &self.rx;
            let woke = future::or(async { Woke::Msg(rx.recv_async().await.ok()) }, async {
                glommio::timer::sleep(wait).await;
                Woke::Timer
            })
            .await;
            match woke {
                Woke::Msg(m) => return m,
                Woke::Timer => {
                    if sync_at.is_some_and(|t| Instant::now() >= t) {
                        self.timed_sync().await;
                    }
                    if self.cluster.is_some() {
                        self.tick_if_due().await;
                    }
                }
            }
        }
    }

    /// The `every_ms` sync: the oldest unsynced write is due. A failure is
    /// logged, not fatal.
    async fn timed_sync(&mut self) {
        if let Err(e) = self.writer.sync().await {
            tracing::error!(shard = self.cfg.id, error = %e, "timed fdatasync failed");
        }
        if let Err(e) = self.sync_raft_log() {
            tracing::error!(shard = self.cfg.id, error = %e, "timed raft log sync failed");
        }
        self.dirty_since = None;
    }

    /// Abandons a running snapshot (its requester is told why), warns of
    /// atomic batches left for recovery to decide, and syncs the WAL.
    async fn shut_down(mut self) -> Result<(), WalError> {
        if let Some((mut job, reply_to)) = self.snaps.job.take() {
            job.abandon(&mut self.engine);
            let _ = reply_to.try_send((
                self.cfg.id,
                SnapshotOutcome::Failed("the server is stopping".into()),
            ));
        }
        if !self.atomic.pending().is_empty() {
            tracing::warn!(shard = self.cfg.id, batches = ?self.atomic.pending(), "stopping with unresolved atomic batches; recovery decides them");
        }
        if let Err(e) = self.sync_raft_log() {
            tracing::error!(shard = self.cfg.id, error = %e, "syncing the raft log at shutdown failed");
        }
        self.writer.close().await?;
        tracing::info!(shard = self.cfg.id, "shard stopped; WAL synced");
        Ok(())
    }
}
