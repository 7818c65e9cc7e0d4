//! `strata serve` (the HTTP API), `strata token` (its credentials) and
//! `strata image` (the image registry, on the local state directory).

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use strata_api::{Role, ServeOptions, Tokens};
use strata_registry::{ImageRecord, ListQuery, Registry, StoreLocation};
use strata_vm::StateDir;

use crate::image_remote::Remote;

#[derive(clap::Args)]
pub struct ServeCli {
    /// Address to listen on (port 0 picks a free one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:9292")]
    listen: SocketAddr,
    /// State directory (default: $STRATA_STATE_DIR, else /var/lib/strata).
    #[arg(long = "state-dir", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// PEM certificate chain: serve HTTPS (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Refuse images larger than this many bytes (413).
    #[arg(long, value_name = "BYTES")]
    max_image_size: Option<u64>,
    /// The backup repository the /api/v1/backups endpoints work on (a
    /// directory or s3:URL; needs --backup-password-file).
    #[arg(long, value_name = "REPO", requires = "backup_password_file")]
    backup_repo: Option<String>,
    /// The file holding that repository's password (it stays on the server).
    #[arg(long, value_name = "FILE", requires = "backup_repo")]
    backup_password_file: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
}

/// Where the registry keeps image data.
#[derive(clap::Args)]
struct StoreArgs {
    /// Where image data is kept: `dir` (files in the state directory, the
    /// default) or a backup repository, `repo:PATH` or
    /// `s3:http://HOST:PORT/BUCKET[/PREFIX]`, so images and backups share
    /// chunks. Recorded in the state directory when first chosen and used from
    /// then on; the password comes as for `strata backup`.
    #[arg(long = "image-store", value_name = "STORE", global = true)]
    image_store: Option<String>,
    /// With a repository store: read its password from this file (else
    /// STRATA_PASSWORD, RESTIC_PASSWORD_FILE, RESTIC_PASSWORD).
    #[arg(long = "password-file", value_name = "FILE", global = true)]
    password_file: Option<PathBuf>,
}

impl StoreArgs {
    /// Open the registry of `state` with the store given, else the recorded one.
    fn open(&self, state: &Path) -> Result<Registry> {
        let store = match &self.image_store {
            Some(s) => StoreLocation::parse(s)?,
            None => strata_registry::recorded_store(state)?,
        };
        let password = match store {
            StoreLocation::Directory => None,
            StoreLocation::Repository(_) => {
                Some(crate::backup::password(self.password_file.as_deref())?)
            }
        };
        Ok(Registry::open_with_store(
            state,
            &store,
            password.as_deref(),
        )?)
    }
}

pub fn run_serve(c: ServeCli) -> i32 {
    let state = StateDir::resolve(c.state_dir);
    let registry = match c.store.open(state.root()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strata serve: open the image registry: {e:#}");
            return 1;
        }
    };
    let opts = ServeOptions {
        listen: c.listen,
        state_dir: state.root().to_path_buf(),
        tls: c.tls_cert.zip(c.tls_key),
        max_image_size: c.max_image_size,
        backup: c.backup_repo.zip(c.backup_password_file),
        registry: Some(registry),
    };
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let r = strata_api::serve(opts, |addr| {
        println!("strata serve: listening on {scheme}://{addr}");
        let _ = std::io::stdout().flush();
    });
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("strata serve: {e}");
            1
        }
    }
}

#[derive(clap::Args)]
pub struct TokenCli {
    /// State directory the server reads its tokens from (default:
    /// $STRATA_STATE_DIR, else /var/lib/strata).
    #[arg(long = "state-dir", global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(clap::Subcommand)]
enum TokenCommand {
    /// Make a new API token and print it (it is stored only as a hash).
    Create {
        /// The token may only read.
        #[arg(long)]
        read_only: bool,
    },
    /// List the tokens (their public IDs and roles).
    List,
}

pub fn run_token(c: TokenCli) -> i32 {
    let state = StateDir::resolve(c.state_dir);
    let tokens = Tokens::new(state.root());
    let r: Result<()> = (|| {
        match c.command {
            TokenCommand::Create { read_only } => {
                let role = if read_only {
                    Role::ReadOnly
                } else {
                    Role::Admin
                };
                println!("{}", tokens.create(role)?);
            }
            TokenCommand::List => {
                for t in tokens.entries()? {
                    let role = if t.role == Role::Admin {
                        "admin"
                    } else {
                        "read-only"
                    };
                    println!("{}  {role}  {}", t.id, t.created_at);
                }
            }
        }
        Ok(())
    })();
    finish("token", r)
}

fn finish(what: &str, r: Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("strata {what}: {e:#}");
            1
        }
    }
}

