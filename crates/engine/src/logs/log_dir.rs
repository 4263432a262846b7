//! torchrun's log directory layout (spec §6.4):
//! `<root>/<run_id>_<random>/attempt_<n>/<local_rank>/{stdout.log,stderr.log,error.json}`.
//!
//! Workers' output is private: every directory the launcher creates is 0700
//! and every file 0600, as torch's `tempfile.mkdtemp` makes them. A
//! `--log-dir` that already exists keeps its mode.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rand::Rng;

#[derive(Debug, thiserror::Error)]
pub enum LogDirError {
    #[error("--log-dir: {path} exists and is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot create log directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
}

/// The run directory of one launcher, or nothing with `--log-dir /dev/null`.
#[derive(Debug, Clone)]
pub struct LogDir {
    run_dir: Option<PathBuf>,
}

fn random_suffix() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_";
    let mut rng = rand::thread_rng();
    (0..8)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

/// Creates one directory, mode 0700.
fn create_private_dir(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(path)
}

/// Creates a directory and its missing parents, each new one mode 0700.
fn create_private_dir_all(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(path)
}

/// Creates (or truncates) a log file for writing, mode 0600 when new.
pub fn create_file(path: &Path) -> io::Result<std::fs::File> {
    crate::process::create_file(path).map(std::fs::File::from)
}

/// Creates `<parent>/<prefix><8 random chars>` like Python's `mkdtemp`.
fn make_temp_dir(parent: &Path, prefix: &str) -> Result<PathBuf, LogDirError> {
    for _ in 0..100 {
        let path = parent.join(format!("{prefix}{}", random_suffix()));
        match create_private_dir(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(LogDirError::Create { path, source }),
        }
    }
    Err(LogDirError::Create {
        path: parent.to_path_buf(),
        source: io::Error::new(io::ErrorKind::AlreadyExists, "no free temporary name"),
    })
}

impl LogDir {
    /// `root`: `--log-dir`, or `None` for a fresh `$TMPDIR/torchelastic_*`.
    pub fn create(root: Option<&Path>, run_id: &str) -> Result<LogDir, LogDirError> {
        let root = match root {
            Some(p) if p == Path::new("/dev/null") => return Ok(LogDir { run_dir: None }),
            Some(p) => {
                if p.exists() && !p.is_dir() {
                    return Err(LogDirError::NotADirectory {
                        path: p.to_path_buf(),
                    });
                }
                create_private_dir_all(p).map_err(|source| LogDirError::Create {
                    path: p.to_path_buf(),
                    source,
                })?;
                p.to_path_buf()
            }
            None => make_temp_dir(&std::env::temp_dir(), "torchelastic_")?,
        };
        let run_dir = make_temp_dir(&root, &format!("{run_id}_"))?;
        Ok(LogDir {
            run_dir: Some(run_dir),
        })
    }

    pub fn run_dir(&self) -> Option<&Path> {
        self.run_dir.as_deref()
    }

    /// Creates `attempt_<n>/<r>/` for every local rank (replacing an earlier
    /// attempt of the same number) and returns the attempt directory.
    pub fn start_attempt(
        &self,
        attempt: u32,
        local_ranks: u32,
    ) -> Result<Option<PathBuf>, LogDirError> {
        let Some(run) = &self.run_dir else {
            return Ok(None);
        };
        let dir = run.join(format!("attempt_{attempt}"));
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        for r in 0..local_ranks {
            let d = dir.join(r.to_string());
            create_private_dir_all(&d).map_err(|source| LogDirError::Create { path: d, source })?;
        }
        Ok(Some(dir))
    }
}
