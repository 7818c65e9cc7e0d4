//! Tasks: long operations run in the background with an ID, a state, a
//! progress fraction, a log and a cancel flag (Proxmox Backup Server's task
//! list is the model). Each task is one JSON file in `tasks/` of the state
//! directory, replaced atomically on every change; a task still `running`
//! when the store is opened was cut short by a dead server and is marked
//! `interrupted`, so the list after a restart tells the truth. A server that
//! is stopped (SIGTERM, SIGINT) first cancels the tasks it runs, each through
//! its operation's own cancel, and waits for them a bounded time
//! ([`Tasks::stop_all`]), so they end `cancelled` (or complete, when past their
//! point of no return) instead of being cut.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use strata_jobs::{Cancel, CancelAnswer};

use crate::error::{Error, Result};

/// The environment variable setting how long (seconds) a stopping server
/// waits for its cancelled tasks to end ([`stop_grace`]).
pub const STOP_GRACE_ENV: &str = "STRATA_SERVE_TASK_GRACE";

/// How long a stopping server waits for its cancelled tasks: 60 s, or
/// `STRATA_SERVE_TASK_GRACE` seconds. A cancel is taken at the operation's
/// next check (a memory save stops within a poll, a backup at its next
/// chunk); a task past its point of no return needs the time to complete.
pub fn stop_grace() -> Duration {
    std::env::var(STOP_GRACE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60))
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Running,
    Ok,
    Error,
    Cancelled,
    /// The server stopped while the task ran.
    Interrupted,
}

/// A task as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Task {
    pub id: String,
    /// What the task does (`image-verify`, ...).
    pub kind: String,
    /// What it works on (an image ID, ...).
    pub target: String,
    pub state: TaskState,
    /// Done so far, 0.0 to 1.0.
    pub progress: f64,
    pub log: Vec<String>,
    pub started_at: String,
    pub ended_at: Option<String>,
    /// What the operation produced (a snapshot, a backup's counts, a
    /// verify's report), when it has a result of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
}

/// The task store of a state directory, with the cancel flags of the tasks
/// this process runs.
#[derive(Clone)]
pub struct Tasks {
    dir: PathBuf,
    cancel: Arc<Mutex<HashMap<String, Arc<Cancel>>>>,
    /// Set once the server stops: a task cancelled then says why.
    stopping: Arc<AtomicBool>,
}

/// The handle a running operation reports through.
pub struct TaskHandle {
    tasks: Tasks,
    task: Task,
    cancel: Arc<Cancel>,
}

impl Tasks {
    /// Open the store, marking tasks left `running` as `interrupted`.
    pub fn open(state_dir: &Path) -> Result<Tasks> {
        let dir = state_dir.join("tasks");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::State(format!("create {}: {e}", dir.display())))?;
        let tasks = Tasks {
            dir,
            cancel: Arc::default(),
            stopping: Arc::default(),
        };
        for mut t in tasks.list()? {
            if t.state == TaskState::Running {
                t.state = TaskState::Interrupted;
                t.log.push("the server stopped while this task ran".into());
                t.ended_at = Some(strata_registry::record::now_precise());
                tasks.store(&t)?;
            }
        }
        Ok(tasks)
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn store(&self, t: &Task) -> Result<()> {
        let data = serde_json::to_vec_pretty(t).map_err(|e| Error::State(e.to_string()))?;
        strata_vm::state::write_atomic(&self.path(&t.id), &data)
            .map_err(|e| Error::State(e.to_string()))
    }

