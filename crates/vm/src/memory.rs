//! Guest memory to and from files through QEMU's migration to `file:` URIs:
//! saving a VM (`vm save`), loading a saved or snapshotted state, and the memory
//! part of an external snapshot, taken at the same instant as its disks.
//!
//! # Memory snapshots of a running guest
//!
//! By default the memory is copied while the guest runs (precopy into a
//! `mapped-ram` file, each page at its place, so a page copied again overwrites
//! itself); QEMU stops the guest for the last dirty pages and waits before the
//! switchover (`pause-before-switchover`), the disks switch then, so memory and
//! disks are of one instant. The guest's pause is the last pass, the device
//! state and the switch.
//!
//! `--background` uses QEMU's `background-snapshot` capability instead
//! (`qapi/migration.json`: "the migration stream will be a snapshot of the VM
//! exactly at the point when the migration procedure starts. The VM RAM is
//! saved with running VM"; the stream is complete when the migration reports
//! `completed`). QEMU's snapshot thread stops the guest, saves the device state,
//! write-protects the guest's RAM (userfaultfd) and resumes it; from then on a
//! page the guest writes is saved before the write proceeds, so the file holds
//! RAM as it was at that instant while the guest runs on. The pause is a few
//! milliseconds; the save takes longer than a precopy, as QEMU 10 lifts the
//! write protection page by page (one system call per 4 KiB page).
//!
//! The disks must switch to their overlays at that same instant. QMP cannot act
//! inside QEMU's own short stop, so strata makes the instant itself: it stops
//! the guest, switches the disks, starts the migration and resumes the guest
//! once QEMU writes the first RAM page. Why that is sound:
//!
//! - while the guest is stopped nothing changes its RAM, devices or disks
//!   (QEMU drained the disks' requests when it stopped), so the state QEMU
//!   saves anywhere in strata's stop is the state the switched disks show;
//! - QEMU writes RAM pages only after it has saved the device state and
//!   armed the write protection (that order is what makes the snapshot
//!   consistent for a running guest), and strata resumes the guest only after
//!   `query-migrate` counts a written page;
//! - should a QEMU ever take its instant after strata resumed the guest, it
//!   would have to stop the running guest for it, and the `STOP` event it sends
//!   then is checked for: a snapshot with such a `STOP` after strata's
//!   `RESUME` is refused (and undone by the caller), never recorded.
//!
//! QEMU's snapshot thread resumes the guest to the state it found it in (here:
//! paused) from a bottom half it schedules before it writes the first page; the
//! `query-status` round trip after the first counted page lets QEMU's main loop
//! run it before strata's `cont`, so the two never cross. A background snapshot
//! is one sequential stream, not `mapped-ram`: QEMU 10 accepts the two together
//! but cannot load what they write. Hosts whose kernel or memory backend cannot
//! write-protect guest RAM refuse the capability, and `--background` fails
//! there with QEMU's reason, changing nothing.
//!
//! The memory file is written back to the disk while QEMU writes it and synced
//! (data and directory entry) before the caller records it, so a snapshot or
//! saved state the record names survives a host crash whole.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use strata_jobs::Cancel;
use strata_qmp::commands::{
    Cont, Migrate, MigrateSetCapabilities, MigrateSetParameters, MigrationCapability, QueryMigrate,
    Stop,
};
use strata_qmp::{Event, Qmp};

use crate::error::{Error, Result};
use crate::live::JOB_TIMEOUT;
use crate::qemu;
use crate::record::MemoryLayout;

/// How a migration to or from a memory file runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Save a whole state (the guest stops at the end).
    Plain,
    /// Load a file laid out as given.
    Load(MemoryLayout),
    /// A snapshot taken while the guest runs on (see the module doc).
    Background,
    /// A snapshot copied while the guest runs, stopped for the last pages;
    /// QEMU waits in `pre-switchover` for the disks to switch.
    Precopy,
}

impl Mode {
    /// The layout of the file the mode writes or reads.
    pub(crate) fn layout(self) -> MemoryLayout {
        match self {
            Mode::Background | Mode::Precopy => MemoryLayout::Stream,
            Mode::Load(layout) => layout,
            Mode::Plain => MemoryLayout::MappedRam,
        }
    }
}

/// The speed limit of a migration to a file: none. QEMU's default (128 MiB/s,
/// meant for a network shared with running guests) made the precopy of a
/// 1 GiB guest's ~120 MB of pages take a second, most of a full snapshot's
/// time; a local file takes what the host writes (libvirt lifts the limit
/// for its saves too). libvirt's largest value, in bytes per second.
const FILE_BANDWIDTH: u64 = i64::MAX as u64;

