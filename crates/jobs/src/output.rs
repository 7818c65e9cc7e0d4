//! Outputs that are inputs: a job never creates, truncates or writes a file that it
//! reads, or that its output will have below it as a backing file.
//!
//! Files are compared by identity (device and inode), never by name, so symlinks,
//! hard links and spellings such as `./x` and `x` are all caught. Every output goes
//! through [`create_output`] (a new or truncated file) or [`check_output`] (an
//! existing image written in place) before any byte of it changes, and gets QEMU's
//! write locks, so an image a running QEMU (or qemu-nbd, or another strata) holds is
//! refused too.
//!
//! The refusals are worded as qemu-img words them when its own locks catch the same
//! case: a file the job reads is one it holds with read locks that keep writers out
//! ("Failed to get "write" lock"); a file under the output is one the output's
//! backing chain would lock against the output itself ("Could not open backing file:
//! ... Failed to get shared "write" lock").

use crate::{Error, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use strata_format::Format;
use strata_storage::{FileStorage, OutputFile, Storage};

/// A file's identity: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    /// The identity of the file `path` names (symlinks followed), if it exists.
    pub fn of(path: &Path) -> Option<FileId> {
        std::fs::metadata(path).ok().map(|m| FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// How a job uses one of its input files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read by the job (a file of a source's chain).
    Read,
    /// Below the output in its backing chain, at this depth (1: the output's own
    /// backing file).
    Backing(usize),
}

/// The files a job reads or puts below its output, by identity.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    files: Vec<(FileId, Role)>,
}

impl Inputs {
    /// Every file of the chain of the image at `path` (its format probed when
    /// `None`), as files the job reads.
    pub fn add_read_chain(&mut self, path: &Path, format: Option<Format>) {
        for id in chain_files(path, format) {
            self.files.push((id, Role::Read));
        }
    }

    /// Every file of the chain of `backing` (a backing file name as the output will
    /// record it, relative to the output's directory), as files below `output`.
    pub fn add_backing_chain(&mut self, output: &Path, backing: &str, format: Option<Format>) {
        let path = strata_chain::resolve_backing(output, backing);
        for (depth, id) in chain_files(&path, format).into_iter().enumerate() {
            self.files.push((id, Role::Backing(depth + 1)));
        }
    }

    /// Add every file of `other`.
    pub fn extend(&mut self, other: &Inputs) {
        self.files.extend_from_slice(&other.files);
    }

    /// How the file `id` is an input, if it is one. A file the job reads counts as
    /// read even if it is also below the output (QEMU's locks catch that first).
    pub fn role_of(&self, id: FileId) -> Option<Role> {
        let mut roles = self.files.iter().filter(|(f, _)| *f == id).map(|(_, r)| *r);
        let first = roles.next()?;
        Some(roles.fold(first, |a, b| match (a, b) {
            (Role::Read, _) | (_, Role::Read) => Role::Read,
            (Role::Backing(x), Role::Backing(y)) => Role::Backing(x.min(y)),
        }))
    }

    /// Refuse the output `path`, whose identity is `id`, if it is an input.
    pub fn check(&self, path: &Path, id: FileId) -> Result<()> {
        match self.role_of(id) {
            None => Ok(()),
            Some(Role::Read) => Err(Error::Storage(strata_storage::Error::Locked {
                kind: "",
                perm: "write",
                path: path.to_path_buf(),
            })),
            Some(Role::Backing(depth)) => Err(Error::OutputBelowItself {
                path: path.to_path_buf(),
                depth,
            }),
        }
    }
}

/// Why QEMU cannot open a chain in which `path` is `levels` backing files below a
/// file it opened for writing: the image locks itself out ("Could not open backing
/// file: " once per level, then the lock refusal).
pub fn shared_write_refusal(path: &Path, levels: usize) -> String {
    format!(
        "{}Failed to get shared \"write\" lock\nIs another process using the image [{}]?",
        "Could not open backing file: ".repeat(levels),
        path.display()
    )
}

/// The files of the chain of the image at `path`, top first, as far as they can be
/// found: the walk stops at the first file that is missing or unreadable, at a loop,
/// and at the chain depth limit. Backing files whose format is not recorded are
/// probed: this only looks for names, it reads no guest data.
fn chain_files(path: &Path, format: Option<Format>) -> Vec<FileId> {
    let mut out = Vec::new();
    let mut next = Some((path.to_path_buf(), format));
    while let Some((p, fmt)) = next.take() {
        let Some(id) = FileId::of(&p) else { break };
        if out.contains(&id) || out.len() >= strata_chain::DEFAULT_MAX_DEPTH {
            break;
        }
        out.push(id);
        if !matches!(
            fmt.map_or_else(|| strata_chain::probe_format(&p), Ok),
            Ok(Format::Qcow2)
        ) {
            break;
        }
        // The header is enough: opening the image would do (and say) more.
        let opts = strata_storage::OpenOptions::read().force_share(true);
        let Ok(file) = strata_storage::FileStorage::open(&p, opts) else {
            break;
        };
        let Ok(header) = strata_format::qcow2::Header::read(&file) else {
            break;
        };
        let Some(name) = header.backing_file else {
            break;
        };
        let bfmt = header.backing_format.and_then(|f| f.parse().ok());
        next = Some((strata_chain::resolve_backing(&p, &name), bfmt));
    }
    out
}

/// An output file opened by [`create_output`]: locked for writing and empty.
#[derive(Debug)]
pub struct Output {
    storage: Arc<FileStorage>,
    path: PathBuf,
    id: FileId,
    created: bool,
}

impl Output {
    /// The output's storage.
    pub fn storage(&self) -> Arc<dyn Storage> {
        self.storage.clone()
    }

    /// Give the output up after a failure: a file this output created is removed;
    /// a file that existed before is never removed.
    pub fn discard(self) {
        let Output {
            storage,
            path,
            id,
            created,
        } = self;
        drop(storage);
        if created {
            strata_storage::remove_created(&path, Some((id.dev, id.ino)));
        }
    }
}

/// Open `path` as a new output: create it if it does not exist, refuse it if it is
/// one of `inputs`, take QEMU's write locks (refused if another process uses it),
/// and only then truncate it. A file created here is removed again if any step
/// fails.
pub fn create_output(path: &Path, inputs: &Inputs) -> Result<Output> {
    let file = OutputFile::open(path)?;
    let (dev, ino) = match file.identity() {
        Ok(id) => id,
        Err(e) => {
            file.abandon();
            return Err(e.into());
        }
    };
    let id = FileId { dev, ino };
    if let Err(e) = inputs.check(path, id) {
        file.abandon();
        return Err(e);
    }
    let created = file.created();
    let storage = Arc::new(file.lock(true)?);
    Ok(Output {
        storage,
        path: path.to_path_buf(),
        id,
        created,
    })
}

/// Refuse the existing image `path`, about to be opened and written in place, if
/// it is one of `inputs`. (Its write locks are taken when it is opened.)
pub fn check_output(path: &Path, inputs: &Inputs) -> Result<()> {
    match FileId::of(path) {
        Some(id) => inputs.check(path, id),
        None => Ok(()),
    }
}