    /// All tasks, newest first.
    pub fn list(&self) -> Result<Vec<Task>> {
        let rd = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::State(format!("read {}: {e}", self.dir.display())))?;
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                if let Some(t) = self.get(id)? {
                    out.push(t);
                }
            }
        }
        out.sort_by(|a, b| (&b.started_at, &b.id).cmp(&(&a.started_at, &a.id)));
        Ok(out)
    }

    /// One task; `None` for an unknown (or malformed) ID.
    pub fn get(&self, id: &str) -> Result<Option<Task>> {
        if !strata_registry::record::is_valid_id(id) {
            return Ok(None);
        }
        match std::fs::read(self.path(id)) {
            Ok(d) => serde_json::from_slice(&d)
                .map(Some)
                .map_err(|e| Error::State(format!("task {id}: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::State(format!("read task {id}: {e}"))),
        }
    }

    /// Record a new running task and return its handle.
    pub fn start(&self, kind: &str, target: &str) -> Result<TaskHandle> {
        let id = strata_registry::record::new_id().map_err(|e| Error::State(e.to_string()))?;
        let task = Task {
            id: id.clone(),
            kind: kind.into(),
            target: target.into(),
            state: TaskState::Running,
            progress: 0.0,
            log: vec![format!("{kind} {target}: started")],
            started_at: strata_registry::record::now_precise(),
            ended_at: None,
            result: None,
        };
        self.store(&task)?;
        let cancel = Arc::new(Cancel::new());
        self.cancel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, cancel.clone());
        Ok(TaskHandle {
            tasks: self.clone(),
            task,
            cancel,
        })
    }

    /// Ask a running task to stop: `None` if it is not running here, else
    /// whether its operation takes the cancel or is past its point of no
    /// return (it then completes).
    pub fn cancel(&self, id: &str) -> Option<CancelAnswer> {
        self.cancel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|c| c.request())
    }

    /// The server stops: ask every task this process runs to stop (the same
    /// request as a task's cancel) and wait until each has ended, at most
    /// `grace`. A task past its point of no return completes meanwhile.
    /// Returns the IDs of the tasks still running when the wait ended; their
    /// records say `running` until the store is opened again, which marks
    /// them `interrupted`.
    pub fn stop_all(&self, grace: Duration) -> Vec<String> {
        self.stopping.store(true, Ordering::SeqCst);
        for c in self.running_flags().values() {
            c.request();
        }
        let deadline = Instant::now() + grace;
        loop {
            let left = self.running_flags();
            if left.is_empty() || Instant::now() >= deadline {
                let mut ids: Vec<String> = left.into_keys().collect();
                ids.sort();
                return ids;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn running_flags(&self) -> HashMap<String, Arc<Cancel>> {
        self.cancel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl TaskHandle {
    pub fn id(&self) -> &str {
        &self.task.id
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The task's cancel flag, for an operation that takes one (so that it
    /// can declare its point of no return).
    pub fn cancel_flag(&self) -> Arc<Cancel> {
        self.cancel.clone()
    }

    /// Record progress (stored when it moved by a percent or more).
    pub fn progress(&mut self, fraction: f64) {
        let f = fraction.clamp(0.0, 1.0);
        if f - self.task.progress >= 0.01 {
            self.task.progress = f;
            let _ = self.tasks.store(&self.task);
        }
    }

    /// Record the operation's result (shown with the task however it ends).
    pub fn set_result(&mut self, result: serde_json::Value) {
        self.task.result = Some(result);
        let _ = self.tasks.store(&self.task);
    }

    pub fn log(&mut self, line: impl Into<String>) {
        self.task.log.push(line.into());
        let _ = self.tasks.store(&self.task);
    }

    /// End the task: `Ok` completes it, an error fails it (or marks it
    /// cancelled when a cancel was asked for).
    pub fn finish(mut self, result: std::result::Result<String, String>) -> Task {
        match result {
            Ok(msg) => {
                self.task.state = TaskState::Ok;
                self.task.progress = 1.0;
                self.task.log.push(msg);
            }
            Err(msg) if self.is_cancelled() => {
                self.task.state = TaskState::Cancelled;
                if self.tasks.stopping.load(Ordering::SeqCst) {
                    self.task
                        .log
                        .push("the server is stopping: the task was cancelled".into());
                }
                let msg = msg.strip_prefix("cancelled: ").unwrap_or(&msg);
                self.task.log.push(format!("cancelled: {msg}"));
            }
            Err(msg) => {
                self.task.state = TaskState::Error;
                self.task.log.push(format!("error: {msg}"));
            }
        }
        self.task.ended_at = Some(strata_registry::record::now_precise());
        let _ = self.tasks.store(&self.task);
        self.tasks
            .cancel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.task.id);
        self.task.clone()
    }
}

/// Verify an image's stored data against its sha512, as a task: reads it in
/// chunks, reporting progress, stopping when cancelled.
pub fn verify_image(
    reg: &strata_registry::Registry,
    id: &str,
    task: &mut TaskHandle,
) -> std::result::Result<String, String> {
    use std::io::Read;
    let (rec, mut reader) = reg.download(id, None).map_err(|e| e.to_string())?;
    let total = reader.len().max(1);
    let mut done = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if task.is_cancelled() {
            return Err(format!("stopped after {done} bytes"));
        }
        let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        done += n as u64;
        task.progress(done as f64 / total as f64);
    }
    Ok(format!(
        "image {id}: {done} bytes match sha512 {}",
        rec.os_hash_value.unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_after_the_point_of_no_return_is_refused_and_the_task_completes() {
        let dir = tempfile::tempdir().unwrap();
        let tasks = Tasks::open(dir.path()).unwrap();
        let h = tasks.start("vm-snapshot-create", "g/s").unwrap();
        let id = h.id().to_string();
        h.cancel_flag().point_of_no_return().unwrap();
        assert_eq!(tasks.cancel(&id), Some(CancelAnswer::TooLate));
        let t = h.finish(Ok("snapshot 's' of VM 'g' created".into()));
        assert_eq!(t.state, TaskState::Ok);
    }

    #[test]
    fn stopping_the_server_cancels_its_tasks_and_one_that_outlives_the_wait_shows_interrupted_after_a_restart(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let tasks = Tasks::open(dir.path()).unwrap();
        let polite = tasks.start("image-verify", "a").unwrap();
        let polite_id = polite.id().to_string();
        let worker = std::thread::spawn(move || {
            while !polite.is_cancelled() {
                std::thread::sleep(Duration::from_millis(5));
            }
            polite.finish(Err("stopped after 7 bytes".into()))
        });
        let stuck = tasks.start("image-verify", "b").unwrap();
        let stuck_id = stuck.id().to_string();
        stuck.cancel_flag().point_of_no_return().unwrap();

        let left = tasks.stop_all(Duration::from_millis(300));
        assert_eq!(left, vec![stuck_id.clone()]);
        let t = worker.join().unwrap();
        assert_eq!(t.state, TaskState::Cancelled);
        assert_eq!(
            t.log[t.log.len() - 2..],
            [
                "the server is stopping: the task was cancelled".to_string(),
                "cancelled: stopped after 7 bytes".to_string()
            ]
        );
        assert_eq!(tasks.get(&polite_id).unwrap().unwrap(), t);

        // The process ends with the stuck task's record still running.
        drop(stuck);
        let reopened = Tasks::open(dir.path()).unwrap();
        let t = reopened.get(&stuck_id).unwrap().unwrap();
        assert_eq!(t.state, TaskState::Interrupted, "{t:?}");
        assert!(t.ended_at.is_some());
    }

    #[test]
    fn a_cancelled_task_ends_cancelled_and_only_running_tasks_can_be_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let tasks = Tasks::open(dir.path()).unwrap();
        let mut h = tasks.start("image-verify", "x").unwrap();
        let id = h.id().to_string();
        h.progress(0.5);
        assert_eq!(tasks.get(&id).unwrap().unwrap().progress, 0.5);
        assert_eq!(tasks.cancel(&id), Some(CancelAnswer::Accepted));
        assert!(h.is_cancelled());
        let t = h.finish(Err("stopped after 5 bytes".into()));
        assert_eq!(t.state, TaskState::Cancelled);
        assert_eq!(tasks.get(&id).unwrap().unwrap(), t);
        assert_eq!(tasks.cancel(&id), None, "a finished task took a cancel");
        let reopened = Tasks::open(dir.path()).unwrap();
        assert_eq!(
            reopened.get(&id).unwrap().unwrap().state,
            TaskState::Cancelled
        );
    }
}
