//! `--events-file PATH` (beyond torch): every lifecycle fact of the agent as
//! one JSON object per line, with real timestamps, for tools and people.
//!
//! Schema `torchrun-rs.events/1` (documented in the README): every line has
//! `schema`, `ts` (Unix time in milliseconds, a float), `event`, `run_id`,
//! `host`, then the event's own fields. Fields are only ever added within a
//! schema version.

use std::io::Write;

use crate::logs::failure::Json;

pub const SCHEMA: &str = "torchrun-rs.events/1";

/// A field value.
pub enum V {
    U(u64),
    I(i64),
    F(f64),
    S(String),
    Bool(bool),
    Null,
}

impl From<&V> for Json {
    fn from(v: &V) -> Json {
        match v {
            V::U(n) => Json::Num(*n as f64),
            V::I(n) => Json::Num(*n as f64),
            V::F(n) => Json::Float(*n),
            V::S(s) => Json::Str(s.clone()),
            V::Bool(b) => Json::Bool(*b),
            V::Null => Json::Null,
        }
    }
}

/// The open journal, if `--events-file` was given.
pub struct Journal {
    file: Option<std::fs::File>,
    run_id: String,
    host: String,
}

impl Journal {
    /// Opens (appends to) `path`, created 0600.
    pub fn open(
        path: Option<&std::path::Path>,
        run_id: &str,
        host: &str,
    ) -> std::io::Result<Journal> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = match path {
            None => None,
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(p)?,
            ),
        };
        Ok(Journal {
            file,
            run_id: run_id.to_string(),
            host: host.to_string(),
        })
    }

    /// Writes one event (one `write`, so lines of concurrent writers never
    /// tear). A journal that cannot be written is not worth a failed job.
    pub fn record(&mut self, event: &str, fields: &[(&str, V)]) {
        let Some(f) = self.file.as_mut() else {
            return;
        };
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let mut obj = vec![
            ("schema".to_string(), Json::Str(SCHEMA.to_string())),
            (
                "ts".to_string(),
                Json::Float((ts * 1000.0).round() / 1000.0),
            ),
            ("event".to_string(), Json::Str(event.to_string())),
            ("run_id".to_string(), Json::Str(self.run_id.clone())),
            ("host".to_string(), Json::Str(self.host.clone())),
        ];
        obj.extend(fields.iter().map(|(k, v)| (k.to_string(), Json::from(v))));
        let line = format!("{}\n", Json::Object(obj));
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!("cannot write the events file: {e}; no more events are written");
            self.file = None;
        }
    }
}
