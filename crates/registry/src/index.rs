//! The in-memory index of the image records, so a list does not read and
//! parse every record file.
//!
//! Contract: the record files stay the truth, whoever writes them (this
//! process, another one, or one before a restart). Each entry remembers the
//! file it was read from (inode, size, modification time); a record is
//! replaced by renaming a new file over it, so a changed record is a changed
//! stamp. [`Index::rows`] first looks at the directory's own stamp: unchanged
//! since the last pass, and older than [`SETTLED`] when that pass began, means
//! no record changed; otherwise the directory is read again, stamps compared,
//! and only new or changed records are parsed. A directory changed within
//! `SETTLED` of a pass is never trusted to be unchanged (its time stamp is
//! coarse), so a change just after a pass is never missed.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::record::ImageRecord;

/// How long after its last change a directory's time stamp is trusted to
/// tell that nothing changed since.
pub const SETTLED: Duration = Duration::from_secs(1);

/// One indexed image: its record and the record as JSON (what lists filter
/// and sort on), both built once per version of the file.
#[derive(Debug)]
pub struct Row {
    pub rec: ImageRecord,
    pub json: Map<String, Value>,
}

impl Row {
    pub fn new(rec: ImageRecord) -> Row {
        Row {
            json: rec.to_json(),
            rec,
        }
    }
}

/// What identifies one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }
}

#[derive(Default)]
struct State {
    rows: HashMap<String, (Stamp, Arc<Row>)>,
    /// The directory's stamp when the last pass began, if it was settled then.
    settled: Option<Stamp>,
}

/// The index of one registry directory (shared by the registry's clones).
#[derive(Default)]
pub struct Index {
    state: Mutex<State>,
}

impl Index {
    /// Every record in `dir`, brought up to date with the files first.
    /// `load` reads one record by ID (`Ok(None)` if it vanished meanwhile).
    pub fn rows(
        &self,
        dir: &Path,
        load: impl Fn(&str) -> Result<Option<ImageRecord>>,
    ) -> Result<Vec<Arc<Row>>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let dir_meta =
            std::fs::metadata(dir).map_err(|e| Error::io(format!("stat {}", dir.display()), e))?;
        let dir_stamp = Stamp::of(&dir_meta);
        if st.settled != Some(dir_stamp) {
            let settled = dir_meta
                .modified()
                .ok()
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .is_some_and(|age| age > SETTLED);
            refresh(&mut st, dir, &load)?;
            st.settled = settled.then_some(dir_stamp);
        }
        Ok(st.rows.values().map(|(_, r)| r.clone()).collect())
    }
}

/// Read the directory: drop entries whose file is gone, (re)load those whose
/// file is new or changed.
fn refresh(
    st: &mut State,
    dir: &Path,
    load: &impl Fn(&str) -> Result<Option<ImageRecord>>,
) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
    let mut rows = HashMap::with_capacity(st.rows.len());
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if id.starts_with('.') {
            continue;
        }
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("stat {}", entry.path().display()), e)),
        };
        let stamp = Stamp::of(&meta);
        let row = match st.rows.remove(id) {
            Some((old, row)) if old == stamp => row,
            _ => match load(id)? {
                Some(rec) => Arc::new(Row::new(rec)),
                None => continue,
            },
        };
        rows.insert(id.to_string(), (stamp, row));
    }
    st.rows = rows;
    Ok(())
}