#[derive(clap::Args)]
pub struct ImageCli {
    /// State directory of the local registry (default: $STRATA_STATE_DIR,
    /// else /var/lib/strata); not used with --server.
    #[arg(long = "state-dir", global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Work through the API of `strata serve` at URL instead of the local
    /// state directory (default: $STRATA_SERVER).
    #[arg(long, global = true, value_name = "URL")]
    server: Option<String>,
    /// The API token for --server (default: $STRATA_TOKEN).
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// PEM certificates to trust for an https --server, instead of the
    /// system's authorities.
    #[arg(long = "ca-file", global = true, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// `json` for machine-readable output.
    #[arg(long, global = true, default_value = "human")]
    output: String,
    #[command(flatten)]
    store: StoreArgs,
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(clap::Subcommand)]
pub(crate) enum ImageCommand {
    /// List images (newest first).
    List {
        /// Only images with this name.
        #[arg(long)]
        name: Option<String>,
        /// Only images with this status.
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one image.
    Show { id: String },
    /// Write an image's data to FILE (verified against its sha512).
    Download {
        id: String,
        #[arg(long, short = 'f')]
        file: PathBuf,
    },
    /// Delete an image (refused when protected, or while disks cloned from
    /// it read it, unless --force: the clones keep its cached copy).
    Delete {
        id: String,
        #[arg(long)]
        force: bool,
    },
    /// Make an image of a VM's disk as it was at a snapshot (running or not).
    CreateFromSnapshot(crate::image_ops::FromSnapshotArgs),
    /// Make an image of a VM's disk as it is now, while the guest runs.
    CreateFromVm(crate::image_ops::FromVmArgs),
    /// Make an image from a local file: create, upload, checksum.
    CreateFromFile {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// Disk format (qcow2, raw, ...).
        #[arg(long, default_value = "qcow2")]
        disk_format: String,
        #[arg(long, default_value = "bare")]
        container_format: String,
    },
}

pub fn run_image(c: ImageCli) -> i32 {
    let state = StateDir::resolve(c.state_dir);
    let json = match c.output.as_str() {
        "human" => false,
        "json" => true,
        other => {
            eprintln!("strata image: unknown output format '{other}' (human or json)");
            return 1;
        }
    };
    let server = c.server.or_else(|| env_value("STRATA_SERVER"));
    let r = (|| -> Result<()> {
        match server {
            Some(url) => {
                let token = c.token.or_else(|| env_value("STRATA_TOKEN"));
                let remote = Remote::connect(&url, token, c.ca_file.as_deref())?;
                image(&remote, c.command, json)
            }
            None => {
                let reg = c
                    .store
                    .open(state.root())
                    .context("open the image registry")?;
                image(&reg, c.command, json)
            }
        }
    })();
    finish("image", r)
}

/// An environment variable's value, unless unset or empty.
fn env_value(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn show(rec: &ImageRecord, json: bool) -> Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&strata_api::images::image_json(rec))?
        );
        return Ok(());
    }
    for (k, v) in rec.to_json() {
        let v = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        };
        println!("{k:<18} {v}");
    }
    Ok(())
}

/// Where `strata image` finds the registry: the local state directory or a
/// server's API. Both give the same records, so the output is the same.
pub(crate) trait ImageStore {
    /// Every image the filters select, in the registry's default order.
    fn list(&self, name: Option<String>, status: Option<String>) -> Result<Vec<ImageRecord>>;
    fn get(&self, id: &str) -> Result<ImageRecord>;
    fn delete(&self, id: &str) -> Result<()>;
    /// Create an image and upload `file` into it; the finished record.
    fn create_from_file(
        &self,
        file: &Path,
        body: serde_json::Map<String, serde_json::Value>,
    ) -> Result<ImageRecord>;
    /// Write the image's data to `file`, verified against its sha512.
    fn download(&self, id: &str, file: &Path) -> Result<()>;
    /// The registry itself when it is on this machine (verbs that read a
    /// VM's disks or clones' use of an image work only there).
    fn registry(&self) -> Option<&Registry> {
        None
    }
}

