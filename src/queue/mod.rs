//! Work that runs on the device: the device thread that owns the model, the validator that
//! checks a job's files before it is queued, and the job runner that claims queued jobs in
//! order and drives them on the device thread. [`JobQueue`] is the handle the HTTP side holds.

pub mod device;
mod device_worker;
pub mod runner;
mod self_instruct;
pub mod validator;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use uuid::Uuid;

/// Why a running job should stop at its next step boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The tenant cancelled it.
    Cancel,
    /// The server is shutting down: the job goes back to the queue.
    Shutdown,
    /// Another worker took the job over (this one's claim went stale).
    LostClaim,
}

/// Raised once; read by the training loop before every step.
#[derive(Debug, Default)]
pub struct StopFlag(AtomicU8);

impl StopFlag {
    pub fn raise(&self, why: StopReason) {
        let code = match why {
            StopReason::Cancel => 1,
            StopReason::Shutdown => 2,
            StopReason::LostClaim => 3,
        };
        let _ = self
            .0
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn reason(&self) -> Option<StopReason> {
        match self.0.load(Ordering::SeqCst) {
            1 => Some(StopReason::Cancel),
            2 => Some(StopReason::Shutdown),
            3 => Some(StopReason::LostClaim),
            _ => None,
        }
    }

    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst) != 0
    }
}

/// Wakes the background tasks and reaches the job this process is running.
#[derive(Clone, Default)]
pub struct JobQueue {
    /// A job was created (the validator checks its files).
    pub validate: Arc<Notify>,
    /// A job was queued (the runner claims it).
    pub run: Arc<Notify>,
    /// A job event was written (live event streams look).
    pub events: Arc<Notify>,
    running: Arc<Mutex<HashMap<Uuid, Arc<StopFlag>>>>,
}

impl JobQueue {
    /// Registers the job this process runs, so a cancel request reaches it at once.
    pub fn register(&self, job: Uuid, flag: Arc<StopFlag>) {
        if let Ok(mut m) = self.running.lock() {
            m.insert(job, flag);
        }
    }

    pub fn unregister(&self, job: Uuid) {
        if let Ok(mut m) = self.running.lock() {
            m.remove(&job);
        }
    }

    /// Stops `job` at its next step if this process runs it (other processes see the request
    /// in the database at their next heartbeat).
    pub fn stop_local(&self, job: Uuid, why: StopReason) {
        if let Some(flag) = self.running.lock().ok().and_then(|m| m.get(&job).cloned()) {
            flag.raise(why);
        }
    }

    /// Stops every job this process runs (shutdown).
    pub fn stop_all(&self, why: StopReason) {
        if let Ok(m) = self.running.lock() {
            for flag in m.values() {
                flag.raise(why);
            }
        }
    }

    /// The job this process is running, if any.
    pub fn running_job(&self) -> Option<Uuid> {
        self.running.lock().ok()?.keys().next().copied()
    }
}