/// The environment variable that sets a speed limit (bytes per second) on
/// migrations to files instead of [`FILE_BANDWIDTH`], so a memory save lasts
/// long enough to be watched or cancelled (tests).
pub const BANDWIDTH_ENV: &str = "STRATA_VM_MEMORY_BANDWIDTH";

fn file_bandwidth() -> u64 {
    std::env::var(BANDWIDTH_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&b| b > 0)
        .unwrap_or(FILE_BANDWIDTH)
}

/// The capabilities strata uses, each turned on or off as `mode` needs: QEMU
/// keeps capabilities for the life of the process, so one left on by an earlier
/// operation must not change this one. `MIGRATION` events are always sent.
/// The speed limit is lifted ([`FILE_BANDWIDTH`]): every migration strata
/// starts writes a local file.
pub(crate) fn set_capabilities(qmp: &Qmp, mode: Mode) -> Result<()> {
    qmp.execute(&MigrateSetParameters {
        max_bandwidth: Some(file_bandwidth()),
    })?;
    let caps = [
        ("events", true),
        ("mapped-ram", mode.layout() == MemoryLayout::MappedRam),
        ("background-snapshot", mode == Mode::Background),
        ("pause-before-switchover", mode == Mode::Precopy),
    ];
    qmp.execute(&MigrateSetCapabilities {
        capabilities: caps
            .into_iter()
            .map(|(c, state)| MigrationCapability {
                capability: c.to_string(),
                state,
            })
            .collect(),
    })?;
    Ok(())
}

/// Poll `query-migrate` until the migration reaches status `target`; an error
/// when it failed.
pub(crate) fn wait_migration(qmp: &Qmp, what: &str, target: &str) -> Result<()> {
    wait_migration_polling(qmp, what, target, || Ok(()))
}