/// The local registry behind `store`, or a refusal naming the verb.
fn local<'a>(store: &'a dyn ImageStore, verb: &str) -> Result<&'a Registry> {
    match store.registry() {
        Some(r) => Ok(r),
        None => bail!("`strata image {verb}` works on the local state directory only: run it without --server on the host of the VM"),
    }
}

fn image(store: &dyn ImageStore, cmd: ImageCommand, json: bool) -> Result<()> {
    match cmd {
        ImageCommand::List { name, status } => print_list(&store.list(name, status)?, json)?,
        ImageCommand::Show { id } => show(&store.get(&id)?, json)?,
        ImageCommand::Download { id, file } => store.download(&id, &file)?,
        ImageCommand::Delete { id, force: false } => store.delete(&id)?,
        ImageCommand::Delete { id, force: true } => {
            local(store, "delete --force")?.delete_forced(&id)?
        }
        ImageCommand::CreateFromSnapshot(a) => show(
            &crate::image_ops::from_snapshot(local(store, "create-from-snapshot")?, a)?,
            json,
        )?,
        ImageCommand::CreateFromVm(a) => show(
            &crate::image_ops::from_running(local(store, "create-from-vm")?, a)?,
            json,
        )?,
        ImageCommand::CreateFromFile {
            file,
            name,
            disk_format,
            container_format,
        } => {
            let mut body = serde_json::Map::new();
            body.insert("name".into(), name.into());
            body.insert("disk_format".into(), disk_format.into());
            body.insert("container_format".into(), container_format.into());
            show(&store.create_from_file(&file, body)?, json)?;
        }
    }
    Ok(())
}

fn print_list(all: &[ImageRecord], json: bool) -> Result<()> {
    if json {
        let v: Vec<_> = all.iter().map(strata_api::images::image_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{:<36}  {:<8}  {:>12}  NAME", "ID", "STATUS", "SIZE");
        for r in all {
            let size = r.size.map(|s| s.to_string()).unwrap_or_default();
            println!(
                "{:<36}  {:<8}  {:>12}  {}",
                r.id,
                r.status.as_str(),
                size,
                r.name.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}

impl ImageStore for Registry {
    fn registry(&self) -> Option<&Registry> {
        Some(self)
    }

    fn list(&self, name: Option<String>, status: Option<String>) -> Result<Vec<ImageRecord>> {
        let mut pairs = vec![(
            "limit".to_string(),
            strata_registry::list::MAX_LIMIT.to_string(),
        )];
        pairs.extend(name.map(|n| ("name".to_string(), n)));
        pairs.extend(status.map(|s| ("status".to_string(), s)));
        let mut q = ListQuery::from_pairs(&pairs)?;
        let mut all = Vec::new();
        loop {
            let page = Registry::list(self, &q)?;
            let more = page.more;
            q.marker = page.images.last().map(|r| r.id.clone());
            all.extend(page.images);
            if !more {
                return Ok(all);
            }
        }
    }

    fn get(&self, id: &str) -> Result<ImageRecord> {
        Ok(Registry::get(self, id)?)
    }

    fn delete(&self, id: &str) -> Result<()> {
        Ok(Registry::delete(self, id)?)
    }

    fn create_from_file(
        &self,
        file: &Path,
        body: serde_json::Map<String, serde_json::Value>,
    ) -> Result<ImageRecord> {
        let rec = self.create(&body)?;
        let mut src =
            std::fs::File::open(file).with_context(|| format!("open {}", file.display()))?;
        let mut up = self.begin_upload(&rec.id, None)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src
                .read(&mut buf)
                .with_context(|| format!("read {}", file.display()))?;
            if n == 0 {
                break;
            }
            up.write(&buf[..n])?;
        }
        Ok(up.finish()?)
    }

    fn download(&self, id: &str, file: &Path) -> Result<()> {
        let (_, reader) = Registry::download(self, id, None)?;
        write_verified(id, reader, file)
    }
}

/// Copy image `id`'s data from `reader` (which fails at its end if the bytes
/// do not match the image's sha512) to a temporary file beside `file`, and
/// rename it into place only when every byte arrived and matched.
pub(crate) fn write_verified(id: &str, mut reader: impl Read, file: &Path) -> Result<()> {
    strata_registry::download::write_file(&mut reader, file, None)
        .with_context(|| format!("download image {id}"))?;
    if !file.exists() {
        bail!("download of {id} did not produce {}", file.display());
    }
    Ok(())
}