/// [`wait_migration`], running `poll` between two questions; an error of
/// `poll` ends the wait with it.
fn wait_migration_polling(
    qmp: &Qmp,
    what: &str,
    target: &str,
    mut poll: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + JOB_TIMEOUT;
    loop {
        poll()?;
        let info = qmp.execute(&QueryMigrate {})?;
        match info.status.as_deref() {
            Some(st) if st == target => return Ok(()),
            Some("failed") | Some("cancelled") => {
                return Err(Error::Qemu(format!(
                    "{what} failed: {}",
                    info.error_desc.unwrap_or_else(|| "no reason given".into())
                )))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(Error::Qemu(format!(
                "{what} did not finish in {JOB_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Start writing the file's dirty pages to the disk, without waiting for them.
fn start_writeback(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range(2) on a descriptor this function borrows; it
    // touches no memory of this process. A failure only leaves more to sync.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Make the memory file `file` and its directory entry durable.
pub(crate) fn sync_file(file: &Path) -> Result<()> {
    let sync = |p: &Path| -> std::io::Result<()> { std::fs::File::open(p)?.sync_all() };
    sync(file).map_err(|e| Error::io(format!("sync {}", file.display()), e))?;
    if let Some(dir) = file.parent() {
        sync(dir).map_err(|e| Error::io(format!("sync {}", dir.display()), e))?;
    }
    Ok(())
}

/// A memory snapshot taken: the guest's pause (ms, from QEMU's event times)
/// and the layout of the file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Taken {
    pub pause_ms: Option<u64>,
    pub layout: MemoryLayout,
    /// False when a cancel stopped a background save after the disks had
    /// switched: the file is incomplete and the caller removes it.
    pub memory: bool,
}

/// Save the memory of the guest into `file` as an external snapshot whose
/// disks `switch` changes over at the same instant, and sync the file:
/// copied while the guest runs (precopy), or with `background` saved as it was
/// while the guest runs on after a pause of only the switch. The guest ends in
/// the state it had (`was_running`). On an error after `switch` succeeded, the
/// caller undoes the switch; the guest runs (if it ran) in every case.
/// `cancel` stops a precopy while QEMU copies (`migrate_cancel`); `switch`
/// itself decides whether a cancel still counts when the disks are to switch.
/// A background save goes on after the switch, and a cancel then stops only
/// the save (`migrate_cancel`): the result says the memory was not kept
/// ([`Taken::memory`]) and `cancel` stays cancelled.
pub(crate) fn snapshot(
    qmp: &Qmp,
    file: &Path,
    was_running: bool,
    background: bool,
    cancel: &Cancel,
    switch: impl FnOnce() -> Result<()>,
) -> Result<Taken> {
    let mode = if background {
        set_capabilities(qmp, Mode::Background).map_err(|e| {
            Error::State(format!(
                "QEMU cannot take a background memory snapshot here (its host must write-protect the guest's memory): {e}"
            ))
        })?;
        Mode::Background
    } else {
        Mode::Precopy
    };
    let pause_ms = match mode {
        Mode::Background => match self::background(qmp, file, was_running, cancel, switch)? {
            Saved::Whole(pause) => pause,
            Saved::Cancelled => {
                return Ok(Taken {
                    pause_ms: None,
                    layout: mode.layout(),
                    memory: false,
                })
            }
        },
        _ => precopy(qmp, file, was_running, cancel, switch)?,
    };
    sync_file(file)?;
    Ok(Taken {
        pause_ms,
        layout: mode.layout(),
        memory: true,
    })
}

/// How a background save ended.
enum Saved {
    /// Complete, with the guest's pause (ms).
    Whole(Option<u64>),
    /// Stopped by a cancel after the disks switched; the file is incomplete.
    Cancelled,
}

/// The `background-snapshot` protocol of the module doc. Once the disks have
/// switched, `cancel` is reopened: a cancel while QEMU
/// saves stops the save (`migrate_cancel`), and one that comes after QEMU
/// finished but before the snapshot is kept still drops the memory, so an
/// accepted cancel always means a snapshot without memory.
fn background(
    qmp: &Qmp,
    file: &Path,
    was_running: bool,
    cancel: &Cancel,
    switch: impl FnOnce() -> Result<()>,
) -> Result<Saved> {
    qmp.take_events();
    if was_running {
        qmp.execute(&Stop {})?;
    }
    let mut started = false;
    let armed = (|| -> Result<()> {
        switch()?;
        // From the switch on, a cancel stops only the memory save; one that
        // comes while the save is armed is taken once the guest runs again.
        cancel.reopen();
        qmp.execute(&Migrate {
            uri: format!("file:{}", file.display()),
        })?;
        started = true;
        wait_first_page(qmp)?;
        // Lets QEMU run the resume it scheduled before the first page.
        qemu::run_state(qmp)?;
        Ok(())
    })();
    if armed.is_err() && started {
        let _ = qmp.execute_value("migrate_cancel", None);
        let _ = wait_migration(qmp, "cancelling the memory snapshot", "cancelled");
    }
    if was_running {
        resume(qmp, armed.is_ok())?;
    }
    armed?;
    // Pages go to the disk as QEMU writes them, so little is left for the
    // final sync.
    let written = std::fs::File::open(file).ok();
    let done = wait_migration_polling(qmp, "saving the memory", "completed", || {
        if let Some(f) = &written {
            start_writeback(f);
        }
        Ok(cancel.check()?)
    });
    if done.is_err() {
        let _ = qmp.execute_value("migrate_cancel", None);
        if cancel.is_cancelled() {
            // QEMU closes the file and lifts its write protection before it
            // reports the end (cancelled, or completed had it just finished).
            wait_migration_end(qmp)?;
        }
    }
    if cancel.point_of_no_return().is_err() {
        let _ = pause_from_events(qmp);
        if was_running && qemu::run_state(qmp)? != "running" {
            qmp.execute(&Cont {})?;
        }
        return Ok(Saved::Cancelled);
    }
    done?;
    let (pause, stopped_after) = pause_from_events(qmp);
    if stopped_after {
        return Err(Error::Qemu(
            "QEMU stopped the guest for its memory snapshot after strata resumed it: the memory is not of the instant the disks switched, so the snapshot is not kept".into(),
        ));
    }
    Ok(Saved::Whole(pause))
}

/// Wait (up to [`JOB_TIMEOUT`]) until the migration has ended, however; its
/// last status (`completed`, `cancelled` or `failed`).
fn wait_migration_end(qmp: &Qmp) -> Result<String> {
    let deadline = Instant::now() + JOB_TIMEOUT;
    loop {
        let info = qmp.execute(&QueryMigrate {})?;
        if let Some(st @ ("completed" | "cancelled" | "failed")) = info.status.as_deref() {
            return Ok(st.to_string());
        }
        if Instant::now() >= deadline {
            return Err(Error::Qemu(format!(
                "the memory save did not end in {JOB_TIMEOUT:?} after migrate_cancel"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// End a memory save a command left behind when it died (recovery): QEMU's
/// migration is stopped (`migrate_cancel`) and awaited, and a guest it left
/// stopped (`finish-migrate`, waiting before its switchover, or
/// `postmigrate`, its disks inactive) is resumed, which makes its disks
/// active again. A guest paused by its user stays paused.
pub(crate) fn end_interrupted_save(qmp: &Qmp) -> Result<()> {
    let info = qmp.execute(&QueryMigrate {})?;
    let ended = matches!(
        info.status.as_deref(),
        None | Some("none" | "completed" | "cancelled" | "failed")
    );
    if !ended {
        let _ = qmp.execute_value("migrate_cancel", None);
        wait_migration_end(qmp)?;
    }
    if matches!(
        qemu::run_state(qmp)?.as_str(),
        "finish-migrate" | "postmigrate"
    ) {
        qmp.execute(&Cont {})?;
    }
    Ok(())
}

/// Resume the guest strata stopped; a QEMU gone meanwhile is reported only
/// when nothing else failed.
fn resume(qmp: &Qmp, report: bool) -> Result<()> {
    match qmp.execute(&Cont {}) {
        Err(e) if report || !e.is_qemu_exited() => Err(e.into()),
        _ => Ok(()),
    }
}

/// Wait until the migration has written a RAM page (normal or zero).
fn wait_first_page(qmp: &Qmp) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = qmp.execute(&QueryMigrate {})?;
        let pages = info.ram.as_ref().map_or(0, |r| r.normal + r.duplicate);
        match info.status.as_deref() {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                return Err(Error::Qemu(format!(
                    "saving the memory failed: {}",
                    info.error_desc.unwrap_or_else(|| "no reason given".into())
                )))
            }
            Some("active") if pages > 0 => return Ok(()),
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(Error::Qemu(
                "QEMU wrote no memory page within 60 s of starting the snapshot".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// From the events buffered since an operation began (they are taken): the
/// guest's pause between the first `STOP` and the next `RESUME` in ms, and
/// whether a `STOP` came after that `RESUME`.
pub(crate) fn pause_from_events(qmp: &Qmp) -> (Option<u64>, bool) {
    let events = qmp.take_events();
    let micros = |e: &Event| e.timestamp.map(|t| t.seconds * 1_000_000 + t.microseconds);
    let Some(stop) = events.iter().position(|e| e.name == "STOP") else {
        return (None, false);
    };
    let Some(resume) = events[stop..]
        .iter()
        .position(|e| e.name == "RESUME")
        .map(|i| i + stop)
    else {
        return (None, false);
    };
    let later_stop = events[resume..].iter().any(|e| e.name == "STOP");
    let pause = match (micros(&events[stop]), micros(&events[resume])) {
        (Some(a), Some(b)) if b >= a => Some(((b - a) / 1000) as u64),
        _ => None,
    };
    (pause, later_stop)
}

/// The precopy fallback: the memory is copied while the guest runs; QEMU stops
/// it for the last dirty pages and waits before switching over, the disks
/// switch then, so memory and disks are of one instant.
fn precopy(
    qmp: &Qmp,
    file: &Path,
    was_running: bool,
    cancel: &Cancel,
    switch: impl FnOnce() -> Result<()>,
) -> Result<Option<u64>> {
    set_capabilities(qmp, Mode::Precopy)?;
    qmp.take_events();
    qmp.execute(&Migrate {
        uri: format!("file:{}", file.display()),
    })?;
    let mut ended = None;
    let written = std::fs::File::open(file).ok();
    let writeback = || {
        if let Some(f) = &written {
            start_writeback(f);
        }
        Ok(cancel.check()?)
    };
    let saved = (|| -> Result<()> {
        wait_migration_polling(qmp, "saving the memory", "pre-switchover", writeback)?;
        switch()?;
        qmp.execute_value("migrate-continue", Some(json!({"state": "pre-switchover"})))?;
        crate::snapshot::fail_point("memory-continued")?;
        wait_migration(qmp, "saving the memory", "completed")
    })();
    if saved.is_err() {
        // Also after the switch: a migration left to go on would finish later
        // and make the disks inactive under a guest already resumed, and the
        // caller's merge back onto them would be refused. It is stopped, or
        // its end awaited, before the guest resumes (`cont` makes inactive
        // disks active again).
        let _ = qmp.execute_value("migrate_cancel", None);
        ended = wait_migration_end(qmp).ok();
    }
    let completed = saved.is_ok() || ended.as_deref() == Some("completed");
    if was_running && stopped_after_migration(qmp, completed)? {
        qmp.execute(&Cont {})?;
    }
    let (pause, _) = pause_from_events(qmp);
    saved?;
    Ok(pause)
}

/// Whether a guest that ran is stopped after a memory save ended. QEMU reports
/// the migration completed a moment before it leaves the `running` (or
/// `finish-migrate`) state for `postmigrate` (and deactivates the disks), so
/// after a completed save this waits (up to 10 s) for that change; a guest
/// resumed before it would be stopped later with its disks inactive.
fn stopped_after_migration(qmp: &Qmp, completed: bool) -> Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = qemu::run_state(qmp)?;
        let settled = state != "running" && !(completed && state == "finish-migrate");
        if settled {
            return Ok(true);
        }
        if !completed || Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
